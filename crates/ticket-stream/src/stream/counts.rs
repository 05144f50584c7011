//! `counts_by_request_type/latest.jsonl`, kept current by a task of its own (off the
//! consumer's path): after commits, at most once per [`COUNTS_MIN_INTERVAL`], and every
//! [`COUNTS_REFRESH`] so that concurrent instances converge. The output says what they are
//! ([`Totals`]): the sum of the partitions' checkpoints, a GROUP BY over the table's files.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ticket_commit::{Failure, Retrier, Totals};
use ticket_core::Routing;
use ticket_core::keys::Layout;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Event;
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
        mut totals: Box<dyn Totals>,
        events: UnboundedSender<Event>,
    ) -> CountsPublisher {
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
                if let Err(e) = refresh(totals.as_mut(), &store, &layout, &routing, &retry).await {
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

/// Rewrites the counts from their source when they differ.
async fn refresh(
    totals: &mut dyn Totals,
    store: &SharedStore,
    layout: &Layout,
    routing: &Routing,
    retry: &Retrier,
) -> Result<(), Failure> {
    let total = totals.total(retry).await?;
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
