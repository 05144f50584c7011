//! `process-file`: the same processing on a JSON Lines file, into the same layout under a
//! local directory. For backfills, for trying the pipeline without any service, and for the
//! benchmark against the original.
//!
//! ```text
//! DIR/tickets_with_team/part-00000.jsonl ...   valid tickets with support_team
//!                                              (part-00000.parquet ... with --output-format parquet)
//! DIR/counts_by_request_type/latest.jsonl      one line per request type
//! DIR/dead_letters/part-00000.jsonl            {"line": N, "error": "...", "raw": "..."}
//! ```
//!
//! A file has no Kafka timestamps, so its tickets are not split into `date=`/`hour=` folders.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use datafusion::arrow::array::RecordBatch;
use serde::Serialize;
use ticket_core::Routing;
use ticket_core::counts::Counts;

use ticket_engine::aggregate::Aggregator;
use ticket_engine::enrich::BatchBuilder;
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
/// The file is cut into one byte range per core; each worker streams its range in blocks
/// and writes its own `part-NNNNN.{jsonl,parquet}`, so memory does not grow with the file. A
/// line belongs to the range in which it starts.
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
                let out = tickets_dir.join(format!("part-{w:05}.{}", format.extension()));
                s.spawn(move || process_range(input, range, &out, routing, format))
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

/// Processes the lines that start in `start..end` of the file into `out`.
fn process_range(
    input: &Path,
    (start, end): (u64, u64),
    out: &Path,
    routing: &Routing,
    format: OutputFormat,
) -> anyhow::Result<Part> {
    let read_error = || format!("cannot read {}", input.display());
    let mut file = File::open(input).with_context(read_error)?;
    // From one byte early: the line that starts the range is the one after the first newline.
    let mut pos = start.saturating_sub(1);
    file.seek(SeekFrom::Start(pos)).with_context(read_error)?;
    let mut skipping = start > 0;

    let mut part = Part::default();
    let mut builder = BatchBuilder::new(format);
    let mut writer: Option<ObjectWriter<BufWriter<File>>> = None;
    let write_error = || format!("cannot write {}", out.display());
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
            process_line(line, routing, &mut builder, &mut part);
            used = next;
        }

        if builder.valid > part.valid {
            part.valid = builder.valid;
            let w = match &mut writer {
                Some(w) => w,
                None => {
                    let file = File::create(out).with_context(write_error)?;
                    writer.insert(ObjectWriter::new(format, BufWriter::new(file))?)
                }
            };
            let rows = std::mem::replace(&mut builder.rows, Rows::new(format));
            w.write(rows).with_context(write_error)?;
            part.columns
                .push(std::mem::take(&mut builder.columns).finish());
        }
        buf.drain(..used);
        pos += used as u64;
    }
    if let Some(w) = writer {
        w.finish()
            .and_then(|f| f.into_inner().map_err(|e| e.into_error().into()))
            .with_context(write_error)?;
    }
    Ok(part)
}

fn process_line(line: &[u8], routing: &Routing, builder: &mut BatchBuilder, part: &mut Part) {
    let index = part.lines_seen;
    part.lines_seen += 1;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // blank lines separate nothing in JSON Lines
    }
    part.lines += 1;
    if let Err(reason) = builder.push(routing, line) {
        let raw = String::from_utf8_lossy(line).into_owned();
        part.dead.push((index, reason.to_string(), raw));
    }
}

fn write(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the `.jsonl` and `.parquet` files a previous run left, so a rerun replaces rather
/// than adds (in either format).
fn clear_parts(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.path()
            .extension()
            .is_some_and(|x| x == "jsonl" || x == "parquet")
        {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                let out = dir.path().join(format!("out-{i}"));
                let _ = std::fs::remove_file(&out);
                let part = process_range(
                    &input,
                    range,
                    &out,
                    &Routing::default(),
                    OutputFormat::Jsonl,
                )
                .expect("runs");
                ids += &std::fs::read_to_string(&out).unwrap_or_default();
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
        let tickets: String = std::fs::read_dir(out.join("tickets_with_team"))
            .expect("dir")
            .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
            .collect();
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
