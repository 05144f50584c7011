//! `process-file`: the same processing on a JSON Lines file, into the same layout under a
//! local directory. For backfills, for trying the pipeline without any service, and for the
//! benchmark against the original.
//!
//! ```text
//! DIR/tickets_with_team/part-00000.jsonl ...   valid tickets with support_team
//! DIR/counts_by_request_type/latest.jsonl      one line per request type
//! DIR/dead_letters/part-00000.jsonl            {"line": N, "error": "...", "raw": "..."}
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use ticket_core::Routing;
use ticket_core::counts::Counts;

use crate::aggregate::Aggregator;
use crate::enrich::BatchBuilder;

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
    error: String,
    raw: std::borrow::Cow<'a, str>,
}

struct Chunk {
    builder: BatchBuilder,
    dead: Vec<u8>,
    lines: u64,
    invalid: u64,
}

/// Processes `input` into `out_dir`, replacing what an earlier run wrote there.
pub async fn process_file(
    input: &Path,
    out_dir: &Path,
    routing: &Routing,
    aggregator: &Aggregator,
) -> anyhow::Result<FileReport> {
    let data = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let ranges = split_lines(&data, workers);

    // Decoding, routing and serializing are CPU work: one thread per chunk of lines.
    let chunks: Vec<Chunk> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|&(start, end, first_line)| {
                let data = &data[start..end];
                s.spawn(move || process_chunk(data, first_line, routing))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });

    let tickets_dir = out_dir.join("tickets_with_team");
    let counts_dir = out_dir.join("counts_by_request_type");
    let dead_dir = out_dir.join("dead_letters");
    for dir in [&tickets_dir, &counts_dir, &dead_dir] {
        clear_jsonl(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let mut report = FileReport {
        lines: 0,
        valid: 0,
        invalid: 0,
        counts: Counts::default(),
    };
    let mut columns = Vec::new();
    let mut dead_all = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        report.lines += chunk.lines;
        report.valid += chunk.builder.valid;
        report.invalid += chunk.invalid;
        if chunk.builder.valid > 0 {
            write(
                &tickets_dir.join(format!("part-{i:05}.jsonl")),
                &chunk.builder.body,
            )?;
        }
        dead_all.extend_from_slice(&chunk.dead);
        columns.push(chunk.builder.columns.finish());
    }
    if !dead_all.is_empty() {
        write(&dead_dir.join("part-00000.jsonl"), &dead_all)?;
    }
    report.counts = aggregator.count(columns).await?;
    write(
        &counts_dir.join("latest.jsonl"),
        &report.counts.to_jsonl(routing),
    )?;
    Ok(report)
}

fn process_chunk(data: &[u8], first_line: u64, routing: &Routing) -> Chunk {
    let mut chunk = Chunk {
        builder: BatchBuilder::default(),
        dead: Vec::new(),
        lines: 0,
        invalid: 0,
    };
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue; // blank lines separate nothing in JSON Lines
        }
        chunk.lines += 1;
        if let Err(reason) = chunk.builder.push(routing, line) {
            chunk.invalid += 1;
            let dl = DeadLetter {
                line: first_line + i as u64,
                error: reason.to_string(),
                raw: String::from_utf8_lossy(line),
            };
            let _ = serde_json::to_writer(&mut chunk.dead, &dl);
            chunk.dead.push(b'\n');
        }
    }
    chunk
}

/// Cuts `data` into about `n` ranges on line boundaries: (start, end, number of first line).
fn split_lines(data: &[u8], n: usize) -> Vec<(usize, usize, u64)> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut line = 1u64;
    for k in 1..=n {
        if start >= data.len() {
            break;
        }
        let mut end = if k == n {
            data.len()
        } else {
            (data.len() * k / n).max(start)
        };
        if end < data.len() {
            end = data[end..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(data.len(), |p| end + p + 1);
        }
        ranges.push((start, end, line));
        line += data[start..end].iter().filter(|b| **b == b'\n').count() as u64;
        start = end;
    }
    ranges
}

fn write(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the `.jsonl` files a previous run left, so a rerun replaces rather than adds.
fn clear_jsonl(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "jsonl") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_keeps_every_line_once_and_numbers_them() {
        let data = b"a\nbb\nccc\ndddd\ne";
        for n in 1..6 {
            let ranges = split_lines(data, n);
            let joined: Vec<u8> = ranges
                .iter()
                .flat_map(|&(s, e, _)| data[s..e].to_vec())
                .collect();
            assert_eq!(joined, data.to_vec(), "n={n}");
            for &(s, _, line) in &ranges {
                assert_eq!(
                    line,
                    1 + data[..s].iter().filter(|b| **b == b'\n').count() as u64
                );
            }
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
            let r = process_file(&input, &out, &Routing::default(), &Aggregator::default())
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
