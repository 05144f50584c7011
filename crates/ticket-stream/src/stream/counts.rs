//! `counts_by_request_type/latest.jsonl`, kept current by a task of its own (off the
//! consumer's path): after commits, at most once per [`COUNTS_MIN_INTERVAL`], and every
//! [`COUNTS_REFRESH`] so that concurrent instances converge. With the object layout they are
//! the sum of the partitions' checkpoints; with the Delta table, a GROUP BY over the data
//! files of its latest snapshot (each file read once: data files never change).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use ticket_core::Routing;
use ticket_core::counts::Counts;
use ticket_core::keys::Layout;
use ticket_engine::aggregate::Aggregator;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Event;
use crate::retry::Retrier;
use crate::sink::{Failure, total_counts};
use crate::table::TableSink;
use ticket_s3::store::{Expect, SharedStore};

/// The counts object is rewritten at most this often (each refresh lists and reads every
/// partition's checkpoint).
pub const COUNTS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ... and at least this often, to pick up other instances' commits.
pub const COUNTS_REFRESH: Duration = Duration::from_secs(30);

pub struct CountsPublisher {
    changed: Arc<Notify>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CountsPublisher {
    pub fn spawn(
        store: SharedStore,
        layout: Layout,
        routing: Routing,
        retry: Retrier,
        table: Option<TableSink>,
        events: UnboundedSender<Event>,
    ) -> CountsPublisher {
        let mut source = match table {
            None => Source::Checkpoints,
            Some(sink) => Source::Table {
                sink,
                per_file: HashMap::new(),
                aggregator: Aggregator::default(),
            },
        };
        let changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (notified, stopping) = (changed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                let last = tokio::select! {
                    _ = notified.notified() => false,
                    _ = tokio::time::sleep(COUNTS_REFRESH) => false,
                    _ = stopping.cancelled() => true,
                };
                if let Err(e) = refresh(&mut source, &store, &layout, &routing, &retry).await {
                    match e {
                        Failure::Aborted => return,
                        e => {
                            let _ = events.send(Event::Fatal(
                                anyhow::Error::from(e).context("updating the counts"),
                            ));
                            return;
                        }
                    }
                }
                if last {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(COUNTS_MIN_INTERVAL) => {}
                    _ = stopping.cancelled() => {}
                }
            }
        });
        CountsPublisher {
            changed,
            stop,
            task,
        }
    }

    /// A batch was committed: the counts will be refreshed soon.
    pub fn changed(&self) {
        self.changed.notify_one();
    }

    /// One last refresh, then the task ends.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Where the counts come from.
enum Source {
    /// Every partition's checkpoint (the object layout).
    Checkpoints,
    /// The Delta table's current data files, counted once each.
    Table {
        sink: TableSink,
        per_file: HashMap<String, Counts>,
        aggregator: Aggregator,
    },
}

impl Source {
    async fn total(
        &mut self,
        store: &SharedStore,
        layout: &Layout,
        retry: &Retrier,
    ) -> Result<Counts, Failure> {
        let Source::Table {
            sink,
            per_file,
            aggregator,
        } = self
        else {
            return total_counts(store, layout, retry).await;
        };
        let table = &sink.table;
        let files = retry.run("read the Delta table", || table.files()).await?;
        let live: HashSet<&String> = files.iter().map(|f| &f.path).collect();
        // A compaction or vacuum takes files out of the snapshot.
        per_file.retain(|path, _| live.contains(path));
        for path in files.iter().map(|f| &f.path) {
            if per_file.contains_key(path) {
                continue;
            }
            let key = format!("{}{path}", sink.root);
            let Some(object) = retry
                .run("read a Delta data file", || store.get(&key))
                .await?
            else {
                return Err(Failure::Fatal(anyhow!(
                    "the Delta table's snapshot refers to {key}, which is not in the bucket"
                )));
            };
            let counts = aggregator
                .count_parquet(Bytes::from(object.0))
                .await
                .map_err(|e| Failure::Fatal(e.context(format!("counting {key}"))))?;
            per_file.insert(path.clone(), counts);
        }
        let mut total = Counts::default();
        for counts in per_file.values() {
            total.merge(counts);
        }
        Ok(total)
    }
}

/// Rewrites the counts from their source when they differ.
async fn refresh(
    source: &mut Source,
    store: &SharedStore,
    layout: &Layout,
    routing: &Routing,
    retry: &Retrier,
) -> Result<(), Failure> {
    let total = source.total(store, layout, retry).await?;
    let body = Bytes::from(total.to_jsonl(routing));
    let key = layout.counts_key();
    let current = retry.run("read counts", || store.get(&key)).await?;
    if current.is_none_or(|(b, _)| b != body) {
        retry
            .run("write counts", || {
                store.put(&key, body.clone(), Expect::Any)
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The counts from the Delta table (a GROUP BY over its data files) refreshed through a
    //! crash at every request and an outage from every request, the log and the data files in
    //! one in-memory store with one fault: never a fatal error, and the counts object that a
    //! refresh after the fault leaves is the one a refresh without it writes.

    use ticket_core::counts::{CountRow, Counts};
    use ticket_core::keys::Hour;
    use ticket_core::validate::decode_ref;
    use ticket_engine::output::{OutputFormat, Rows};
    use ticket_s3::store::memory::Fault;

    use super::*;
    use crate::sink::{Batch, Committer, Object};
    use crate::table::TableCommitter;
    use crate::table::testing::{Bucket, bucket, open, retrier};

    const TYPES: [&str; 3] = ["billing", "technical", "other"];

    /// A batch of valid tickets `first..=last` in one hour, their types in turn, as Parquet.
    fn batch(routing: &Routing, first: i64, last: i64) -> Batch {
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
                hour: Hour::from_millis(first * 3_600_000),
                first,
                last,
                tickets: (last - first + 1) as u64,
                body,
            }],
            extension: "parquet",
            valid: (last - first + 1) as u64,
            dead_letters: 0,
            counts,
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
            let prepared = c.prepare(batch(routing, first, last));
            c.commit(vec![prepared]).await.expect("commit");
        }
        b
    }

    /// One refresh, as a processor just started does it.
    async fn refresh_once(b: &Bucket, routing: &Routing, dying: bool) -> Result<(), Failure> {
        let sink = open(b).await.map_err(|e| Failure::Fatal(e.into()))?;
        let retry = retrier(b, &sink, dying);
        let mut source = Source::Table {
            sink,
            per_file: HashMap::new(),
            aggregator: Aggregator::default(),
        };
        refresh(
            &mut source,
            &b.store,
            &Layout::new("", "t"),
            routing,
            &retry,
        )
        .await
    }

    #[tokio::test]
    async fn the_tables_counts_come_through_a_crash_or_an_outage_at_every_request() {
        let routing = Routing::default();
        let key = Layout::new("", "t").counts_key();
        let clean = table(&routing).await;
        clean.mem.inject(None);
        refresh_once(&clean, &routing, false)
            .await
            .expect("a refresh without faults");
        let expected = clean.mem.bytes(&key).expect("counts written");
        assert!(
            String::from_utf8_lossy(&expected).contains("\"count\":10"),
            "{}",
            String::from_utf8_lossy(&expected)
        );
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
                let mut source = Source::Table {
                    sink,
                    per_file: HashMap::new(),
                    aggregator: Aggregator::default(),
                };
                b.mem.inject(Some(fault));
                let got = refresh(
                    &mut source,
                    &b.store,
                    &Layout::new("", "t"),
                    &routing,
                    &retry,
                )
                .await;
                match (fault, got) {
                    (_, Ok(())) | (Fault::CrashAt(_), Err(Failure::Aborted)) => {}
                    (fault, got) => panic!("{fault:?}: {got:?}"),
                }
                b.mem.inject(None);
                refresh_once(&b, &routing, false)
                    .await
                    .unwrap_or_else(|e| panic!("{fault:?}, then a refresh: {e}"));
                assert_eq!(
                    b.mem.bytes(&key),
                    Some(expected.clone()),
                    "{fault:?}: the counts"
                );
            }
        }
    }
}
