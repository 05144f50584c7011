//! The Delta table's totals: a GROUP BY over the data files of its latest snapshot, each file
//! read once (data files never change; a compaction's or vacuum's removals are forgotten), and
//! a file this process committed not even once: its batch counted it when it was written.

use std::collections::{HashMap, HashSet};

use anyhow::anyhow;
use futures::future::BoxFuture;
use ticket_commit::{Failure, Retrier, Totals};
use ticket_core::counts::Counts;
use ticket_engine::aggregate::Aggregator;

use crate::committer::TableSink;

/// [`Totals`] of the Delta table.
pub struct TableTotals {
    sink: TableSink,
    per_file: HashMap<String, Counts>,
    aggregator: Aggregator,
}

impl TableTotals {
    pub fn new(sink: TableSink) -> TableTotals {
        TableTotals {
            sink,
            per_file: HashMap::new(),
            aggregator: Aggregator::default(),
        }
    }

    async fn sum(&mut self, retry: &Retrier) -> Result<Counts, Failure> {
        let table = &self.sink.table;
        let files = retry.run("read the Delta table", || table.files()).await?;
        let live: HashSet<&String> = files.iter().map(|f| &f.path).collect();
        {
            let mut counted = self.sink.counted.lock().expect("counted");
            let mut replaced = self.sink.replaced.lock().expect("replaced");
            // Committed by this process: counted when it was written. Taken for every live
            // file, even one read back already (its commit's answer came after that refresh),
            // so that nothing is left behind; and for the files a compaction replaced.
            let olds = replaced.values().flatten();
            for path in live.iter().copied().chain(olds) {
                if let Some(counts) = counted.remove(path) {
                    self.per_file.insert(path.clone(), counts);
                }
            }
            // A file this process's compaction made holds what the files it replaced held:
            // their counts added up, when all are known (a compacted hour is not read back).
            for (new, olds) in replaced.iter() {
                if !live.contains(new) || self.per_file.contains_key(new) {
                    continue;
                }
                let mut sum = Counts::default();
                let known = olds.iter().all(|o| match self.per_file.get(o) {
                    Some(c) => {
                        sum.merge(c);
                        true
                    }
                    None => false,
                });
                if known {
                    self.per_file.insert(new.clone(), sum);
                }
            }
            replaced.retain(|new, _| !live.contains(new));
        }
        // A compaction or vacuum takes files out of the snapshot.
        self.per_file.retain(|path, _| live.contains(path));
        for file in &files {
            if self.per_file.contains_key(&file.path) {
                continue;
            }
            let aggregator = &self.aggregator;
            let counted = retry
                .run("read a Delta data file", || {
                    table.count_file(file, aggregator)
                })
                .await?;
            let Some(counts) = counted else {
                return Err(Failure::Fatal(anyhow!(
                    "the Delta table's snapshot refers to {}{}, which is not in the bucket",
                    self.sink.root,
                    file.path
                )));
            };
            self.per_file.insert(file.path.clone(), counts);
        }
        let mut total = Counts::default();
        for counts in self.per_file.values() {
            total.merge(counts);
        }
        Ok(total)
    }
}

impl Totals for TableTotals {
    fn total<'a>(&'a mut self, retry: &'a Retrier) -> BoxFuture<'a, Result<Counts, Failure>> {
        Box::pin(self.sum(retry))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The totals of the Delta table (a GROUP BY over its data files) refreshed through a
    //! crash at every request and an outage from every request, the log and the data files in
    //! one in-memory store with one fault: never a fatal error, and the totals a refresh after
    //! the fault finds are those a refresh without it finds.

    use bytes::Bytes;
    use ticket_core::counts::{CountRow, Counts};
    use ticket_core::keys::Hour;
    use ticket_core::validate::decode_ref;
    use ticket_engine::output::{OutputFormat, Rows};
    use ticket_s3::store::memory::Fault;

    use ticket_commit::{Batch, Committer, Object};
    use ticket_core::Routing;

    use super::*;
    use crate::committer::TableCommitter;
    use crate::committer::testing::{Bucket, bucket, open, retrier};

    const TYPES: [&str; 3] = ["billing", "technical", "other"];

    /// A batch of valid tickets `first..=last` in one hour, their types in turn, as Parquet.
    fn batch(routing: &Routing, first: i64, last: i64) -> Batch {
        batch_at(routing, first, last, Hour::from_millis(first * 3_600_000))
    }

    /// The same in `hour`.
    pub(crate) fn batch_at(routing: &Routing, first: i64, last: i64, hour: Hour) -> Batch {
        let mut rows = Rows::new(OutputFormat::Parquet);
        let mut counts = Counts::default();
        for o in first..=last {
            let kind = TYPES[o as usize % TYPES.len()];
            let json = format!(
                r#"{{"ticket_id":"T-{o}","client_id":{o},"created_at":"2025-03-01T10:00:00Z","request":"Help","request_type":"{kind}","priority":"low"}}"#
            );
            let ticket = decode_ref(json.as_bytes()).expect("a valid ticket");
            rows.push(&ticket, routing.team_for(kind));
            counts.add(&CountRow {
                request_type: kind.into(),
                priority: "low".into(),
                support_team: routing.team_for(kind).into(),
                count: 1,
            });
        }
        let body = Bytes::from(rows.into_object().expect("parquet"));
        Batch {
            first,
            last,
            objects: vec![Object {
                hour,
                first,
                last,
                tickets: (last - first + 1) as u64,
                body,
            }],
            extension: "parquet",
            valid: (last - first + 1) as u64,
            dead_letters: 0,
            counts,
            steps: Default::default(),
        }
    }

    /// A table of three committed batches of partition 0 (30 tickets).
    async fn table(routing: &Routing) -> Bucket {
        let b = bucket();
        let sink = open(&b).await.expect("create");
        let retry = retrier(&b, &sink, false);
        let mut c = TableCommitter::new(sink, b.store.clone(), 0, retry);
        c.recover().await.expect("recover");
        for (first, last) in [(0, 9), (10, 19), (20, 29)] {
            Committer::commit(&mut c, batch(routing, first, last))
                .await
                .expect("commit");
        }
        b
    }

    /// The totals as a processor just started finds them.
    async fn total_once(b: &Bucket) -> Result<Counts, Failure> {
        let sink = open(b).await.map_err(|e| Failure::Fatal(e.into()))?;
        let retry = retrier(b, &sink, false);
        TableTotals::new(sink).total(&retry).await
    }

    #[tokio::test]
    async fn files_this_process_committed_are_counted_without_reading_them_back() {
        let routing = Routing::default();
        let b = bucket();
        let sink = open(&b).await.expect("create");
        let retry = retrier(&b, &sink, false);
        let mut c = TableCommitter::new(sink.clone(), b.store.clone(), 0, retry.clone());
        c.recover().await.expect("recover");
        for (first, last) in [(0, 9), (10, 19), (20, 29)] {
            Committer::commit(&mut c, batch(&routing, first, last))
                .await
                .expect("commit");
        }
        let expected = total_once(&b).await.expect("totals read from the files");
        // The data files gone from the bucket: only counts kept at commit can add up.
        for f in sink.table.files().await.expect("files") {
            let key = format!("{}{}", sink.root, f.path);
            b.store.delete(&key).await.expect("delete");
        }
        let mut totals = TableTotals::new(sink.clone());
        assert_eq!(totals.total(&retry).await.expect("totals"), expected);
        assert!(
            sink.counted.lock().expect("counted").is_empty(),
            "taken once"
        );
        assert!(
            total_once(&b).await.is_err(),
            "another process reads the files, which are gone"
        );
    }

    #[tokio::test]
    async fn the_tables_totals_come_through_a_crash_or_an_outage_at_every_request() {
        let routing = Routing::default();
        let clean = table(&routing).await;
        clean.mem.inject(None);
        let expected = total_once(&clean).await.expect("totals without faults");
        assert_eq!(expected.total(), 30);
        let jsonl = String::from_utf8_lossy(&expected.to_jsonl(&routing)).into_owned();
        assert!(jsonl.contains("\"count\":10"), "{jsonl}");
        let n = clean.mem.requests();
        assert!(n > 5, "{n} requests");
        for at in 1..=n {
            for fault in [
                Fault::CrashAt(at),
                Fault::Outage {
                    from: at,
                    count: 10,
                },
            ] {
                let b = table(&routing).await;
                // The table is opened before the fault: a refresh of a running processor.
                let sink = open(&b).await.expect("open");
                let dying = matches!(fault, Fault::CrashAt(_));
                let retry = retrier(&b, &sink, dying);
                let mut totals = TableTotals::new(sink);
                b.mem.inject(Some(fault));
                match (fault, totals.total(&retry).await) {
                    (_, Ok(got)) => assert_eq!(got, expected, "{fault:?}: the totals"),
                    (Fault::CrashAt(_), Err(Failure::Aborted)) => {}
                    (fault, got) => panic!("{fault:?}: {got:?}"),
                }
                b.mem.inject(None);
                let after = total_once(&b)
                    .await
                    .unwrap_or_else(|e| panic!("{fault:?}, then a refresh: {e}"));
                assert_eq!(after, expected, "{fault:?}: the totals after it");
            }
        }
    }
}
