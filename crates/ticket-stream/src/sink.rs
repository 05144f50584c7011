//! Exactly-once output to S3: how a micro-batch of one partition becomes part of the results.
//!
//! Each partition has a checkpoint object (`_checkpoints/.../partition=N.json`) holding the next
//! offset to process and the running totals. A batch covering offsets `first..=last` becomes
//! one object per UTC hour its tickets fall in (usually one; see [`Batch::objects`]), written:
//!
//! 1. each object to a staging key unique to this attempt (outside `tickets_with_team/`):
//!    the only time its body is uploaded;
//! 2. the new checkpoint (`next_offset = last + 1`, totals, and `pending: [staging -> final]`),
//!    **conditionally on the ETag of the checkpoint this owner loaded**. This is the commit
//!    point: a stale owner (the partition moved to another instance) fails here and writes
//!    nothing visible;
//! 3. a server-side copy of each staging object to its final key under `tickets_with_team/`;
//!    the staging objects are then deleted off the batch's path (see [`PartitionSink::settle`]);
//! 4. only then does the caller commit the Kafka offset (invariant: never before S3 is durable).
//!
//! Three sequential requests per batch with valid tickets (PUTs, conditional PUT, COPYs; the
//! PUTs and COPYs of a batch's objects run side by side), one (the checkpoint) for a batch of
//! dead letters only.
//!
//! A crash after 2 leaves `pending` in the checkpoint; whoever loads it next finishes step 3
//! (idempotent: same keys, same bytes). A crash before 2 leaves only staging objects, and the
//! batch is replayed from the checkpoint's offset. Because replay always starts at the
//! checkpoint's `next_offset` and batch boundaries are recorded, a replay never writes a range
//! that overlaps one already committed, however its batches are cut (by size or by time); and
//! because an object's key comes from its tickets (their hour, first and last offsets), a
//! replay cut the same way writes the same keys.
//! The unit tests below crash the protocol at every request, lose the answer of every
//! request, and run a stale owner against a new one, on [`ticket_s3::store::memory::MemStore`].

use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use ticket_core::checkpoint::{Checkpoint, Pending};
use ticket_core::counts::Counts;
use ticket_core::keys::{Hour, Layout};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use ticket_s3::store::{Expect, SharedStore, StoreError};

/// One partition's micro-batch, ready to be written.
#[derive(Debug, Default)]
pub struct Batch {
    /// First and last offsets the batch covers (valid or not).
    pub first: i64,
    pub last: i64,
    /// The valid tickets with their team, one object per hour of their Kafka timestamps, in
    /// the order of the hours (a batch is split by hour, not cut, so that tickets whose
    /// timestamps are out of order near an hour's end do not make many small objects).
    pub objects: Vec<Object>,
    /// The objects' file extension (their format).
    pub extension: &'static str,
    pub valid: u64,
    pub dead_letters: u64,
    pub counts: Counts,
}

/// One object of a batch: the tickets of one hour.
#[derive(Debug)]
pub struct Object {
    pub hour: Hour,
    /// Offsets of the first and last ticket in it.
    pub first: i64,
    pub last: i64,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The checkpoint changed under us: another owner took the partition. Reload the
    /// checkpoint and resume from it.
    #[error("checkpoint of partition {0} changed under us; reloading")]
    Fenced(i32),
    /// The processor is stopping and gave up retrying.
    #[error("stopped while retrying")]
    Aborted,
    #[error(transparent)]
    Fatal(#[from] anyhow::Error),
}

/// Retries S3 operations that failed transiently, with capped exponential backoff, until they
/// succeed or `abort` fires. A permanent error (403, missing bucket) stops at once with what
/// to fix: retrying it would only hide it.
#[derive(Clone)]
pub struct Retrier {
    pub abort: CancellationToken,
    pub metrics: Metrics,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Retrier {
    pub fn new(abort: CancellationToken, metrics: Metrics) -> Retrier {
        Retrier {
            abort,
            metrics,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = self.first_backoff;
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => {
                    if attempt > 1 {
                        tracing::info!(what, attempt, "S3 is reachable again.");
                    }
                    return Ok(v);
                }
                Err(e) if e.is_transient() => {
                    self.metrics.s3_errors.inc();
                    tracing::warn!(what, attempt, retry_in_ms = backoff.as_millis() as u64, error = %e, "S3 request failed; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.abort.cancelled() => return Err(SinkError::Aborted),
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                    attempt += 1;
                }
                Err(StoreError::Conflict { key }) => {
                    return Err(SinkError::Fatal(anyhow!("unexpected conflict on {key}")));
                }
                Err(e) => {
                    self.metrics.s3_errors.inc();
                    return Err(SinkError::Fatal(anyhow!("{what}: {e}")));
                }
            }
        }
    }

    /// Like [`Retrier::run`], but a lost conditional write is reported as `Ok(None)`.
    async fn run_conditional<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<Option<T>, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.run(what, || {
            let fut = op();
            async move {
                match fut.await {
                    Ok(v) => Ok(Some(v)),
                    Err(StoreError::Conflict { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }
}

/// What this process knows of one partition's durable progress.
pub struct PartitionSink {
    pub partition: i32,
    pub checkpoint: Checkpoint,
    /// ETag of the checkpoint as we loaded or last wrote it; `None` when there is none yet.
    etag: Option<String>,
    /// Staging objects found at load for offsets not yet committed (a crash before the commit
    /// point left them): deleted once a commit covers their offsets.
    leftovers: Vec<(i64, String)>,
    /// Deletions of staging objects already copied to their final key, running beside the
    /// next batch (nothing depends on them: a crash leaves them to the next load).
    cleanup: tokio::task::JoinSet<()>,
}

impl PartitionSink {
    /// Loads the partition's checkpoint and finishes a batch a previous owner left pending.
    pub async fn load(
        store: &SharedStore,
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
                        "checkpoint {key} in {} is not valid ({e}); it records what was already written, so fix or delete it (deleting reprocesses the partition from the start)",
                        store.location()
                    )
                })?;
                (cp, Some(etag))
            }
        };
        for p in &checkpoint.pending {
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
            cleanup: tokio::task::JoinSet::new(),
        };
        let prefix = layout.staging_prefix(partition);
        for key in retry
            .run("list staging objects", || store.list(&prefix))
            .await?
        {
            let first = layout.first_of_staging(partition, &key).unwrap_or(i64::MAX);
            sink.leftovers.push((first, key));
        }
        sink.clean_leftovers(store, retry).await?;
        Ok(sink)
    }

    /// Deletes staging objects of offsets that are committed now (they are garbage: what they
    /// held is either under `tickets_with_team/` or was replayed into another object).
    async fn clean_leftovers(
        &mut self,
        store: &SharedStore,
        retry: &Retrier,
    ) -> Result<(), SinkError> {
        let next = self.checkpoint.next_offset;
        let pending = &self.checkpoint.pending;
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leftovers)
            .into_iter()
            .partition(|(first, key)| {
                *first < next && !pending.iter().any(|p| &p.staging_key == key)
            });
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
        store: &SharedStore,
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

        let attempt = uuid::Uuid::new_v4().simple().to_string();
        let staged: Vec<Pending> = batch
            .objects
            .iter()
            .enumerate()
            .map(|(n, o)| Pending {
                staging_key: layout.staging_key(
                    self.partition,
                    batch.first,
                    &attempt,
                    n,
                    batch.extension,
                ),
                final_key: layout.tickets_key(
                    self.partition,
                    o.hour,
                    o.first,
                    o.last,
                    batch.extension,
                ),
            })
            .collect();
        futures::future::try_join_all(staged.iter().zip(&batch.objects).map(|(p, o)| {
            retry.run("write staging object", || {
                store.put(&p.staging_key, o.body.clone(), Expect::Any)
            })
        }))
        .await?;
        if !staged.is_empty() {
            failpoint("after-staging", self.partition).await;
        }
        next.pending = staged.clone();

        let expect = match &self.etag {
            Some(e) => Expect::ETag(e.clone()),
            None => Expect::Absent,
        };
        let key = layout.checkpoint_key(self.partition);
        let body = Bytes::from(next.to_json());
        failpoint("before-checkpoint", self.partition).await;
        let written = retry
            .run_conditional("write checkpoint", || {
                store.put(&key, body.clone(), expect.clone())
            })
            .await?;
        let etag = match written {
            Some(etag) => etag,
            // Our own write may have landed with its answer lost, and its retry then
            // conflicts with itself: then the checkpoint holds exactly what we wrote.
            None => match retry.run("read checkpoint", || store.get(&key)).await? {
                Some((stored, etag)) if stored == body => etag,
                _ => {
                    for p in &staged {
                        // Best effort: a stale owner's staging objects are garbage now (no
                        // checkpoint names them).
                        let _ = store.delete(&p.staging_key).await;
                    }
                    return Err(SinkError::Fenced(self.partition));
                }
            },
        };
        // Not known whether the checkpoint landed after another error: `?` above leaves the
        // staging object to the next load, which keeps it if the checkpoint names it.
        self.etag = Some(etag);
        self.checkpoint = next;
        failpoint("after-checkpoint", self.partition).await;

        futures::future::try_join_all(staged.iter().map(|p| copy_pending(store, p, retry))).await?;
        if !staged.is_empty() {
            failpoint("after-final", self.partition).await;
        }
        for p in staged {
            let (store, retry) = (store.clone(), retry.clone());
            self.cleanup.spawn(async move {
                if let Err(e) = retry
                    .run("delete staging object", || store.delete(&p.staging_key))
                    .await
                {
                    tracing::warn!(key = %p.staging_key, error = %e, "Staging object left for the next load to delete.");
                }
            });
        }
        if !self.leftovers.is_empty() {
            self.clean_leftovers(store, retry).await?;
        }
        Ok(())
    }

    /// Waits for the staging deletions still running.
    pub async fn settle(&mut self) {
        while self.cleanup.join_next().await.is_some() {}
    }
}

/// Fault injection for the reliability tests (`tests/faults.rs`), in debug builds only:
/// `TICKET_PROCESSOR_FAILPOINT=<point>:<action>:<n>` makes the n-th pass through `<point>`
/// (`before-checkpoint`, `after-staging`, `after-checkpoint`, `after-final`) either `abort`
/// the process (as a SIGKILL would) or `pause-<ms>` it (as a GC pause or a frozen VM would,
/// long enough to lose the partition). Its log line names the partition it stopped in.
/// Release builds compile it to nothing.
#[cfg(debug_assertions)]
async fn failpoint(point: &str, partition: i32) {
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
    tracing::warn!(point, action, partition, "Failpoint reached.");
    if action == "abort" {
        std::process::abort();
    }
    if let Some(ms) = action.strip_prefix("pause-").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[cfg(not(debug_assertions))]
async fn failpoint(_point: &str, _partition: i32) {}

/// Copies a pending object to its final key. Another owner finishing the same checkpoint
/// (a rebalance) may have copied it and deleted the staging object in between: then the copy
/// fails, the final object is there, and that is success, not a reason to stop.
async fn copy_pending(store: &SharedStore, p: &Pending, retry: &Retrier) -> Result<(), SinkError> {
    let copied = retry
        .run("copy tickets object", || {
            store.copy(&p.staging_key, &p.final_key)
        })
        .await;
    match copied {
        Err(SinkError::Fatal(e)) => {
            if retry
                .run("check tickets object", || store.exists(&p.final_key))
                .await?
            {
                tracing::info!(key = %p.final_key, "Another owner finished this object first.");
                Ok(())
            } else {
                Err(SinkError::Fatal(e))
            }
        }
        other => other,
    }
}

/// Completes a batch whose checkpoint is durable: the final object gets the staged bytes.
async fn finish_pending(
    store: &SharedStore,
    p: &Pending,
    retry: &Retrier,
) -> Result<(), SinkError> {
    let final_exists = || retry.run("check tickets object", || store.exists(&p.final_key));
    if !final_exists().await? {
        if !retry
            .run("check staging object", || store.exists(&p.staging_key))
            .await?
        {
            // Another process may have finished it between our two reads.
            if final_exists().await? {
                return Ok(());
            }
            return Err(SinkError::Fatal(anyhow!(
                "checkpoint says {} is pending from {}, but neither object exists in {}: was the bucket edited by hand?",
                p.final_key,
                p.staging_key,
                store.location()
            )));
        }
        tracing::info!(key = %p.final_key, "Finishing a batch a previous run left pending.");
        copy_pending(store, p, retry).await?;
    }
    retry
        .run("delete staging object", || store.delete(&p.staging_key))
        .await
}

/// Sums every partition's checkpoint: the totals over everything under `tickets_with_team/`.
pub async fn total_counts(
    store: &SharedStore,
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

#[cfg(test)]
mod tests {
    //! The protocol on an in-memory store: every crash point, every lost answer, a stale owner.

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use ticket_s3::store::memory::{Fault, MemStore};

    const PARTITION: i32 = 0;

    fn layout() -> Layout {
        Layout::new("", "t")
    }

    /// A retrier that retries transient errors at once, forever (until `abort`).
    fn patient() -> Retrier {
        Retrier {
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..Retrier::new(CancellationToken::new(), Metrics::new())
        }
    }

    /// A retrier of a process that dies at its first failed request: it never retries.
    fn dying() -> Retrier {
        let r = patient();
        r.abort.cancel();
        r
    }

    /// The hour of the ticket at offset `o`: five offsets per hour, so batches span hours.
    fn hour_of(o: i64) -> Hour {
        Hour::from_millis(o / 5 * 3_600_000)
    }

    /// A batch of offsets `first..=last`, every offset a valid ticket written as its own line
    /// in the object of its hour, except multiples of 7, which are dead letters.
    fn batch(first: i64, last: i64) -> Batch {
        let valid: Vec<i64> = (first..=last).filter(|o| o % 7 != 0).collect();
        let mut objects: Vec<Object> = Vec::new();
        for &o in &valid {
            let line = Bytes::from(format!("{o}\n"));
            match objects.last_mut() {
                Some(obj) if obj.hour == hour_of(o) => {
                    obj.body = [obj.body.clone(), line].concat().into();
                    obj.last = o;
                }
                _ => objects.push(Object {
                    hour: hour_of(o),
                    first: o,
                    last: o,
                    body: line,
                }),
            }
        }
        let mut counts = Counts::default();
        counts.add(&ticket_core::counts::CountRow {
            request_type: "billing".into(),
            priority: "low".into(),
            support_team: "Billing Team".into(),
            count: valid.len() as u64,
        });
        Batch {
            first,
            last,
            objects,
            extension: "jsonl",
            valid: valid.len() as u64,
            dead_letters: (last - first + 1) as u64 - valid.len() as u64,
            counts,
        }
    }

    /// How many times each offset appears in the visible results (`tickets_with_team/`);
    /// each must be in the object of its hour.
    fn visible(store: &MemStore) -> BTreeMap<i64, usize> {
        let mut seen = BTreeMap::new();
        for key in store.keys(&layout().tickets_prefix()) {
            let body = store.bytes(&key).unwrap_or_default();
            for line in String::from_utf8_lossy(&body).lines() {
                let offset = line.parse::<i64>().unwrap_or(-1);
                assert!(
                    key.contains(&format!("/{}/", hour_of(offset).path())),
                    "offset {offset} in {key}"
                );
                *seen.entry(offset).or_default() += 1;
            }
        }
        seen
    }

    /// Every valid offset below `end` exactly once, nothing else; no staging object left;
    /// checkpoint totals agree.
    async fn assert_exactly_once(mem: &MemStore, store: &SharedStore, end: i64) {
        let seen = visible(mem);
        let expected: BTreeMap<i64, usize> =
            (0..end).filter(|o| o % 7 != 0).map(|o| (o, 1)).collect();
        assert_eq!(seen, expected, "each valid offset exactly once");
        let sink = PartitionSink::load(store, &layout(), PARTITION, &patient())
            .await
            .expect("load");
        assert_eq!(sink.checkpoint.next_offset, end);
        assert_eq!(sink.checkpoint.tickets, expected.len() as u64);
        assert_eq!(
            sink.checkpoint.tickets + sink.checkpoint.dead_letters,
            end as u64
        );
        assert_eq!(sink.checkpoint.counts().total(), expected.len() as u64);
        assert!(
            mem.keys("_staging/").is_empty(),
            "staging left: {:?}",
            mem.keys("_staging/")
        );
    }

    fn new_store() -> (Arc<MemStore>, SharedStore) {
        let mem = Arc::new(MemStore::new());
        let store: SharedStore = mem.clone();
        (mem, store)
    }

    async fn commit(store: &SharedStore, sink: &mut PartitionSink, b: Batch, r: &Retrier) {
        sink.commit(store, &layout(), b, r).await.expect("commit");
        sink.settle().await;
    }

    /// Requests one commit of the batch `10..=last` makes after the first batch.
    async fn requests_per_commit(last: i64) -> u64 {
        let (mem, store) = new_store();
        let mut sink = PartitionSink::load(&store, &layout(), PARTITION, &patient())
            .await
            .expect("load");
        commit(&store, &mut sink, batch(0, 9), &patient()).await;
        mem.inject(None);
        commit(&store, &mut sink, batch(10, last), &patient()).await;
        mem.requests()
    }

    #[tokio::test]
    async fn a_batch_is_uploaded_once_in_three_requests_plus_the_staging_delete() {
        // Tickets of one hour: PUT staging, conditional PUT checkpoint, COPY, then DELETE off
        // the batch's path.
        assert_eq!(batch(10, 13).objects.len(), 1);
        assert_eq!(requests_per_commit(13).await, 4);
        // Of two hours: one more PUT, COPY and DELETE, beside the first object's.
        assert_eq!(batch(10, 19).objects.len(), 2);
        assert_eq!(requests_per_commit(19).await, 7);
    }

    #[tokio::test]
    async fn a_crash_at_every_request_loses_and_duplicates_nothing() {
        let n = requests_per_commit(19).await;
        // Also crash inside the recovery (load) that follows a crash.
        for crash_at in 1..=n + 1 {
            // A load that finishes two pending objects makes up to 8 requests.
            for recovery_crash in std::iter::once(None).chain((1..=8).map(Some)) {
                let (mem, store) = new_store();
                let mut a = PartitionSink::load(&store, &layout(), PARTITION, &patient())
                    .await
                    .expect("load");
                commit(&store, &mut a, batch(0, 9), &patient()).await;
                mem.inject(Some(Fault::CrashAt(crash_at)));
                let crashed = a.commit(&store, &layout(), batch(10, 19), &dying()).await;
                a.settle().await;
                drop(a);
                if let Some(at) = recovery_crash {
                    mem.inject(Some(Fault::CrashAt(at)));
                    let _ = PartitionSink::load(&store, &layout(), PARTITION, &dying()).await;
                }
                mem.inject(None);
                // The next process resumes from the checkpoint, cutting batches differently.
                let mut b = PartitionSink::load(&store, &layout(), PARTITION, &patient())
                    .await
                    .expect("recovery load");
                let mut next = b.checkpoint.next_offset;
                if crashed.is_ok() {
                    assert_eq!(next, 20, "crash at {crash_at} after the commit");
                } else {
                    assert!(
                        next == 10 || next == 20,
                        "crash at {crash_at}: resumes at {next}"
                    );
                }
                while next < 30 {
                    let last = (next + 6).min(29);
                    commit(&store, &mut b, batch(next, last), &patient()).await;
                    next = last + 1;
                }
                assert_exactly_once(&mem, &store, 30).await;
            }
        }
    }

    #[tokio::test]
    async fn a_lost_answer_at_every_request_is_retried_into_exactly_once() {
        let n = requests_per_commit(19).await;
        for lost in 1..=n {
            let (mem, store) = new_store();
            let mut a = PartitionSink::load(&store, &layout(), PARTITION, &patient())
                .await
                .expect("load");
            commit(&store, &mut a, batch(0, 9), &patient()).await;
            mem.inject(Some(Fault::LoseAnswerOf(lost)));
            // Above all the checkpoint's conditional write: its retry conflicts with itself,
            // and must be recognised as ours rather than as a fence.
            a.commit(&store, &layout(), batch(10, 19), &patient())
                .await
                .unwrap_or_else(|e| panic!("answer of request {lost} lost: {e}"));
            a.settle().await;
            mem.inject(None);
            commit(&store, &mut a, batch(20, 29), &patient()).await;
            assert_exactly_once(&mem, &store, 30).await;
        }
    }

    #[tokio::test]
    async fn a_stale_owner_is_fenced_and_leaves_nothing_visible() {
        let (mem, store) = new_store();
        let r = patient();
        let mut stale = PartitionSink::load(&store, &layout(), PARTITION, &r)
            .await
            .expect("load");
        commit(&store, &mut stale, batch(0, 9), &r).await;
        // The partition moves: the new owner loads the checkpoint and commits on.
        let mut owner = PartitionSink::load(&store, &layout(), PARTITION, &r)
            .await
            .expect("load");
        commit(&store, &mut owner, batch(10, 19), &r).await;
        // The old owner, unaware, writes its own cut of the same offsets.
        let fenced = stale.commit(&store, &layout(), batch(10, 14), &r).await;
        assert!(
            matches!(fenced, Err(SinkError::Fenced(PARTITION))),
            "{fenced:?}"
        );
        // ... and after reloading resumes where the owner is.
        let reloaded = PartitionSink::load(&store, &layout(), PARTITION, &r)
            .await
            .expect("load");
        assert_eq!(reloaded.checkpoint.next_offset, 20);
        assert_exactly_once(&mem, &store, 20).await;
    }

    #[tokio::test]
    async fn a_transient_outage_is_retried_and_a_refusal_stops_at_once() {
        let (mem, store) = new_store();
        let mut sink = PartitionSink::load(&store, &layout(), PARTITION, &patient())
            .await
            .expect("load");
        mem.inject(Some(Fault::Outage { from: 1, count: 5 }));
        commit(&store, &mut sink, batch(0, 9), &patient()).await;
        assert_exactly_once(&mem, &store, 10).await;

        // A 403 on the final key: no retry loop, an error that says what to grant.
        mem.refuse_writes_under(&layout().tickets_prefix());
        let refused = sink
            .commit(&store, &layout(), batch(10, 19), &patient())
            .await;
        let msg = match refused {
            Err(SinkError::Fatal(e)) => e.to_string(),
            other => panic!("expected a fatal error, got {other:?}"),
        };
        assert!(
            msg.contains("403") && msg.contains("grant"),
            "message: {msg}"
        );
    }

    #[tokio::test]
    async fn a_copy_whose_staging_object_another_owner_already_moved_is_done() {
        let (mem, store) = new_store();
        let p = Pending {
            staging_key: "_staging/t/a".into(),
            final_key: "tickets_with_team/t/a.jsonl".into(),
        };
        // The other owner copied and deleted the staging object: done, not an error.
        store
            .put(&p.final_key, Bytes::from_static(b"1\n"), Expect::Any)
            .await
            .expect("put");
        copy_pending(&store, &p, &patient())
            .await
            .expect("the final object is there");
        // Neither object: a real error, with what is missing.
        mem.inject(None);
        let q = Pending {
            final_key: "tickets_with_team/t/b.jsonl".into(),
            ..p
        };
        assert!(matches!(
            copy_pending(&store, &q, &patient()).await,
            Err(SinkError::Fatal(_))
        ));
    }

    #[tokio::test]
    async fn a_batch_of_dead_letters_only_writes_just_the_checkpoint() {
        let (mem, store) = new_store();
        let mut sink = PartitionSink::load(&store, &layout(), PARTITION, &patient())
            .await
            .expect("load");
        mem.inject(None);
        commit(&store, &mut sink, batch(7, 7), &patient()).await;
        assert_eq!(mem.requests(), 1);
        assert!(visible(&mem).is_empty());
        assert_eq!(sink.checkpoint.dead_letters, 1);
    }
}
