//! `process-file`: the same processing on a JSON Lines file, into the same layout under a
//! local directory. For backfills, for trying the pipeline without any service, and for the
//! benchmark against the original.
//!
//! ```text
//! DIR/tickets_with_team/date=YYYY-MM-DD/hour=HH/part-00000.jsonl ...
//!                                              valid tickets with support_team, by the UTC
//!                                              hour of their created_at (.parquet with
//!                                              --output-format parquet)
//! DIR/counts_by_request_type/latest.jsonl      one line per request type
//! DIR/dead_letters/part-00000.jsonl            {"line": N, "error": "...", "raw": "..."}
//! ```
//!
//! A file has no Kafka timestamps: its tickets go into the `date=`/`hour=` folders of the hour
//! they were created in (`created_at`, in UTC; a time without an offset is UTC), the only time
//! a file has. The stream files a ticket by the time Kafka received it instead; for tickets
//! published as they are created, the two are the same hour or the next.
//!
//! Each worker gathers its tickets by hour, up to its share of [`PENDING_BYTES`], then writes
//! each hour's into that hour's file, and keeps at most [`OPEN_HOURS`] files open; an hour it
//! comes back to after its file was closed gets another part file (`part-WWWWW-N`), so that
//! neither memory nor open files grow with the span of time a file covers. A file in time
//! order makes one file per hour and worker; one whose tickets are spread over many hours in
//! no order makes one per hour, worker and write (sort such a file by `created_at` first for
//! fewer, larger files).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use datafusion::arrow::array::RecordBatch;
use serde::Serialize;
use std::collections::HashMap;

use ticket_core::counts::Counts;
use ticket_core::keys::Hour;
use ticket_core::{Routing, TicketRef};

use ticket_engine::aggregate::Aggregator;
use ticket_engine::aggregate::Columns;
use ticket_engine::output::{ObjectWriter, OutputFormat, Rows};

/// What a file run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub lines: u64,
    pub valid: u64,
    pub invalid: u64,
    pub counts: Counts,
}

#[derive(Serialize)]
struct DeadLetter<'a> {
    line: u64,
    error: &'a str,
    raw: &'a str,
}

/// How much of the file a worker reads at a time: memory stays bounded by workers x this.
/// Tiny in tests, so that lines straddle blocks.
const BLOCK: usize = if cfg!(test) { 16 } else { 4 << 20 };

/// How many hours' files one worker keeps open at most.
const OPEN_HOURS: usize = if cfg!(test) { 2 } else { 64 };

/// How many bytes of tickets the workers together gather, grouped by hour, before each writes
/// them out: the more, the fewer files a file spread over many hours is cut into (its hours
/// get a file per worker each time it writes). Tiny in tests, so that every block is written.
const PENDING_BYTES: usize = if cfg!(test) { 1 } else { 32 << 20 };

/// What one worker did with its byte range of the file.
#[derive(Default)]
struct Part {
    /// Every line that starts in the range, blank ones included (to number lines).
    lines_seen: u64,
    lines: u64,
    valid: u64,
    /// (line number within the range, from 0; reason; the line, lossily decoded)
    dead: Vec<(u64, String, String)>,
    columns: Vec<RecordBatch>,
}

/// Processes `input` into `out_dir`, replacing what an earlier run wrote there.
///
/// The file is cut into one byte range per core; each worker streams its range in blocks,
/// gathers the tickets by hour and writes its own `part-WWWWW[-N]` files of each hour (see
/// the module doc), so memory does not grow with the file. A line belongs to the range in
/// which it starts.
pub async fn process_file(
    input: &Path,
    out_dir: &Path,
    routing: &Routing,
    aggregator: &Aggregator,
    format: OutputFormat,
) -> anyhow::Result<FileReport> {
    let len = std::fs::metadata(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .len();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // Small files are not worth a thread per core.
    let workers = cores.clamp(1, 16).min(len / BLOCK as u64 + 1);

    let tickets_dir = out_dir.join("tickets_with_team");
    let counts_dir = out_dir.join("counts_by_request_type");
    let dead_dir = out_dir.join("dead_letters");
    for dir in [&tickets_dir, &counts_dir, &dead_dir] {
        clear_parts(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let parts: Vec<Part> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let range = (len * w / workers, len * (w + 1) / workers);
                let out = Out {
                    dir: &tickets_dir,
                    worker: w,
                    format,
                    pending_bytes: PENDING_BYTES / workers as usize,
                };
                s.spawn(move || process_range(input, range, out, routing))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<anyhow::Result<_>>()
    })?;

    let mut report = FileReport {
        lines: 0,
        valid: 0,
        invalid: 0,
        counts: Counts::default(),
    };
    let mut dead = Vec::new();
    let mut first_line = 1;
    let mut columns = Vec::new();
    for part in parts {
        report.lines += part.lines;
        report.valid += part.valid;
        report.invalid += part.dead.len() as u64;
        for (i, error, raw) in &part.dead {
            let line = first_line + i;
            // A struct of strings and an integer always serializes into a Vec.
            let _ = serde_json::to_writer(&mut dead, &DeadLetter { line, error, raw });
            dead.push(b'\n');
        }
        first_line += part.lines_seen;
        columns.extend(part.columns);
    }
    if !dead.is_empty() {
        write(&dead_dir.join("part-00000.jsonl"), &dead)?;
    }
    report.counts = aggregator.count(columns).await?;
    write(
        &counts_dir.join("latest.jsonl"),
        &report.counts.to_jsonl(routing),
    )?;
    Ok(report)
}

/// Where a worker writes: `dir/date=…/hour=…/part-WWWWW[-N].ext`.
#[derive(Clone, Copy)]
struct Out<'a> {
    dir: &'a Path,
    worker: u64,
    format: OutputFormat,
    /// How much the worker gathers before it writes.
    pending_bytes: usize,
}

impl Out<'_> {
    /// The path of the worker's `n`th file of `hour` (the first has no `-N`).
    fn path(&self, hour: Hour, n: u32) -> PathBuf {
        let name = match n {
            0 => format!("part-{:05}.{}", self.worker, self.format.extension()),
            n => format!("part-{:05}-{n}.{}", self.worker, self.format.extension()),
        };
        self.dir.join(hour.path()).join(name)
    }
}

/// A worker's hours: the tickets not written yet, grouped by hour, and the files it has open.
struct Hours<'a> {
    out: Out<'a>,
    /// Valid tickets not written yet, by hour; each hour's rows start with no room reserved,
    /// as a file spread over years has thousands of hours of a few tickets each.
    pending: HashMap<Hour, Rows>,
    /// About how many bytes `pending` holds (the input lines' length).
    pending_bytes: usize,
    /// The grouping columns of the valid tickets since the last flush (one set per worker,
    /// not per hour).
    columns: Columns,
    valid: u64,
    /// Open files, at most [`OPEN_HOURS`], with the flush that last wrote to each.
    open: HashMap<Hour, (ObjectWriter<BufWriter<File>>, u64)>,
    /// How many files of each hour this worker has made (the next one's number).
    files: HashMap<Hour, u32>,
    flushes: u64,
}

impl<'a> Hours<'a> {
    fn new(out: Out<'a>) -> Self {
        Hours {
            out,
            pending: HashMap::new(),
            pending_bytes: 0,
            columns: Columns::default(),
            valid: 0,
            open: HashMap::new(),
            files: HashMap::new(),
            flushes: 0,
        }
    }

    fn push(&mut self, routing: &Routing, ticket: &TicketRef<'_>, line_len: usize) {
        let team = routing.team_for(ticket.request_type());
        let format = self.out.format;
        self.pending
            .entry(Hour::of(&ticket.created_at()))
            .or_insert_with(|| Rows::small(format))
            .push(ticket, team);
        self.columns
            .push(ticket.request_type(), ticket.priority().as_str(), team);
        self.valid += 1;
        self.pending_bytes += line_len;
    }

    /// Writes every hour's pending tickets into its open file (or a new one), then closes the
    /// least recently written files beyond [`OPEN_HOURS`].
    fn flush(&mut self, part: &mut Part) -> anyhow::Result<()> {
        self.flushes += 1;
        let now = self.flushes;
        let mut new = Vec::new();
        for (hour, rows) in self.pending.drain() {
            match self.open.get_mut(&hour) {
                Some((w, used)) => {
                    *used = now;
                    w.write(rows).context("cannot write a ticket file")?;
                }
                None => new.push((hour, rows)),
            }
        }
        // Room for the new hours: close the files this write did not add to, least recently
        // written first. New hours beyond the room get a file written and closed at once.
        let mut idle: Vec<(u64, Hour)> = (self.open.iter())
            .filter(|(_, (_, used))| *used < now)
            .map(|(hour, (_, used))| (*used, *hour))
            .collect();
        idle.sort_unstable();
        let over = (self.open.len() + new.len()).saturating_sub(OPEN_HOURS);
        for (_, hour) in idle.into_iter().take(over) {
            if let Some((w, _)) = self.open.remove(&hour) {
                finish(w)?;
            }
        }
        for (hour, rows) in new {
            let mut w = self.create(hour)?;
            w.write(rows).context("cannot write a ticket file")?;
            if self.open.len() < OPEN_HOURS {
                self.open.insert(hour, (w, now));
            } else {
                finish(w)?;
            }
        }
        debug_assert!(
            self.open.len() <= OPEN_HOURS,
            "at most OPEN_HOURS files open"
        );
        self.pending_bytes = 0;
        part.valid += std::mem::take(&mut self.valid);
        part.columns
            .push(std::mem::take(&mut self.columns).finish());
        Ok(())
    }

    /// Starts the worker's next file of `hour`.
    fn create(&mut self, hour: Hour) -> anyhow::Result<ObjectWriter<BufWriter<File>>> {
        let n = self.files.entry(hour).or_insert(0);
        let path = self.out.path(hour, *n);
        *n += 1;
        let dir = path.parent().unwrap_or(self.out.dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file =
            File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        ObjectWriter::new(self.out.format, BufWriter::new(file))
    }

    fn finish(mut self, part: &mut Part) -> anyhow::Result<()> {
        self.flush(part)?;
        for (_, (w, _)) in self.open {
            finish(w)?;
        }
        Ok(())
    }
}

fn finish(w: ObjectWriter<BufWriter<File>>) -> anyhow::Result<()> {
    w.finish()
        .and_then(|f| f.into_inner().map_err(|e| e.into_error().into()))
        .context("cannot finish a ticket file")?;
    Ok(())
}

/// Processes the lines that start in `start..end` of the file into `out`'s hours.
fn process_range(
    input: &Path,
    (start, end): (u64, u64),
    out: Out<'_>,
    routing: &Routing,
) -> anyhow::Result<Part> {
    let read_error = || format!("cannot read {}", input.display());
    let mut file = File::open(input).with_context(read_error)?;
    // From one byte early: the line that starts the range is the one after the first newline.
    let mut pos = start.saturating_sub(1);
    file.seek(SeekFrom::Start(pos)).with_context(read_error)?;
    let mut skipping = start > 0;

    let mut part = Part::default();
    let mut hours = Hours::new(out);
    let mut buf: Vec<u8> = Vec::with_capacity(2 * BLOCK);
    let mut eof = false;
    let mut done = false;
    while !done {
        let filled = buf.len();
        buf.resize(filled + BLOCK, 0);
        let n = file.read(&mut buf[filled..]).with_context(read_error)?;
        buf.truncate(filled + n);
        eof = eof || n == 0;

        let mut used = 0;
        if skipping {
            match memchr::memchr(b'\n', &buf) {
                Some(i) => {
                    used = i + 1;
                    skipping = false;
                }
                None => {
                    used = buf.len();
                    done = eof;
                }
            }
        }
        while !skipping && !done {
            if pos + used as u64 >= end {
                done = true;
                break;
            }
            let rest = &buf[used..];
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], used + i + 1),
                None if eof => {
                    done = true;
                    if rest.is_empty() {
                        break;
                    }
                    (rest, buf.len())
                }
                None => break,
            };
            process_line(line, routing, &mut hours, &mut part);
            used = next;
        }
        if hours.pending_bytes >= out.pending_bytes {
            hours.flush(&mut part)?;
        }
        buf.drain(..used);
        pos += used as u64;
    }
    hours.finish(&mut part)?;
    Ok(part)
}

fn process_line(line: &[u8], routing: &Routing, hours: &mut Hours<'_>, part: &mut Part) {
    let index = part.lines_seen;
    part.lines_seen += 1;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // blank lines separate nothing in JSON Lines
    }
    part.lines += 1;
    match ticket_core::validate::decode_ref(line) {
        Ok(ticket) => hours.push(routing, &ticket, line.len()),
        Err(reason) => {
            let raw = String::from_utf8_lossy(line).into_owned();
            part.dead.push((index, reason.to_string(), raw));
        }
    }
}

fn write(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the `.jsonl` and `.parquet` files a previous run left, in `dir` and in its
/// `date=…/hour=…` folders (then the folders left empty), so that a rerun replaces rather than
/// adds, in either format and either layout (earlier versions wrote the parts flat).
fn clear_parts(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() && (name.starts_with("date=") || name.starts_with("hour=")) {
            clear_parts(&path)?;
            // Only if empty now: anything else in it is not ours to delete.
            let _ = std::fs::remove_dir(&path);
        } else if path
            .extension()
            .is_some_and(|x| x == "jsonl" || x == "parquet")
        {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// What [`into_table`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLoad {
    /// The `topic` the file's rows have in the table: `file:<name>@<sha256, 12 hex>`.
    pub topic: String,
    /// Data files added (0 when the file was in the table already).
    pub files: usize,
    /// Tickets added.
    pub tickets: u64,
    /// The file (same name, same bytes) had been committed before: nothing was added.
    pub already: bool,
}

/// Appends what [`process_file`] wrote in Parquet under `out_dir` to the Delta table of the
/// bucket (`{S3_PREFIX}tables/tickets_with_team/`, where the stream's `OUTPUT_FORMAT=delta`
/// writes), in one commit, exactly once per file: the commit's transaction action is the
/// stream's kind, with the app id `file:<name>@<sha256>-0` for `topic` `file:<name>@<sha256>`
/// and partition 0, and the file's line count as its version. A rerun of the same file finds
/// its app id in the table and adds nothing; a changed file is another backfill.
pub async fn into_table(
    input: &Path,
    out_dir: &Path,
    lines: u64,
    s3: &ticket_s3::S3Args,
) -> anyhow::Result<TableLoad> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let read_error = || format!("cannot read {}", input.display());
    let mut f = File::open(input).with_context(read_error)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    let name = input
        .file_name()
        .map_or_else(|| "-".to_string(), |n| n.to_string_lossy().into_owned());
    let topic = format!("file:{name}@{}", &digest[..12]);

    ticket_s3::Store::connect(s3)
        .await?
        .check_reachable()
        .await?;
    let store = ticket_s3::object_store(s3, ticket_s3::Retries::Client).await?;
    let prefix = ticket_core::keys::Layout::new(&s3.prefix, "")
        .prefix()
        .to_string();
    let table = ticket_delta::Table::open_or_create(store.clone(), &s3.bucket, &prefix).await?;
    let mut load = TableLoad {
        topic: topic.clone(),
        files: 0,
        tickets: 0,
        already: table.version_of(&topic, 0).await?.is_some(),
    };
    if load.already {
        return Ok(load);
    }
    let mut files = Vec::new();
    for (path, hour) in hour_files(&out_dir.join("tickets_with_team"))? {
        let body =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let rows = datafusion::parquet::file::reader::SerializedFileReader::new(
            bytes::Bytes::from(body.clone()),
        )
        .map(|r| {
            use datafusion::parquet::file::reader::FileReader;
            r.metadata().file_metadata().num_rows()
        })
        .with_context(|| format!("{} is not a Parquet file", path.display()))?;
        let file = ticket_delta::DataFile {
            path: ticket_delta::DataFile::path_for(&topic, 0, hour),
            hour,
            // No Kafka offsets: a file's rows have none.
            first: -1,
            last: -1,
            size: body.len() as u64,
            tickets: rows as u64,
        };
        let key = format!("{prefix}{}{}", ticket_delta::TABLE_DIR, file.path);
        object_store::ObjectStoreExt::put(
            store.as_ref(),
            &object_store::path::Path::from(key.as_str()),
            body.into(),
        )
        .await
        .with_context(|| format!("cannot write s3://{}/{key}", s3.bucket))?;
        load.tickets += file.tickets;
        files.push(file);
    }
    load.files = files.len();
    let part = ticket_delta::Part {
        topic,
        partition: 0,
        expected: None,
        version: lines as i64,
        files,
    };
    match table.commit(std::slice::from_ref(&part)).await?.first() {
        Some(ticket_delta::Outcome::Committed) => Ok(load),
        // Another run of the same file committed first: its rows are in, ours are not.
        _ => Ok(TableLoad {
            files: 0,
            tickets: 0,
            already: true,
            ..load
        }),
    }
}

/// The Parquet files under `dir`'s `date=YYYY-MM-DD/hour=HH/` folders, with their hour.
fn hour_files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Hour)>> {
    let mut out = Vec::new();
    for date in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let date_name = date.file_name().to_string_lossy().into_owned();
        let Some(day) = date_name
            .strip_prefix("date=")
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        for hour in std::fs::read_dir(date.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let hour_name = hour.file_name().to_string_lossy().into_owned();
            let Some(h) = hour_name
                .strip_prefix("hour=")
                .and_then(|h| h.parse::<u32>().ok())
                .and_then(|h| day.and_hms_opt(h, 0, 0))
            else {
                continue;
            };
            for f in std::fs::read_dir(hour.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|x| x == "parquet") {
                    out.push((f.path(), Hour::of(&h.and_utc())));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files under `dir`, as paths relative to it.
    fn read_dir_names(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    let rel = p.strip_prefix(dir).expect("under dir");
                    names.push(rel.display().to_string());
                }
            }
        }
        names
    }

    /// Every file under `dir`, by path: (path relative to `dir`, contents).
    fn files(dir: &Path) -> std::collections::BTreeMap<String, String> {
        read_dir_names(dir)
            .into_iter()
            .map(|rel| {
                let text = std::fs::read_to_string(dir.join(&rel)).expect("read");
                (rel, text)
            })
            .collect()
    }

    fn read_tree(dir: &Path) -> Vec<String> {
        files(dir).into_values().collect()
    }

    fn ticket(id: &str, created_at: &str) -> String {
        format!(
            r#"{{"ticket_id":"{id}","client_id":1,"created_at":"{created_at}","request":"r","request_type":"billing","priority":"low"}}"#
        )
    }

    /// Tickets land in the folder of the UTC hour of their created_at, offsets converted; a
    /// worker that keeps fewer files open than the hours it meets starts another part file
    /// for an hour it comes back to, and every ticket is written once.
    #[test]
    fn tickets_go_to_the_utc_hour_they_were_created_in_with_few_files_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        // Three hours, coming back to the first after the others (OPEN_HOURS is 2 in
        // tests, a block is 16 bytes: each line is a block of its own).
        let lines = [
            ticket("A", "2025-03-01T10:15:00"),
            ticket("B", "2025-03-01T12:59:59+01:00"),
            ticket("C", "2025-03-01T23:30:00-02:00"),
            ticket("D", "2025-03-01T10:45:00Z"),
        ];
        std::fs::write(&input, lines.join("\n")).expect("write");
        let out_dir = dir.path().join("tickets_with_team");
        let out = Out {
            dir: &out_dir,
            worker: 0,
            format: OutputFormat::Jsonl,
            pending_bytes: 1,
        };
        let len = std::fs::metadata(&input).expect("input").len();
        let part = process_range(&input, (0, len), out, &Routing::default()).expect("runs");
        assert_eq!(part.valid, 4);
        let tree = files(&out_dir);
        let ids_in = |hour: &str| -> Vec<String> {
            let mut ids: Vec<String> = tree
                .iter()
                .filter(|(p, _)| p.starts_with(hour))
                .flat_map(|(_, c)| c.lines().map(str::to_string).collect::<Vec<_>>())
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(&l).expect("json")["ticket_id"]
                        .to_string()
                })
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(
            ids_in("date=2025-03-01/hour=10/"),
            ["\"A\"", "\"D\""],
            "{tree:?}"
        );
        assert_eq!(ids_in("date=2025-03-01/hour=11/"), ["\"B\""], "{tree:?}");
        assert_eq!(ids_in("date=2025-03-02/hour=01/"), ["\"C\""], "{tree:?}");
        assert_eq!(
            tree.len(),
            4,
            "hour 10 was closed and came back: two files: {tree:?}"
        );
        assert!(
            tree.keys()
                .any(|p| p.starts_with("date=2025-03-01/hour=10/part-00000-1.")),
            "{tree:?}"
        );

        // Gathered before they are written, the same tickets make one file per hour, in
        // either format, with every ticket once.
        for format in [OutputFormat::Jsonl, OutputFormat::Parquet] {
            let out_dir = dir.path().join(format!("gathered-{}", format.extension()));
            let out = Out {
                dir: &out_dir,
                worker: 0,
                format,
                pending_bytes: 1 << 20,
            };
            let part = process_range(&input, (0, len), out, &Routing::default()).expect("runs");
            assert_eq!(part.valid, 4);
            let rows: usize = part.columns.iter().map(RecordBatch::num_rows).sum();
            assert_eq!(rows, 4, "every ticket counted once");
            let mut names = read_dir_names(&out_dir);
            names.sort();
            let ext = format.extension();
            assert_eq!(
                names,
                [
                    format!("date=2025-03-01/hour=10/part-00000.{ext}"),
                    format!("date=2025-03-01/hour=11/part-00000.{ext}"),
                    format!("date=2025-03-02/hour=01/part-00000.{ext}"),
                ]
            );
        }
    }

    /// Every cut of a file into ranges processes each line exactly once and numbers it right,
    /// whatever the ranges' sizes relative to the lines (blank lines, CRLF, no final newline).
    #[test]
    fn ranges_keep_every_line_once_and_number_them() {
        let good = |id: &str| {
            format!(
                r#"{{"ticket_id":"{id}","client_id":1,"created_at":"2025-03-01T10:00:00Z","request":"r","request_type":"other","priority":"low"}}"#
            )
        };
        let text = format!(
            "{}\n\nbad one\r\n{}\r\n{}\n  \nbad two\n{}",
            good("A"),
            good("B"),
            good("C"),
            good("D")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, &text).expect("write");
        let len = text.len() as u64;
        for cut in 0..=len {
            let mut ids = String::new();
            let mut dead = Vec::new();
            let mut first_line = 1;
            for (i, range) in [(0, cut), (cut, len)].into_iter().enumerate() {
                let out_dir = dir.path().join(format!("out-{i}"));
                let _ = std::fs::remove_dir_all(&out_dir);
                let out = Out {
                    dir: &out_dir,
                    worker: i as u64,
                    format: OutputFormat::Jsonl,
                    pending_bytes: 1,
                };
                let part = process_range(&input, range, out, &Routing::default()).expect("runs");
                ids += &read_tree(&out_dir).concat();
                dead.extend(
                    part.dead
                        .iter()
                        .map(|(l, _, raw)| (first_line + l, raw.clone())),
                );
                first_line += part.lines_seen;
            }
            let ids: Vec<String> = ids
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["ticket_id"]
                        .to_string()
                })
                .collect();
            assert_eq!(ids, ["\"A\"", "\"B\"", "\"C\"", "\"D\""], "cut at {cut}");
            assert_eq!(
                dead,
                [(3, "bad one".to_string()), (7, "bad two".to_string())],
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn a_file_run_writes_the_layout_and_replaces_an_earlier_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        let good = r#"{"ticket_id":"T-1","client_id":5000,"created_at":"2025-03-01T10:00:00","request":"Help","request_type":"billing","priority":"low"}"#;
        std::fs::write(
            &input,
            format!("{good}\nnot json\n\n{}\n", good.replace("T-1", "T-2")),
        )
        .expect("write");
        let out = dir.path().join("out");
        for _ in 0..2 {
            let r = process_file(
                &input,
                &out,
                &Routing::default(),
                &Aggregator::default(),
                OutputFormat::Jsonl,
            )
            .await
            .expect("runs");
            assert_eq!((r.lines, r.valid, r.invalid), (3, 2, 1));
        }
        // Another format, and an earlier version's flat part file: replaced by the next run.
        std::fs::write(out.join("tickets_with_team/part-00007.jsonl"), good).expect("write");
        for format in [OutputFormat::Parquet, OutputFormat::Jsonl] {
            let r = process_file(
                &input,
                &out,
                &Routing::default(),
                &Aggregator::default(),
                format,
            )
            .await
            .expect("runs");
            assert_eq!(r.valid, 2);
        }
        let tree = files(&out.join("tickets_with_team"));
        assert!(
            tree.keys()
                .all(|p| p.starts_with("date=2025-03-01/hour=10/part-") && p.ends_with(".jsonl")),
            "the earlier runs' files are gone: {tree:?}"
        );
        let tickets: String = tree.into_values().collect();
        assert_eq!(tickets.lines().count(), 2);
        assert!(tickets.contains("\"support_team\":\"Billing Team\""));
        let dead = std::fs::read_to_string(out.join("dead_letters/part-00000.jsonl"))
            .expect("dead letters");
        assert!(
            dead.contains("\"line\":2") && dead.contains("malformed or truncated JSON"),
            "{dead}"
        );
        let counts = std::fs::read_to_string(out.join("counts_by_request_type/latest.jsonl"))
            .expect("counts");
        assert!(
            counts.starts_with("{\"request_type\":\"billing\",\"count\":2,"),
            "{counts}"
        );
    }
}
