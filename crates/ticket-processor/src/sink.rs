//! Exactly-once output to S3: how a micro-batch of one partition becomes part of the results.
//!
//! Each partition has a checkpoint object (`_checkpoints/.../partition=N.json`) holding the next
//! offset to process and the running totals. A batch covering offsets `first..=last` is written:
//!
//! 1. its JSON Lines to a staging key unique to this attempt (outside `tickets_with_team/`);
//! 2. the new checkpoint (`next_offset = last + 1`, totals, and `pending: staging -> final`),
//!    **conditionally on the ETag of the checkpoint this owner loaded**. This is the commit
//!    point: a stale owner (the partition moved to another instance) fails here and writes
//!    nothing visible;
//! 3. the same bytes to the final key under `tickets_with_team/`, then the staging object is
//!    deleted;
//! 4. only then does the caller commit the Kafka offset (invariant: never before S3 is durable).
//!
//! A crash after 2 leaves `pending` in the checkpoint; whoever loads it next finishes step 3
//! (idempotent: same key, same bytes). A crash before 2 leaves only a staging object, and the
//! batch is replayed from the checkpoint's offset. Because replay always starts at the
//! checkpoint's `next_offset` and batch boundaries are recorded, a replay never writes a range
//! that overlaps one already committed, however its batches are cut (by size or by time).

use std::time::Duration;

use anyhow::anyhow;
use ticket_core::checkpoint::{Checkpoint, Pending};
use ticket_core::counts::Counts;
use ticket_core::keys::Layout;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::s3::{Expect, Store, StoreError};

/// One partition's micro-batch, ready to be written.
#[derive(Debug, Default)]
pub struct Batch {
    /// First and last offsets the batch covers (valid or not).
    pub first: i64,
    pub last: i64,
    /// JSON Lines of the valid tickets with their team.
    pub body: Vec<u8>,
    pub valid: u64,
    pub dead_letters: u64,
    pub counts: Counts,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The checkpoint changed under us: another owner took the partition, or our own write
    /// landed but its answer was lost. Reload the checkpoint and resume from it.
    #[error("checkpoint of partition {0} changed under us; reloading")]
    Fenced(i32),
    /// The processor is stopping and gave up retrying.
    #[error("stopped while retrying")]
    Aborted,
    #[error(transparent)]
    Fatal(#[from] anyhow::Error),
}

/// Retries S3 operations with capped exponential backoff until they succeed or `abort` fires.
#[derive(Clone)]
pub struct Retrier {
    pub abort: CancellationToken,
    pub metrics: Metrics,
    pub max_backoff: Duration,
}

impl Retrier {
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => {
                    if attempt > 1 {
                        tracing::info!(what, attempt, "S3 is reachable again.");
                    }
                    return Ok(v);
                }
                Err(StoreError::Conflict { key }) => {
                    return Err(SinkError::Fatal(anyhow!("unexpected conflict on {key}")));
                }
                Err(e) => {
                    self.metrics.s3_errors.inc();
                    tracing::warn!(what, attempt, retry_in_ms = backoff.as_millis() as u64, error = %e, "S3 request failed; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.abort.cancelled() => return Err(SinkError::Aborted),
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                    attempt += 1;
                }
            }
        }
    }

    /// Like [`Retrier::run`], but a lost conditional write means the partition was fenced.
    async fn run_conditional<T, F, Fut>(
        &self,
        what: &str,
        partition: i32,
        mut op: F,
    ) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let conflict = std::sync::atomic::AtomicBool::new(false);
        let result = self
            .run(what, || {
                let fut = op();
                let conflict = &conflict;
                async move {
                    match fut.await {
                        Err(StoreError::Conflict { .. }) => {
                            conflict.store(true, std::sync::atomic::Ordering::Relaxed);
                            Err(StoreError::Conflict { key: String::new() })
                        }
                        other => other,
                    }
                }
            })
            .await;
        if conflict.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SinkError::Fenced(partition));
        }
        result
    }
}

/// What this process knows of one partition's durable progress.
#[derive(Debug)]
pub struct PartitionSink {
    pub partition: i32,
    pub checkpoint: Checkpoint,
    /// ETag of the checkpoint as we loaded or last wrote it; `None` when there is none yet.
    etag: Option<String>,
    /// Staging objects found at load for offsets not yet committed (a crash before the commit
    /// point left them): deleted once a commit covers their offsets.
    leftovers: Vec<(i64, String)>,
}

impl PartitionSink {
    /// Loads the partition's checkpoint and finishes a batch a previous owner left pending.
    pub async fn load(
        store: &Store,
        layout: &Layout,
        partition: i32,
        retry: &Retrier,
    ) -> Result<PartitionSink, SinkError> {
        let key = layout.checkpoint_key(partition);
        let found = retry.run("load checkpoint", || store.get(&key)).await?;
        let (checkpoint, etag) = match found {
            None => (Checkpoint::default(), None),
            Some((bytes, etag)) => {
                let cp = Checkpoint::from_json(&bytes).map_err(|e| {
                    anyhow!(
                        "checkpoint s3://{}/{key} is not valid ({e}); it records what was already written, so fix or delete it (deleting reprocesses the partition from the start)",
                        store.bucket()
                    )
                })?;
                (cp, Some(etag))
            }
        };
        if let Some(p) = &checkpoint.pending {
            finish_pending(store, p, retry).await?;
        }
        tracing::debug!(
            partition,
            next_offset = checkpoint.next_offset,
            "Loaded checkpoint."
        );
        let mut sink = PartitionSink {
            partition,
            checkpoint,
            etag,
            leftovers: Vec::new(),
        };
        let prefix = layout.staging_prefix(partition);
        for key in retry
            .run("list staging objects", || store.list(&prefix))
            .await?
        {
            let first = key
                .strip_prefix(&prefix)
                .and_then(|name| name.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(i64::MAX);
            sink.leftovers.push((first, key));
        }
        sink.clean_leftovers(store, retry).await?;
        Ok(sink)
    }

    /// Deletes staging objects of offsets that are committed now (they are garbage: what they
    /// held is either under `tickets_with_team/` or was replayed into another object).
    async fn clean_leftovers(&mut self, store: &Store, retry: &Retrier) -> Result<(), SinkError> {
        let next = self.checkpoint.next_offset;
        let pending = self
            .checkpoint
            .pending
            .as_ref()
            .map(|p| p.staging_key.clone());
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leftovers)
            .into_iter()
            .partition(|(first, key)| *first < next && Some(key) != pending.as_ref());
        self.leftovers = keep;
        for (_, key) in done {
            retry
                .run("delete stale staging object", || store.delete(&key))
                .await?;
        }
        Ok(())
    }

    /// Makes `batch` part of the results, exactly once. On `Ok`, its offsets may be committed.
    pub async fn commit(
        &mut self,
        store: &Store,
        layout: &Layout,
        batch: Batch,
        retry: &Retrier,
    ) -> Result<(), SinkError> {
        let mut next = self.checkpoint.clone();
        next.next_offset = batch.last + 1;
        next.tickets += batch.valid;
        next.dead_letters += batch.dead_letters;
        let mut counts = self.checkpoint.counts();
        counts.merge(&batch.counts);
        next.counts = counts.rows();
        next.pending = None;

        let mut staged = None;
        if batch.valid > 0 {
            let attempt = uuid::Uuid::new_v4().simple().to_string();
            let pending = Pending {
                staging_key: layout.staging_key(self.partition, batch.first, &attempt),
                final_key: layout.tickets_key(self.partition, batch.first, batch.last),
            };
            retry
                .run("write staging object", || {
                    store.put(&pending.staging_key, batch.body.clone(), Expect::Any)
                })
                .await?;
            failpoint("after-staging").await;
            next.pending = Some(pending.clone());
            staged = Some(pending);
        }

        let expect = match &self.etag {
            Some(e) => Expect::ETag(e.clone()),
            None => Expect::Absent,
        };
        let key = layout.checkpoint_key(self.partition);
        let body = next.to_json();
        failpoint("before-checkpoint").await;
        let etag = retry
            .run_conditional("write checkpoint", self.partition, || {
                store.put(&key, body.clone(), expect.clone())
            })
            .await;
        let etag = match etag {
            Ok(etag) => etag,
            Err(SinkError::Fenced(partition)) => {
                // Our own write may have landed with its answer lost, and a retry of it then
                // conflicts with itself: the checkpoint holds exactly what we wrote.
                match retry.run("read checkpoint", || store.get(&key)).await? {
                    Some((stored, etag)) if stored == body => etag,
                    _ => {
                        if let Some(p) = &staged {
                            // Best effort: a stale owner's staging object is garbage now (a
                            // checkpoint that named it was finished by whoever loaded it).
                            let _ = store.delete(&p.staging_key).await;
                        }
                        return Err(SinkError::Fenced(partition));
                    }
                }
            }
            // Not known whether the checkpoint landed: leave the staging object to the next
            // load, which keeps it if the checkpoint names it and deletes it otherwise.
            Err(e) => return Err(e),
        };
        self.etag = Some(etag);
        self.checkpoint = next;
        failpoint("after-checkpoint").await;

        if let Some(p) = staged {
            retry
                .run("write tickets object", || {
                    store.put(&p.final_key, batch.body.clone(), Expect::Any)
                })
                .await?;
            failpoint("after-final").await;
            retry
                .run("delete staging object", || store.delete(&p.staging_key))
                .await?;
        }
        if !self.leftovers.is_empty() {
            self.clean_leftovers(store, retry).await?;
        }
        Ok(())
    }
}

/// Fault injection for the reliability tests, off unless `TICKET_PROCESSOR_FAILPOINT` is set
/// to `<point>:<action>:<n>`: at the n-th time the commit protocol reaches `<point>`
/// (`before-checkpoint`, `after-staging`, `after-checkpoint`, `after-final`), `abort` crashes
/// the process (as a SIGKILL would) or `pause-<ms>` stalls it (as a GC pause or a frozen VM
/// would, long enough to lose the partition).
async fn failpoint(point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SPEC: OnceLock<Option<(String, String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("TICKET_PROCESSOR_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        let (p, a, n) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
        Some((p.to_string(), a.to_string(), n))
    });
    let Some((p, action, n)) = spec else { return };
    if p != point || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return;
    }
    tracing::warn!(point, action, "Failpoint reached.");
    if action == "abort" {
        std::process::abort();
    }
    if let Some(ms) = action.strip_prefix("pause-").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Completes a batch whose checkpoint is durable: the final object gets the staged bytes.
async fn finish_pending(store: &Store, p: &Pending, retry: &Retrier) -> Result<(), SinkError> {
    if retry
        .run("check tickets object", || store.exists(&p.final_key))
        .await?
    {
        return retry
            .run("delete staging object", || store.delete(&p.staging_key))
            .await;
    }
    let staged = retry
        .run("read staging object", || store.get(&p.staging_key))
        .await?;
    let Some((body, _)) = staged else {
        // Another process may have finished it between our two reads.
        if retry
            .run("check tickets object", || store.exists(&p.final_key))
            .await?
        {
            return Ok(());
        }
        return Err(SinkError::Fatal(anyhow!(
            "checkpoint says {} is pending from {}, but neither object exists: was the bucket edited by hand?",
            p.final_key,
            p.staging_key
        )));
    };
    tracing::info!(key = %p.final_key, "Finishing a batch a previous run left pending.");
    retry
        .run("write tickets object", || {
            store.put(&p.final_key, body.clone(), Expect::Any)
        })
        .await?;
    retry
        .run("delete staging object", || store.delete(&p.staging_key))
        .await?;
    Ok(())
}

/// Sums every partition's checkpoint: the totals over everything under `tickets_with_team/`.
pub async fn total_counts(
    store: &Store,
    layout: &Layout,
    retry: &Retrier,
) -> Result<Counts, SinkError> {
    let prefix = layout.checkpoints_prefix();
    let keys = retry
        .run("list checkpoints", || store.list(&prefix))
        .await?;
    let mut total = Counts::default();
    for key in keys
        .iter()
        .filter(|k| layout.partition_of_checkpoint(k).is_some())
    {
        if let Some((bytes, _)) = retry.run("read checkpoint", || store.get(key)).await? {
            let cp = Checkpoint::from_json(&bytes)
                .map_err(|e| anyhow!("checkpoint {key} is not valid: {e}"))?;
            total.merge(&cp.counts());
        }
    }
    Ok(total)
}
