//! [`ObjectCommitter`]: the object layout's [`Committer`] (the crate's documentation says how).

use anyhow::anyhow;
use bytes::Bytes;
use futures::future::BoxFuture;
use ticket_commit::failpoint::failpoint;
use ticket_commit::{Batch, Committer, Failure, Plan, Retrier};
use ticket_core::checkpoint::{Checkpoint, Intent, Planned};
use ticket_core::keys::Layout;
use ticket_s3::store::{Expect, SharedStore};

use crate::upgrade::finish_pending;

/// What this process makes objects with; recorded in each batch's intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeWith {
    /// The objects' file extension (`OUTPUT_FORMAT`).
    pub format: &'static str,
    /// [`ticket_core::Routing::digest`] of the routing table in use.
    pub routing: String,
    /// `ticket_engine::output::ENCODING_VERSION`.
    pub encoding: u32,
}

/// A batch with its intent, ready for [`ObjectCommitter::commit`].
#[derive(Debug)]
pub struct PreparedBatch {
    intent: Intent,
    batch: Batch,
}

/// The object layout's committer for one partition: its checkpoint, the ETag it was loaded or
/// last written with, and a recorded batch to rebuild, if any.
pub struct ObjectCommitter {
    store: SharedStore,
    layout: Layout,
    partition: i32,
    retry: Retrier,
    made_with: MadeWith,
    checkpoint: Checkpoint,
    /// ETag of the checkpoint as we loaded or last wrote it; `None` when there is none yet.
    etag: Option<String>,
    /// The recorded batch [`Plan::Rebuild`] asked for, until [`Committer::complete`].
    rebuild: Option<Intent>,
    /// Staging objects of an earlier version found at recovery for offsets not yet committed
    /// (a crash before its commit point left them): deleted once a commit covers them.
    leftovers: Vec<(i64, String)>,
}

impl ObjectCommitter {
    pub fn new(
        store: SharedStore,
        layout: Layout,
        partition: i32,
        retry: Retrier,
        made_with: MadeWith,
    ) -> ObjectCommitter {
        ObjectCommitter {
            store,
            layout,
            partition,
            retry,
            made_with,
            checkpoint: Checkpoint::default(),
            etag: None,
            rebuild: None,
            leftovers: Vec::new(),
        }
    }

    /// The checkpoint as last loaded or written.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The keys of the recorded batch's objects that are not in the store.
    async fn missing(&self, intent: &Intent) -> Result<Vec<String>, Failure> {
        let (store, retry) = (&self.store, &self.retry);
        let found = futures::future::try_join_all(intent.objects.iter().map(|o| async move {
            let there = retry
                .run("check tickets object", || store.exists(&o.key))
                .await?;
            Ok::<_, Failure>((!there).then(|| o.key.clone()))
        }))
        .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Why a rebuild with what this process makes objects with would not reproduce
    /// `intent`, if it would not.
    fn cannot_rebuild(&self, intent: &Intent) -> Option<String> {
        let m = &self.made_with;
        if intent.format != m.format {
            Some(format!(
                "it was written as {}, this process writes {} (set OUTPUT_FORMAT={} until it is finished)",
                intent.format, m.format, intent.format
            ))
        } else if intent.routing != m.routing {
            Some(format!(
                "it was written with a routing table of digest {}, this process has {} (restore the routing file used then until it is finished)",
                intent.routing, m.routing
            ))
        } else if intent.encoding != m.encoding {
            Some(format!(
                "it was encoded by a version of encoding {}, this one writes encoding {} (finish it with the version that committed it)",
                intent.encoding, m.encoding
            ))
        } else {
            None
        }
    }

    /// Creates the batch's objects that do not exist yet, side by side.
    async fn create_objects(&self, intent: &Intent, batch: &Batch) -> Result<(), Failure> {
        let (store, retry) = (&self.store, &self.retry);
        futures::future::try_join_all(intent.objects.iter().zip(&batch.objects).map(
            |(planned, object)| async move {
                let created = retry
                    .run_conditional("write tickets object", || {
                        store.put(&planned.key, object.body.clone(), Expect::Absent)
                    })
                    .await?;
                if created.is_none() {
                    tracing::debug!(key = %planned.key, "The object was already written.");
                }
                Ok::<_, Failure>(())
            },
        ))
        .await?;
        Ok(())
    }

    /// [`Committer::commit`] of a prepared batch.
    pub async fn commit_prepared(&mut self, prepared: PreparedBatch) -> Result<(), Failure> {
        let PreparedBatch { intent, batch } = prepared;
        let mut next = self.checkpoint.clone();
        next.next_offset = batch.last + 1;
        next.tickets += batch.valid;
        next.dead_letters += batch.dead_letters;
        let mut counts = self.checkpoint.counts();
        counts.merge(&batch.counts);
        next.counts = counts.rows();
        next.pending = Vec::new();
        next.batch = (!intent.objects.is_empty()).then(|| intent.clone());

        let expect = match &self.etag {
            Some(e) => Expect::ETag(e.clone()),
            None => Expect::Absent,
        };
        let key = self.layout.checkpoint_key(self.partition);
        let body = Bytes::from(next.to_json());
        let (store, retry) = (&self.store, &self.retry);
        failpoint("before-checkpoint", self.partition).await;
        let recording = std::time::Instant::now();
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
                _ => return Err(Failure::Fenced(self.partition)),
            },
        };
        // After another error it is not known whether the checkpoint landed: `?` above leaves
        // that to the next owner, which rebuilds the batch if the checkpoint records it.
        self.etag = Some(etag);
        self.checkpoint = next;
        batch.steps.record(recording.elapsed());
        failpoint("after-checkpoint", self.partition).await;

        let writing = std::time::Instant::now();
        self.create_objects(&intent, &batch).await?;
        batch.steps.data(writing.elapsed());
        if !batch.objects.is_empty() {
            failpoint("after-final", self.partition).await;
        }
        if !self.leftovers.is_empty() {
            self.clean_leftovers().await?;
        }
        Ok(())
    }

    /// Deletes an earlier version's staging objects of offsets that are committed now (they
    /// are garbage: what they held is either in place or was replayed into another object).
    async fn clean_leftovers(&mut self) -> Result<(), Failure> {
        let next = self.checkpoint.next_offset;
        let pending = &self.checkpoint.pending;
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leftovers)
            .into_iter()
            .partition(|(first, key)| {
                *first < next && !pending.iter().any(|p| &p.staging_key == key)
            });
        self.leftovers = keep;
        for (_, key) in done {
            self.retry
                .run("delete stale staging object", || self.store.delete(&key))
                .await?;
        }
        Ok(())
    }
}

impl ObjectCommitter {
    /// [`Committer::recover`].
    pub async fn recover(&mut self) -> Result<Plan, Failure> {
        let (store, retry) = (self.store.clone(), self.retry.clone());
        let key = self.layout.checkpoint_key(self.partition);
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
        // An earlier version's batch, staged and recorded but maybe not copied into place.
        for p in &checkpoint.pending {
            finish_pending(&store, p, &retry).await?;
        }
        self.checkpoint = checkpoint;
        self.etag = etag;
        self.rebuild = None;
        let prefix = self.layout.staging_prefix(self.partition);
        self.leftovers = retry
            .run("list staging objects", || store.list(&prefix))
            .await?
            .into_iter()
            .map(|k| {
                let first = self
                    .layout
                    .first_of_staging(self.partition, &k)
                    .unwrap_or(i64::MAX);
                (first, k)
            })
            .collect();
        self.clean_leftovers().await?;

        let at = self.checkpoint.next_offset;
        let Some(intent) = self.checkpoint.batch.clone() else {
            return Ok(Plan::Resume { at });
        };
        let missing = self.missing(&intent).await?;
        if missing.is_empty() {
            return Ok(Plan::Resume { at });
        }
        if let Some(why) = self.cannot_rebuild(&intent) {
            return Err(Failure::Fatal(anyhow!(
                "partition {}'s batch of offsets {}..={} is committed (checkpoint {key}) but {} of its objects are not written yet ({}), and this process cannot rebuild it: {why}",
                self.partition,
                intent.first,
                intent.last,
                missing.len(),
                missing.join(", "),
            )));
        }
        tracing::info!(
            partition = self.partition,
            first = intent.first,
            last = intent.last,
            missing = missing.len(),
            "A committed batch has objects still to write; rebuilding it from Kafka."
        );
        let plan = Plan::Rebuild {
            first: intent.first,
            last: intent.last,
        };
        self.rebuild = Some(intent);
        Ok(plan)
    }

    /// Pure: the batch's intent (keys, checksums) as the checkpoint will record it.
    pub fn prepare(&self, batch: Batch) -> PreparedBatch {
        let objects = batch
            .objects
            .iter()
            .map(|o| Planned {
                key: self.layout.tickets_key(
                    self.partition,
                    o.hour,
                    o.first,
                    o.last,
                    batch.extension,
                ),
                hour: o.hour.start(),
                first: o.first,
                last: o.last,
                tickets: o.tickets,
                crc32c: crc32c::crc32c(&o.body),
            })
            .collect();
        let intent = Intent {
            first: batch.first,
            last: batch.last,
            format: batch.extension.to_string(),
            routing: self.made_with.routing.clone(),
            encoding: self.made_with.encoding,
            objects,
        };
        PreparedBatch { intent, batch }
    }

    /// [`Committer::complete`] of a prepared batch.
    pub async fn complete_prepared(&mut self, rebuilt: PreparedBatch) -> Result<(), Failure> {
        let Some(recorded) = self.rebuild.take() else {
            return Err(Failure::Fatal(anyhow!(
                "partition {}: a rebuilt batch {}..={} arrived, but none was recorded",
                self.partition,
                rebuilt.intent.first,
                rebuilt.intent.last
            )));
        };
        if rebuilt.intent != recorded {
            let describe = |i: &Intent| {
                i.objects
                    .iter()
                    .map(|o| format!("{} ({} tickets, crc32c {:08x})", o.key, o.tickets, o.crc32c))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Failure::Fatal(anyhow!(
                "rebuilding partition {}'s committed batch {}..={} from Kafka gave other objects than its checkpoint records, so nothing was written (the tickets in Kafka, or how they are validated, changed since it was committed). Recorded: [{}]; rebuilt: [{}]. Finish it with the version and settings that committed it, or, to accept the loss of its missing objects, remove \"batch\" from checkpoint {} and restart",
                self.partition,
                recorded.first,
                recorded.last,
                describe(&recorded),
                describe(&rebuilt.intent),
                self.layout.checkpoint_key(self.partition),
            )));
        }
        self.create_objects(&recorded, &rebuilt.batch).await?;
        tracing::info!(
            partition = self.partition,
            first = recorded.first,
            last = recorded.last,
            "Rebuilt a committed batch from Kafka; its objects are written."
        );
        Ok(())
    }
}

impl Committer for ObjectCommitter {
    fn recover(&mut self) -> BoxFuture<'_, Result<Plan, Failure>> {
        Box::pin(ObjectCommitter::recover(self))
    }

    fn commit(&mut self, batch: Batch) -> BoxFuture<'_, Result<(), Failure>> {
        let prepared = self.prepare(batch);
        Box::pin(self.commit_prepared(prepared))
    }

    fn complete(&mut self, rebuilt: Batch) -> BoxFuture<'_, Result<(), Failure>> {
        let prepared = self.prepare(rebuilt);
        Box::pin(self.complete_prepared(prepared))
    }
}

#[cfg(test)]
mod tests {
    //! The protocol on an in-memory store: every crash point, every lost answer, a stale owner,
    //! the rebuild from Kafka (played by [`batch`], which makes the same batch from the same
    //! offsets as Kafka would), and an earlier version's checkpoint.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use ticket_commit::retry::RetryMetrics;
    use ticket_commit::testing::{batch, hour_of};
    use ticket_core::counts::Counts;
    use ticket_s3::store::memory::{Fault, MemStore};

    const PARTITION: i32 = 0;

    fn layout() -> Layout {
        Layout::new("", "t")
    }

    fn made_with() -> MadeWith {
        MadeWith {
            format: "jsonl",
            routing: "0000abcd".into(),
            encoding: 1,
        }
    }

    /// A retrier that retries transient errors at once, forever (until `abort`).
    fn patient() -> Retrier {
        Retrier::new(CancellationToken::new(), RetryMetrics::default())
            .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
    }

    /// A retrier of a process that dies at its first failed request: it never retries.
    fn dying() -> Retrier {
        let r = patient();
        r.abort.cancel();
        r
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

    fn new_store() -> (Arc<MemStore>, SharedStore) {
        let mem = Arc::new(MemStore::new());
        let store: SharedStore = mem.clone();
        (mem, store)
    }

    fn committer(store: &SharedStore, retry: &Retrier) -> ObjectCommitter {
        ObjectCommitter::new(
            store.clone(),
            layout(),
            PARTITION,
            retry.clone(),
            made_with(),
        )
    }

    /// A new owner's start, as the consumer's loop does it: recover, and rebuild from "Kafka"
    /// what the plan asks for. Returns the committer and the next offset to read.
    async fn take_over(
        store: &SharedStore,
        retry: &Retrier,
    ) -> Result<(ObjectCommitter, i64), Failure> {
        let mut c = committer(store, retry);
        match c.recover().await? {
            Plan::Resume { at } => Ok((c, at)),
            Plan::Rebuild { first, last } => {
                Committer::complete(&mut c, batch(first, last)).await?;
                Ok((c, last + 1))
            }
        }
    }

    async fn commit(c: &mut ObjectCommitter, b: Batch) -> Result<(), Failure> {
        Committer::commit(c, b).await
    }

    /// Every valid offset below `end` exactly once, nothing else; no staging object; the
    /// checkpoint's totals agree, and a new owner resumes at `end` with nothing to rebuild.
    async fn assert_exactly_once(mem: &MemStore, store: &SharedStore, end: i64) {
        let seen = visible(mem);
        let expected: BTreeMap<i64, usize> =
            (0..end).filter(|o| o % 7 != 0).map(|o| (o, 1)).collect();
        assert_eq!(seen, expected, "each valid offset exactly once");
        let mut c = committer(store, &patient());
        assert_eq!(
            c.recover().await.expect("recover"),
            Plan::Resume { at: end }
        );
        let cp = c.checkpoint();
        assert_eq!(cp.tickets, expected.len() as u64);
        assert_eq!(cp.tickets + cp.dead_letters, end as u64);
        assert_eq!(cp.counts().total(), expected.len() as u64);
        assert!(
            mem.keys("_staging/").is_empty(),
            "{:?}",
            mem.keys("_staging/")
        );
    }

    /// Requests one commit of the batch `10..=last` makes after the first batch.
    async fn requests_per_commit(last: i64) -> u64 {
        let (mem, store) = new_store();
        let (mut c, _) = take_over(&store, &patient()).await.expect("start");
        commit(&mut c, batch(0, 9)).await.expect("commit");
        mem.inject(None);
        commit(&mut c, batch(10, last)).await.expect("commit");
        mem.requests()
    }

    #[tokio::test]
    async fn a_batch_is_written_once_in_two_requests() {
        // Tickets of one hour: the conditional PUT of the checkpoint, then the object's PUT.
        assert_eq!(batch(10, 13).objects.len(), 1);
        assert_eq!(requests_per_commit(13).await, 2);
        // Of two hours: one more PUT, beside the first object's.
        assert_eq!(batch(10, 19).objects.len(), 2);
        assert_eq!(requests_per_commit(19).await, 3);
    }

    #[tokio::test]
    async fn a_crash_at_every_request_loses_and_duplicates_nothing() {
        let n = requests_per_commit(19).await;
        // Also crash inside the recovery (and its rebuild) that follows a crash.
        for crash_at in 1..=n + 1 {
            // A recovery that rebuilds two objects makes up to 6 requests.
            for recovery_crash in std::iter::once(None).chain((1..=6).map(Some)) {
                let (mem, store) = new_store();
                let r = patient();
                let (mut a, _) = take_over(&store, &r).await.expect("start");
                commit(&mut a, batch(0, 9)).await.expect("commit");
                mem.inject(Some(Fault::CrashAt(crash_at)));
                r.abort.cancel(); // the process dies at its first failed request
                let crashed = commit(&mut a, batch(10, 19)).await;
                drop(a);
                if let Some(at) = recovery_crash {
                    mem.inject(Some(Fault::CrashAt(at)));
                    let _ = take_over(&store, &dying()).await;
                }
                mem.inject(None);
                // The next process resumes, cutting batches differently.
                let (mut b, mut next) = take_over(&store, &patient())
                    .await
                    .unwrap_or_else(|e| panic!("crash at {crash_at}: recovery failed: {e}"));
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
                    commit(&mut b, batch(next, last)).await.expect("commit");
                    next = last + 1;
                }
                assert_exactly_once(&mem, &store, 30).await;
            }
        }
    }

    #[tokio::test]
    async fn a_crash_after_the_checkpoint_is_finished_by_rebuilding_from_kafka() {
        let (mem, store) = new_store();
        let r = patient();
        let (mut a, _) = take_over(&store, &r).await.expect("start");
        commit(&mut a, batch(0, 9)).await.expect("commit");
        // The checkpoint lands, then the process dies: no object of 10..=19 is written.
        mem.inject(Some(Fault::CrashAt(2)));
        r.abort.cancel();
        assert!(commit(&mut a, batch(10, 19)).await.is_err());
        mem.inject(None);
        let mut b = committer(&store, &patient());
        assert_eq!(
            b.recover().await.expect("recover"),
            Plan::Rebuild {
                first: 10,
                last: 19
            }
        );
        assert!(!visible(&mem).contains_key(&11));
        Committer::complete(&mut b, batch(10, 19))
            .await
            .expect("complete");
        commit(&mut b, batch(20, 29)).await.expect("commit");
        assert_exactly_once(&mem, &store, 30).await;
    }

    #[tokio::test]
    async fn a_rebuild_that_would_write_other_bytes_stops_and_writes_nothing() {
        let (mem, store) = new_store();
        let r = patient();
        let (mut a, _) = take_over(&store, &r).await.expect("start");
        mem.inject(Some(Fault::CrashAt(2)));
        r.abort.cancel();
        assert!(commit(&mut a, batch(0, 9)).await.is_err());
        mem.inject(None);

        // Another routing table: refused at recovery, with what to do.
        let mut other = ObjectCommitter::new(
            store.clone(),
            layout(),
            PARTITION,
            patient(),
            MadeWith {
                routing: "ffff0000".into(),
                ..made_with()
            },
        );
        let e = other
            .recover()
            .await
            .expect_err("other routing")
            .to_string();
        assert!(e.contains("routing file") && e.contains("0..=9"), "{e}");

        // The same settings, but Kafka now holds other tickets (or they validate otherwise).
        let mut b = committer(&store, &patient());
        assert_eq!(
            b.recover().await.expect("recover"),
            Plan::Rebuild { first: 0, last: 9 }
        );
        let mut changed = batch(0, 9);
        changed.objects[0].body = Bytes::from_static(b"1\n2\n4\n3\n");
        let e = Committer::complete(&mut b, changed)
            .await
            .expect_err("other bytes")
            .to_string();
        assert!(
            e.contains("other objects") && e.contains("remove \"batch\""),
            "{e}"
        );
        assert!(
            visible(&mem).is_empty(),
            "nothing written under committed keys"
        );
    }

    #[tokio::test]
    async fn a_lost_answer_at_every_request_is_retried_into_exactly_once() {
        let n = requests_per_commit(19).await;
        for lost in 1..=n {
            let (mem, store) = new_store();
            let (mut a, _) = take_over(&store, &patient()).await.expect("start");
            commit(&mut a, batch(0, 9)).await.expect("commit");
            mem.inject(Some(Fault::LoseAnswerOf(lost)));
            // The checkpoint's conditional write: its retry conflicts with itself and must be
            // recognised as ours rather than as a fence. An object's: its retry finds it there.
            commit(&mut a, batch(10, 19))
                .await
                .unwrap_or_else(|e| panic!("answer of request {lost} lost: {e}"));
            mem.inject(None);
            commit(&mut a, batch(20, 29)).await.expect("commit");
            assert_exactly_once(&mem, &store, 30).await;
        }
    }

    #[tokio::test]
    async fn a_stale_owner_is_fenced_and_leaves_nothing_visible() {
        let (mem, store) = new_store();
        let r = patient();
        let (mut stale, _) = take_over(&store, &r).await.expect("start");
        commit(&mut stale, batch(0, 9)).await.expect("commit");
        // The partition moves: the new owner loads the checkpoint and commits on.
        let (mut owner, at) = take_over(&store, &r).await.expect("take over");
        assert_eq!(at, 10);
        commit(&mut owner, batch(10, 19)).await.expect("commit");
        // The old owner, unaware, writes its own cut of the same offsets.
        let fenced = commit(&mut stale, batch(10, 14)).await;
        assert!(
            matches!(fenced, Err(Failure::Fenced(PARTITION))),
            "{fenced:?}"
        );
        // ... and after reloading resumes where the owner is.
        let (_, at) = take_over(&store, &r).await.expect("reload");
        assert_eq!(at, 20);
        assert_exactly_once(&mem, &store, 20).await;
    }

    #[tokio::test]
    async fn a_stale_owner_that_wakes_after_its_checkpoint_writes_no_duplicate() {
        let (mem, store) = new_store();
        let r = patient();
        let (mut stale, _) = take_over(&store, &r).await.expect("start");
        commit(&mut stale, batch(0, 9)).await.expect("commit");
        // Its checkpoint of 10..=19 lands, then it freezes before the objects (a GC pause).
        mem.inject(Some(Fault::Outage { from: 2, count: 1 }));
        r.abort.cancel();
        assert!(matches!(
            commit(&mut stale, batch(10, 19)).await,
            Err(Failure::Aborted)
        ));
        // The new owner rebuilds the batch from Kafka and goes on.
        mem.inject(None);
        let (mut owner, at) = take_over(&store, &patient()).await.expect("take over");
        assert_eq!(at, 20);
        commit(&mut owner, batch(20, 29)).await.expect("commit");
        // The stale owner wakes and writes its objects: they are there already.
        let again = stale.prepare(batch(10, 19));
        stale.retry = patient();
        stale
            .create_objects(&again.intent, &again.batch)
            .await
            .expect("already there");
        assert_exactly_once(&mem, &store, 30).await;
    }

    #[tokio::test]
    async fn a_transient_outage_is_retried_and_a_refusal_stops_at_once() {
        let (mem, store) = new_store();
        let (mut c, _) = take_over(&store, &patient()).await.expect("start");
        mem.inject(Some(Fault::Outage { from: 1, count: 5 }));
        commit(&mut c, batch(0, 9)).await.expect("commit");
        assert_exactly_once(&mem, &store, 10).await;

        // A 403 on the final key: no retry loop, an error that says what to grant.
        mem.refuse_writes_under(&layout().tickets_prefix());
        let msg = match commit(&mut c, batch(10, 19)).await {
            Err(Failure::Fatal(e)) => e.to_string(),
            other => panic!("expected a fatal error, got {other:?}"),
        };
        assert!(
            msg.contains("403") && msg.contains("grant"),
            "message: {msg}"
        );
    }

    #[tokio::test]
    async fn a_batch_of_dead_letters_only_writes_just_the_checkpoint() {
        let (mem, store) = new_store();
        let (mut c, _) = take_over(&store, &patient()).await.expect("start");
        mem.inject(None);
        commit(&mut c, batch(7, 7)).await.expect("commit");
        assert_eq!(mem.requests(), 1);
        assert!(visible(&mem).is_empty());
        assert_eq!(c.checkpoint().dead_letters, 1);
        assert_eq!(c.checkpoint().batch, None);
    }

    /// What version 0.1.0 leaves after a crash between its commit point and its copy: the
    /// checkpoint names a staged object, and an unrelated staging object of a batch that
    /// never committed lies beside it.
    async fn earlier_versions_crash(store: &SharedStore) -> String {
        let l = layout();
        let staged = l.staging_key(PARTITION, 10, "old", 0, "jsonl");
        let final_key = l.tickets_key(PARTITION, hour_of(10), 10, 13, "jsonl");
        let uncommitted = l.staging_key(PARTITION, 10, "older", 0, "jsonl");
        for key in [&staged, &uncommitted] {
            store
                .put(key, Bytes::from_static(b"10\n11\n12\n13\n"), Expect::Any)
                .await
                .expect("put");
        }
        let mut counts = Counts::default();
        counts.add(&ticket_core::counts::CountRow {
            request_type: "billing".into(),
            priority: "low".into(),
            support_team: "Billing Team".into(),
            count: 12,
        });
        let (tickets, dead) = (batch(0, 9).valid + 4, batch(0, 9).dead_letters);
        let cp = serde_json::json!({
            "next_offset": 14, "tickets": tickets, "dead_letters": dead,
            "counts": counts.rows(),
            "pending": {"staging_key": staged, "final_key": final_key},
        });
        store
            .put(
                &l.checkpoint_key(PARTITION),
                Bytes::from(cp.to_string()),
                Expect::Any,
            )
            .await
            .expect("put");
        final_key
    }

    #[tokio::test]
    async fn an_earlier_versions_pending_batch_is_finished_once_even_through_crashes() {
        for crash_at in std::iter::once(None).chain((1..=6).map(Some)) {
            let (mem, store) = new_store();
            let r = patient();
            let (mut c, _) = take_over(&store, &r).await.expect("start");
            commit(&mut c, batch(0, 9)).await.expect("commit");
            let final_key = earlier_versions_crash(&store).await;
            if let Some(at) = crash_at {
                mem.inject(Some(Fault::CrashAt(at)));
                let _ = take_over(&store, &dying()).await;
                mem.inject(None);
            }
            let (mut next, at) = take_over(&store, &patient()).await.expect("upgrade");
            assert_eq!(at, 14);
            assert_eq!(
                mem.bytes(&final_key).as_deref(),
                Some(&b"10\n11\n12\n13\n"[..]),
                "crash at {crash_at:?}"
            );
            // Committed past the uncommitted staging object: it goes too.
            commit(&mut next, batch(14, 29)).await.expect("commit");
            assert!(next.checkpoint().pending.is_empty());
            assert_exactly_once(&mem, &store, 30).await;
        }
    }
}
