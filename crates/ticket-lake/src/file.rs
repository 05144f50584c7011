//! `process-file`: the same processing on a JSON Lines file, into the same layout under a
//! local directory. For backfills, for trying the pipeline without any service, and for the
//! benchmark against the original.
//!
//! ```text
//! DIR/tickets_with_team/date=YYYY-MM-DD/hour=HH/part-00000.jsonl
//!                                              valid tickets with support_team, by the UTC
//!                                              hour of their created_at, one file per hour
//!                                              (.parquet with --output-format parquet)
//! DIR/counts_by_request_type/latest.jsonl      one line per request type
//! DIR/dead_letters/part-00000.jsonl            {"line": N, "error": "...", "raw": "..."}
//! ```
//!
//! A file has no Kafka timestamps: its tickets go into the `date=`/`hour=` folders of the hour
//! they were created in (`created_at`, in UTC; a time without an offset is UTC), the only time
//! a file has. The stream files a ticket by the time Kafka received it instead; for tickets
//! published as they are created, the two are the same hour or the next.
//!
//! One file per hour whatever the order of the file, in memory bounded by `--memory-mb`, in two
//! passes (a bucketing of our own, measured against DataFusion's external sort in
//! BENCHMARKS.md):
//!
//! 1. **Gather and spill.** The file is cut into one byte range per core. Each worker reads its
//!    range in blocks, decodes, validates and routes each line, and gathers the valid tickets'
//!    output lines by hour, up to its share of the memory budget; then it writes them, hour
//!    after hour, as one run file (`DIR/.spill/WWWWW/run-NNNNN.jsonl`) and keeps where each
//!    hour's lines are in it, and counts the tickets' types with DataFusion (on the caller's
//!    runtime, batch by batch: nothing is kept until the end). Dead letters go to a spill file
//!    of their own. A file is created per spill, not per hour (creating thousands of small
//!    files was most of the time: BENCHMARKS.md).
//! 2. **One file per hour.** The hours are shared out between the workers; each writes its
//!    hours' files from the runs' pieces of them, in input order: JSON Lines by copying the
//!    bytes, Parquet by decoding the spilled lines again, one piece at a time (a piece is at
//!    most a worker's share), into row groups. The dead letters are numbered and written last;
//!    then the spill directory is removed.
//!
//! What stays in memory: each worker's gathered tickets (`--memory-mb` shared between them, as
//! the capacity of their buffers, their grouping columns counted in), its read buffer (two
//! blocks) and, in the second pass, one piece of an hour and its rows.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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

/// `--memory-mb`'s default: what the workers together gather before they spill. With the
/// read buffers, DataFusion and the second pass's chunks, a run peaks under 256 MB
/// (BENCHMARKS.md).
pub const DEFAULT_MEMORY_MB: u64 = 128;

#[derive(Serialize, Deserialize)]
struct DeadLetter<'a> {
    line: u64,
    #[serde(borrow)]
    error: Cow<'a, str>,
    #[serde(borrow)]
    raw: Cow<'a, str>,
}

/// How much of the file a worker reads at a time. Tiny in tests, so that lines straddle
/// blocks.
const BLOCK: usize = if cfg!(test) { 16 } else { 4 << 20 };

/// What a gathered ticket costs beyond its output line: its grouping columns (three short
/// strings and their offsets) and its share of the hour's buffer.
const PER_TICKET: usize = 48;

/// Rows of Parquet built at a time in the second pass (a row group holds up to 128k).
const CHUNK_ROWS: usize = if cfg!(test) { 3 } else { 64 * 1024 };

/// Where the spills go, under `--output-dir` (on the same file system as the output, so that a
/// JSON Lines hour that one worker saw is renamed into place).
const SPILL_DIR: &str = ".spill";

/// What one worker did with its byte range of the file.
#[derive(Default)]
struct Part {
    /// Every line that starts in the range, blank ones included (to number lines).
    lines_seen: u64,
    lines: u64,
    valid: u64,
    invalid: u64,
    /// Its spills, in order.
    runs: Vec<Run>,
    /// The hours it spilled tickets of.
    hours: BTreeSet<Hour>,
    /// How many times it spilled what it had gathered.
    spills: u64,
    /// The most it held gathered at once, as counted against its share of the budget.
    peak_gathered: usize,
}

/// Processes `input` into `out_dir`, replacing what an earlier run wrote there, gathering at
/// most about `memory` bytes of tickets at a time (see the module doc).
pub async fn process_file(
    input: &Path,
    out_dir: &Path,
    routing: &Routing,
    aggregator: &Aggregator,
    format: OutputFormat,
    memory: usize,
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
    let spill_dir = out_dir.join(SPILL_DIR);
    for dir in [&tickets_dir, &counts_dir, &dead_dir] {
        clear_parts(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    remove_spills(&spill_dir)?;

    // Pass 1: the workers gather and spill; their grouping columns come back here, batch by
    // batch, and are counted as they come (a bounded channel: a worker waits for the count).
    let (tx, mut rx) = mpsc::channel::<RecordBatch>(workers as usize);
    let share = (memory / workers as usize).max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let range = (len * w / workers, len * (w + 1) / workers);
        let mut spill = Spill::new(&spill_dir, w)?;
        let (input, routing, tx) = (input.to_path_buf(), routing.clone(), tx.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            process_range(&input, range, &mut spill, &routing, share, &tx)
        }));
    }
    drop(tx);
    let mut counts = Counts::default();
    while let Some(batch) = rx.recv().await {
        counts.merge(&aggregator.count(vec![batch]).await?);
    }
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await??);
    }

    // Pass 2: one file per hour, the hours shared out between the workers.
    let runs: std::sync::Arc<Vec<Run>> =
        std::sync::Arc::new(parts.iter().flat_map(|p| p.runs.iter().cloned()).collect());
    let hours: BTreeSet<Hour> = parts.iter().flat_map(|p| p.hours.iter().copied()).collect();
    let hours: Vec<Hour> = hours.into_iter().collect();
    let mut tasks = Vec::new();
    for w in 0..workers as usize {
        let mine: Vec<Hour> = hours
            .iter()
            .skip(w)
            .step_by(workers as usize)
            .copied()
            .collect();
        let out = HourFiles {
            runs: runs.clone(),
            tickets_dir: tickets_dir.clone(),
            format,
            routing: routing.clone(),
        };
        tasks.push(tokio::task::spawn_blocking(move || out.write(&mine)));
    }
    for task in tasks {
        task.await??;
    }

    let mut report = FileReport {
        lines: 0,
        valid: 0,
        invalid: 0,
        counts,
    };
    for part in &parts {
        report.lines += part.lines;
        report.valid += part.valid;
        report.invalid += part.invalid;
    }
    if report.invalid > 0 {
        number_dead_letters(&spill_dir, &parts, &dead_dir.join("part-00000.jsonl"))?;
    }
    write(
        &counts_dir.join("latest.jsonl"),
        &report.counts.to_jsonl(routing),
    )?;
    remove_spills(&spill_dir)?;
    Ok(report)
}

/// A worker's spill directory, `SPILL_DIR/WWWWW/`: a run file per spill, and one of dead
/// letters.
struct Spill {
    dir: PathBuf,
    runs: u32,
}

/// One spill of a worker: its tickets hour after hour in one file, and beside it an index of
/// where each hour's lines are (`run-NNNNN.idx`: hour, offset, length, as three little-endian
/// 8-byte integers, in hour order). The index is read back as a stream in the second pass, so
/// that memory does not grow with runs x hours (a 10M-ticket file over two years: 200 runs
/// of 17,000 hours).
#[derive(Debug, Clone)]
struct Run {
    path: PathBuf,
    index: PathBuf,
}

/// An entry of a run's index.
const ENTRY: usize = 24;

impl Spill {
    fn new(spill_dir: &Path, worker: u64) -> anyhow::Result<Spill> {
        let dir = spill_dir.join(format!("{worker:05}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Spill { dir, runs: 0 })
    }

    fn of(spill_dir: &Path, worker: u64) -> Spill {
        Spill {
            dir: spill_dir.join(format!("{worker:05}")),
            runs: 0,
        }
    }

    fn dead_letters(&self) -> PathBuf {
        self.dir.join("dead_letters.jsonl")
    }

    /// Writes gathered lines as the next run, hour after hour.
    fn run(&mut self, pending: impl Iterator<Item = (Hour, Vec<u8>)>) -> anyhow::Result<Run> {
        let path = self.dir.join(format!("run-{:05}.jsonl", self.runs));
        self.runs += 1;
        let mut hours: Vec<(Hour, Vec<u8>)> = pending.collect();
        hours.sort_unstable_by_key(|(hour, _)| *hour);
        let error = || format!("cannot write {}", path.display());
        let mut out = BufWriter::new(File::create(&path).with_context(error)?);
        let index = path.with_extension("idx");
        let mut idx = BufWriter::new(File::create(&index).with_context(error)?);
        let mut offset = 0u64;
        for (hour, lines) in hours {
            out.write_all(&lines).with_context(error)?;
            let len = lines.len() as u64;
            let mut entry = [0u8; ENTRY];
            entry[..8].copy_from_slice(&(hour.start().timestamp() / 3600).to_le_bytes());
            entry[8..16].copy_from_slice(&offset.to_le_bytes());
            entry[16..].copy_from_slice(&len.to_le_bytes());
            idx.write_all(&entry).with_context(error)?;
            offset += len;
        }
        out.flush().with_context(error)?;
        idx.flush().with_context(error)?;
        Ok(Run { path, index })
    }

    /// Appends to a spill file.
    fn append(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A worker's gathered tickets: their output lines by hour, and their grouping columns.
struct Gathered<'a> {
    spill: &'a mut Spill,
    pending: HashMap<Hour, Vec<u8>>,
    /// What `pending` and `columns` hold, as counted against `share`.
    bytes: usize,
    share: usize,
    columns: Columns,
    valid: u64,
    /// Dead letters not spilled yet (a worker's are spilled with its tickets).
    dead: Vec<u8>,
    counted: &'a mpsc::Sender<RecordBatch>,
}

impl Gathered<'_> {
    fn push(&mut self, routing: &Routing, ticket: &TicketRef<'_>) {
        let team = routing.team_for(ticket.request_type());
        let lines = self
            .pending
            .entry(Hour::of(&ticket.created_at()))
            .or_default();
        let before = lines.capacity();
        ticket.write_with_team(team, lines);
        lines.push(b'\n');
        // What the buffer holds from the allocator, not just its bytes.
        self.bytes += lines.capacity() - before + PER_TICKET;
        self.columns
            .push(ticket.request_type(), ticket.priority().as_str(), team);
        self.valid += 1;
    }

    fn push_dead(&mut self, line: u64, error: &str, raw: &str) {
        let before = self.dead.len();
        // A struct of strings and an integer always serializes into a Vec.
        let letter = DeadLetter {
            line,
            error: Cow::Borrowed(error),
            raw: Cow::Borrowed(raw),
        };
        let _ = serde_json::to_writer(&mut self.dead, &letter);
        self.dead.push(b'\n');
        self.bytes += self.dead.len() - before;
    }

    fn full(&self) -> bool {
        self.bytes >= self.share
    }

    /// Appends each hour's lines to its spill file, the dead letters to theirs, and sends the
    /// grouping columns to be counted.
    fn spill(&mut self, part: &mut Part) -> anyhow::Result<()> {
        part.peak_gathered = part.peak_gathered.max(self.bytes);
        if self.bytes == 0 {
            return Ok(());
        }
        part.spills += 1;
        if !self.pending.is_empty() {
            part.hours.extend(self.pending.keys().copied());
            part.runs.push(self.spill.run(self.pending.drain())?);
        }
        if !self.dead.is_empty() {
            Spill::append(&self.spill.dead_letters(), &self.dead)?;
            self.dead.clear();
        }
        if self.valid > 0 {
            let batch = std::mem::take(&mut self.columns).finish();
            self.counted
                .blocking_send(batch)
                .map_err(|_| anyhow::anyhow!("the count of the tickets stopped"))?;
        }
        part.valid += std::mem::take(&mut self.valid);
        self.bytes = 0;
        Ok(())
    }
}

/// Processes the lines that start in `start..end` of the file: gathers, spills (pass 1).
fn process_range(
    input: &Path,
    (start, end): (u64, u64),
    spill: &mut Spill,
    routing: &Routing,
    share: usize,
    counted: &mpsc::Sender<RecordBatch>,
) -> anyhow::Result<Part> {
    let read_error = || format!("cannot read {}", input.display());
    let mut file = File::open(input).with_context(read_error)?;
    // From one byte early: the line that starts the range is the one after the first newline.
    let mut pos = start.saturating_sub(1);
    file.seek(SeekFrom::Start(pos)).with_context(read_error)?;
    let mut skipping = start > 0;

    let mut part = Part::default();
    let mut gathered = Gathered {
        spill,
        pending: HashMap::new(),
        bytes: 0,
        share,
        columns: Columns::default(),
        valid: 0,
        dead: Vec::new(),
        counted,
    };
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
            process_line(line, routing, &mut gathered, &mut part);
            used = next;
            if gathered.full() {
                gathered.spill(&mut part)?;
            }
        }
        buf.drain(..used);
        pos += used as u64;
    }
    gathered.spill(&mut part)?;
    Ok(part)
}

fn process_line(line: &[u8], routing: &Routing, gathered: &mut Gathered<'_>, part: &mut Part) {
    let index = part.lines_seen;
    part.lines_seen += 1;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // blank lines separate nothing in JSON Lines
    }
    part.lines += 1;
    match ticket_core::validate::decode_ref(line) {
        Ok(ticket) => gathered.push(routing, &ticket),
        Err(reason) => {
            part.invalid += 1;
            let raw = String::from_utf8_lossy(line);
            gathered.push_dead(index, &reason.to_string(), &raw);
        }
    }
}

/// Pass 2: hours' files from the pieces of them in the workers' runs.
struct HourFiles {
    /// Every worker's runs, worker after worker: input order.
    runs: std::sync::Arc<Vec<Run>>,
    tickets_dir: PathBuf,
    format: OutputFormat,
    routing: Routing,
}

/// A run's index, read forward: hours are asked for in ascending order.
struct Cursor {
    index: BufReader<File>,
    path: PathBuf,
    /// The entry read last and not passed yet.
    next: Option<(Hour, u64, u64)>,
    done: bool,
}

impl Cursor {
    fn open(run: &Run) -> anyhow::Result<Cursor> {
        let file = File::open(&run.index)
            .with_context(|| format!("cannot read {}", run.index.display()))?;
        Ok(Cursor {
            index: BufReader::new(file),
            path: run.index.clone(),
            next: None,
            done: false,
        })
    }

    /// Where `hour`'s lines are in the run, if it has any; hours asked for must ascend.
    fn find(&mut self, hour: Hour) -> anyhow::Result<Option<(u64, u64)>> {
        loop {
            if self.next.is_none() && !self.done {
                let mut entry = [0u8; ENTRY];
                match self.index.read_exact(&mut entry) {
                    Ok(()) => {
                        let word = |i: usize| {
                            let mut w = [0u8; 8];
                            w.copy_from_slice(&entry[i..i + 8]);
                            w
                        };
                        self.next = Some((
                            Hour::from_millis(
                                i64::from_le_bytes(word(0)).saturating_mul(3_600_000),
                            ),
                            u64::from_le_bytes(word(8)),
                            u64::from_le_bytes(word(16)),
                        ));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => self.done = true,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("cannot read {}", self.path.display()));
                    }
                }
            }
            match self.next {
                Some((h, _, _)) if h < hour => self.next = None,
                Some((h, offset, len)) if h == hour => {
                    self.next = None;
                    return Ok(Some((offset, len)));
                }
                _ => return Ok(None),
            }
        }
    }
}

/// Bytes copied at a time from a run into a JSON Lines hour file.
const COPY: usize = 1 << 20;

impl HourFiles {
    fn write(&self, hours: &[Hour]) -> anyhow::Result<()> {
        let files: Vec<File> = self
            .runs
            .iter()
            .map(|r| {
                File::open(&r.path).with_context(|| format!("cannot read {}", r.path.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut cursors: Vec<Cursor> = self
            .runs
            .iter()
            .map(Cursor::open)
            .collect::<anyhow::Result<_>>()?;
        let mut buf = Vec::new();
        for &hour in hours {
            let mut at = Vec::new();
            for c in &mut cursors {
                at.push(c.find(hour)?);
            }
            let dir = self.tickets_dir.join(hour.path());
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join(format!("part-00000.{}", self.format.extension()));
            let error = || format!("cannot write {}", path.display());
            let mut out = BufWriter::new(File::create(&path).with_context(error)?);
            let pieces = self
                .runs
                .iter()
                .zip(&files)
                .zip(at)
                .filter_map(|((r, f), at)| Some((r, f, at?)));
            match self.format {
                OutputFormat::Jsonl => {
                    for (run, file, (offset, len)) in pieces {
                        let mut done = 0;
                        while done < len {
                            let n = (len - done).min(COPY as u64) as usize;
                            buf.resize(n, 0);
                            file.read_exact_at(&mut buf, offset + done)
                                .with_context(|| format!("cannot read {}", run.path.display()))?;
                            out.write_all(&buf).with_context(error)?;
                            done += n as u64;
                        }
                    }
                    out.flush().with_context(error)?;
                }
                OutputFormat::Parquet => {
                    let mut w = ObjectWriter::new(OutputFormat::Parquet, out)?;
                    for (run, file, (offset, len)) in pieces {
                        buf.resize(len as usize, 0);
                        file.read_exact_at(&mut buf, offset)
                            .with_context(|| format!("cannot read {}", run.path.display()))?;
                        self.parquet_rows(&buf, &run.path, &mut w)?;
                    }
                    let out = w.finish().context("cannot finish a ticket file")?;
                    out.into_inner()
                        .map_err(|e| e.into_error())
                        .with_context(error)?;
                }
            }
        }
        Ok(())
    }

    /// A piece's lines (our own JSON Lines output) decoded again into Parquet rows, a chunk of
    /// rows at a time.
    fn parquet_rows(
        &self,
        piece: &[u8],
        run: &Path,
        w: &mut ObjectWriter<BufWriter<File>>,
    ) -> anyhow::Result<()> {
        let mut rows = Rows::new(OutputFormat::Parquet);
        let mut in_chunk = 0;
        for line in piece.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let ticket = ticket_core::validate::decode_ref(line)
                .with_context(|| format!("a spilled ticket of {} is damaged", run.display()))?;
            rows.push(&ticket, self.routing.team_for(ticket.request_type()));
            in_chunk += 1;
            if in_chunk == CHUNK_ROWS {
                w.write(std::mem::replace(
                    &mut rows,
                    Rows::new(OutputFormat::Parquet),
                ))
                .context("cannot write a ticket file")?;
                in_chunk = 0;
            }
        }
        if in_chunk > 0 {
            w.write(rows).context("cannot write a ticket file")?;
        }
        Ok(())
    }
}

/// The dead letters from the workers' spills, in input order, numbered through the file.
fn number_dead_letters(spill_dir: &Path, parts: &[Part], path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::new(
        File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    );
    let mut first_line = 1;
    for (w, part) in parts.iter().enumerate() {
        let spill = Spill::of(spill_dir, w as u64).dead_letters();
        if part.invalid > 0 {
            let r = BufReader::new(
                File::open(&spill).with_context(|| format!("cannot read {}", spill.display()))?,
            );
            for l in r.lines() {
                let l = l?;
                let d: DeadLetter<'_> = serde_json::from_str(&l).with_context(|| {
                    format!("a spilled dead letter of {} is damaged", spill.display())
                })?;
                serde_json::to_writer(
                    &mut out,
                    &DeadLetter {
                        line: first_line + d.line,
                        ..d
                    },
                )?;
                out.write_all(b"\n")?;
            }
        }
        first_line += part.lines_seen;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the spill directory (of this run, or of one that was killed).
fn remove_spills(spill_dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(spill_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", spill_dir.display()))
        }
        _ => Ok(()),
    }
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

/// The Parquet files under `dir`'s `date=YYYY-MM-DD/hour=HH/` folders, with their hour.
pub fn hour_files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Hour)>> {
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
        names.sort();
        names
    }

    /// The ticket ids in a ticket file of either format, in file order.
    fn ids_in(path: &Path) -> Vec<String> {
        if path.extension().is_some_and(|x| x == "parquet") {
            use datafusion::arrow::array::{Array, StringArray};
            use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let f = File::open(path).expect("open");
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .and_then(|b| b.build())
                .expect("a Parquet file");
            let mut ids = Vec::new();
            for batch in reader {
                let batch = batch.expect("batch");
                let col = batch.column_by_name("ticket_id").expect("ticket_id");
                let col = col.as_any().downcast_ref::<StringArray>().expect("strings");
                ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
            }
            ids
        } else {
            std::fs::read_to_string(path)
                .expect("read")
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["ticket_id"]
                        .as_str()
                        .expect("id")
                        .to_string()
                })
                .collect()
        }
    }

    fn ticket(id: &str, created_at: &str) -> String {
        format!(
            r#"{{"ticket_id":"{id}","client_id":1,"created_at":"{created_at}","request":"r","request_type":"billing","priority":"low"}}"#
        )
    }

    /// Tickets land in the folder of the UTC hour of their created_at, offsets converted.
    #[tokio::test]
    async fn tickets_go_to_the_utc_hour_they_were_created_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        let lines = [
            ticket("A", "2025-03-01T10:15:00"),
            ticket("B", "2025-03-01T12:59:59+01:00"),
            ticket("C", "2025-03-01T23:30:00-02:00"),
            ticket("D", "2025-03-01T10:45:00Z"),
        ];
        std::fs::write(&input, lines.join("\n")).expect("write");
        let out = dir.path().join("out");
        let r = process_file(
            &input,
            &out,
            &Routing::default(),
            &Aggregator::default(),
            OutputFormat::Jsonl,
            1,
        )
        .await
        .expect("runs");
        assert_eq!(r.valid, 4);
        let tickets = out.join("tickets_with_team");
        assert_eq!(
            read_dir_names(&tickets),
            [
                "date=2025-03-01/hour=10/part-00000.jsonl",
                "date=2025-03-01/hour=11/part-00000.jsonl",
                "date=2025-03-02/hour=01/part-00000.jsonl",
            ]
        );
        assert_eq!(
            ids_in(&tickets.join("date=2025-03-01/hour=10/part-00000.jsonl")),
            ["A", "D"]
        );
        assert!(!out.join(SPILL_DIR).exists(), "the spills are removed");
    }

    /// Tickets over `hours` hours in no order, with an invalid line after every 97th: the
    /// file's text, and each hour's ticket ids in input order.
    fn shuffled(hours: u64) -> (String, HashMap<String, Vec<String>>) {
        let mut text = String::new();
        let mut expected: HashMap<String, Vec<String>> = HashMap::new();
        for i in 0..600u64 {
            // Jumps between hours in no order (7919 is prime to the hours).
            let h = (i * 7919) % hours;
            let at = format!("2025-03-{:02}T{:02}:{:02}:00Z", 1 + h / 24, h % 24, i % 60);
            let id = format!("T-{i}");
            let hour = Hour::of(&ticket_core::validate::parse_timestamp(&at).expect("time"));
            expected.entry(hour.path()).or_default().push(id.clone());
            text += &ticket(&id, &at);
            text.push('\n');
            if i % 97 == 0 {
                text += "not a ticket\n";
            }
        }
        (text, expected)
    }

    /// A file in no order, spread over many hours, gathered in a budget far below its size:
    /// one file per hour in either format, each ticket once and in the file of its hour, in
    /// input order; the dead letters numbered through the file.
    #[tokio::test]
    async fn one_file_per_hour_in_any_order_within_the_memory_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        let hours = 40;
        let (text, expected) = shuffled(hours);
        std::fs::write(&input, &text).expect("write");
        let budget = 2_000;
        assert!(
            text.len() > 20 * budget,
            "the budget is far below the input"
        );
        for format in [OutputFormat::Jsonl, OutputFormat::Parquet] {
            let out = dir.path().join(format!("out-{}", format.extension()));
            let r = process_file(
                &input,
                &out,
                &Routing::default(),
                &Aggregator::default(),
                format,
                budget,
            )
            .await
            .expect("runs");
            assert_eq!((r.valid, r.invalid), (600, 7));
            assert_eq!(r.counts.total(), 600, "every ticket counted once");
            let tickets = out.join("tickets_with_team");
            let names = read_dir_names(&tickets);
            assert_eq!(names.len(), hours as usize, "one file per hour: {names:?}");
            for name in names {
                let (hour, file) = name.rsplit_once('/').expect("a folder");
                assert_eq!(file, format!("part-00000.{}", format.extension()));
                assert_eq!(
                    ids_in(&tickets.join(&name)),
                    expected[hour],
                    "{hour}: every ticket once, in input order"
                );
            }
            let dead = std::fs::read_to_string(out.join("dead_letters/part-00000.jsonl"))
                .expect("dead letters");
            let numbers: Vec<u64> = dead
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["line"]
                        .as_u64()
                        .expect("line")
                })
                .collect();
            // Ticket 97k is on line 97k + k + 1 (k invalid lines before it); its invalid
            // line follows.
            let want: Vec<u64> = (0..7u64).map(|k| 97 * k + k + 2).collect();
            assert_eq!(numbers, want);
        }
    }

    /// The bound, for one worker: it spills many times, never holding more than its share
    /// and the growth of one buffer (counted as allocated, a buffer grows by doubling), and
    /// sends each spill's grouping columns to be counted (none kept).
    #[test]
    fn a_worker_never_holds_more_than_its_share() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.jsonl");
        let (text, _) = shuffled(40);
        std::fs::write(&input, &text).expect("write");
        let share = 2_000;
        let mut spill = Spill::new(&dir.path().join("spill"), 0).expect("spill");
        let (tx, mut rx) = mpsc::channel(10_000);
        let len = text.len() as u64;
        let part = process_range(
            &input,
            (0, len),
            &mut spill,
            &Routing::default(),
            share,
            &tx,
        )
        .expect("runs");
        drop(tx);
        let mut batches = 0;
        while rx.try_recv().is_ok() {
            batches += 1;
        }
        assert!(part.spills > 20, "{} spills", part.spills);
        assert_eq!(
            batches, part.spills,
            "each spill's columns sent to be counted"
        );
        let longest = text.lines().map(str::len).max().unwrap_or(0) * 2 + PER_TICKET;
        assert!(
            part.peak_gathered < 2 * share + longest,
            "held {} against a share of {share}",
            part.peak_gathered
        );
    }

    /// Every cut of a file into two ranges processes each line exactly once and numbers it
    /// right, whatever the ranges' sizes relative to the lines (blank lines, CRLF, no final
    /// newline).
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
            let out = dir.path().join(format!("out-{cut}"));
            let spill_dir = out.join(SPILL_DIR);
            let (tx, _rx) = mpsc::channel(100);
            let parts: Vec<Part> = [(0, cut), (cut, len)]
                .into_iter()
                .enumerate()
                .map(|(w, range)| {
                    let mut spill = Spill::new(&spill_dir, w as u64).expect("spill");
                    process_range(&input, range, &mut spill, &Routing::default(), 1, &tx)
                        .expect("runs")
                })
                .collect();
            let runs: Vec<Run> = parts.iter().flat_map(|p| p.runs.clone()).collect();
            let hours: BTreeSet<Hour> = parts.iter().flat_map(|p| p.hours.clone()).collect();
            let files = HourFiles {
                runs: std::sync::Arc::new(runs),
                tickets_dir: out.join("tickets"),
                format: OutputFormat::Jsonl,
                routing: Routing::default(),
            };
            files
                .write(&hours.into_iter().collect::<Vec<_>>())
                .expect("hour files");
            let ids: Vec<String> = read_dir_names(&out.join("tickets"))
                .iter()
                .flat_map(|n| ids_in(&out.join("tickets").join(n)))
                .collect();
            assert_eq!(ids, ["A", "B", "C", "D"], "cut at {cut}");
            let dead_path = out.join("dead.jsonl");
            number_dead_letters(&spill_dir, &parts, &dead_path).expect("dead letters");
            let dead: Vec<(u64, String)> = std::fs::read_to_string(&dead_path)
                .expect("dead")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("json");
                    (
                        v["line"].as_u64().expect("line"),
                        v["raw"].as_str().expect("raw").to_string(),
                    )
                })
                .collect();
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
        let run = |format| {
            let (input, out) = (input.clone(), out.clone());
            async move {
                process_file(
                    &input,
                    &out,
                    &Routing::default(),
                    &Aggregator::default(),
                    format,
                    1 << 20,
                )
                .await
                .expect("runs")
            }
        };
        for _ in 0..2 {
            let r = run(OutputFormat::Jsonl).await;
            assert_eq!((r.lines, r.valid, r.invalid), (3, 2, 1));
        }
        // Another format, an earlier version's flat part file and a killed run's spills:
        // replaced by the next run.
        std::fs::write(out.join("tickets_with_team/part-00007.jsonl"), good).expect("write");
        std::fs::create_dir_all(out.join(SPILL_DIR).join("00003")).expect("spill dir");
        for format in [OutputFormat::Parquet, OutputFormat::Jsonl] {
            assert_eq!(run(format).await.valid, 2);
        }
        let tickets = out.join("tickets_with_team");
        assert_eq!(
            read_dir_names(&tickets),
            ["date=2025-03-01/hour=10/part-00000.jsonl"],
            "the earlier runs' files are gone"
        );
        assert!(!out.join(SPILL_DIR).exists());
        let text =
            std::fs::read_to_string(tickets.join("date=2025-03-01/hour=10/part-00000.jsonl"))
                .expect("read");
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"support_team\":\"Billing Team\""));
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
