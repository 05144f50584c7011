//! `ticket-objects`: the object layout, objects of JSON Lines or Parquet under
//! `tickets_with_team/` with a checkpoint per partition: how a micro-batch of one partition
//! becomes part of the results, exactly once.
//!
//! The protocol is `ticket-commit`'s [`Committer`] (recover, commit, complete); Kafka stays
//! outside it: [`Committer::recover`] returns a [`Plan`] (resume at an offset, or first rebuild
//! a recorded range), and the loop does the reading. [`ObjectCommitter`] implements it:
//!
//! Each partition has a checkpoint object (`_checkpoints/.../partition=N.json`) holding the next
//! offset to process and the running totals. A batch covering offsets `first..=last` becomes
//! one object per UTC hour its tickets fall in (usually one; see [`Batch::objects`]), written:
//!
//! 1. **the intent**: the new checkpoint (`next_offset = last + 1`, the totals, and `batch`:
//!    the offsets, the format, what the objects were made with, and per object its key, hour,
//!    offsets, ticket count and CRC32C), written **conditionally on the ETag of the checkpoint
//!    this owner loaded** (`If-Match`). This is the commit point: a stale owner (the partition
//!    moved to another instance) fails here and writes nothing;
//! 2. **the objects, once, in place**: each created with `If-None-Match: *` under its final
//!    key. One that already exists is done (another owner, or our own write whose answer was
//!    lost, created it with the same bytes). Nothing is staged, copied or deleted;
//! 3. only then does the caller commit the Kafka offset (invariant: never before S3 is durable).
//!
//! Two sequential requests per batch with valid tickets (the conditional PUT, then the
//! objects' PUTs side by side), one (the checkpoint) for a batch of dead letters only. The next
//! batch's checkpoint is written only once the previous batch's objects are (one committer
//! task per partition, one batch at a time), so a checkpoint's `batch` is the only one that
//! can have objects missing.
//!
//! **Recovery.** A crash before 1 leaves nothing: the batch is processed again from the
//! checkpoint's offset. A crash after 1 leaves a recorded batch whose objects may be missing;
//! whoever loads the checkpoint next checks them (one HEAD each) and, if any is missing,
//! returns [`Plan::Rebuild`]: the loop reads exactly `first..=last` from Kafka again (never
//! re-cut by the batch policy; dead letters are not sent twice), and
//! [`Committer::complete`] checks the rebuilt objects' keys, ticket counts and checksums
//! against the record before it creates the missing ones. A mismatch (the routing table, the
//! output format or the validator changed in between) stops the processor with what to do,
//! rather than write other bytes under a committed key. Because replay always starts at the
//! checkpoint's offset (or the recorded batch's first), a replay never writes a range that
//! overlaps one already committed, however its batches are cut; and because an object's key
//! comes from its tickets (their hour, first and last offsets), the same tickets always make
//! the same keys. This is how Kafka Connect's S3 sink and kafka-delta-ingest work: Kafka is
//! the log, S3 holds what is committed.
//!
//! **The price: a recorded batch depends on Kafka's retention** until its objects are written,
//! exactly like every message not yet processed. The window runs from the checkpoint write to
//! the last object's, which an S3 outage or a stopped processor stretches; the batch is lost
//! only if the topic's retention passes first. Then the processor stops with an error that
//! names the topic, partition and offsets and says how to go on; it never skips them (the
//! loop checks the partition's first offset in Kafka before it seeks, and that the first
//! message delivered is the recorded first offset: `auto.offset.reset=earliest` would
//! otherwise jump forward without a word). `--drain` does not end while a recorded range is
//! still to be read: it waits while Kafka's partition ends past the range, and stops with the
//! same error once it ends before (the topic deleted and created again, or a broker that
//! answers a fetch past the end with nothing instead of "offset out of range").
//!
//! **Upgrades.** Versions up to 0.1.0 staged each object, wrote `pending: {staging_key,
//! final_key}` into the checkpoint, copied and deleted. A checkpoint such a version left with
//! `pending` is finished here from its staging object (copy, then delete it), exactly once;
//! this version never writes `pending`, and those versions ignore `batch`, so a rollback
//! resumes after this version's last batch and never touches its keys. Roll back after a
//! clean stop (every batch's objects written); after a crash, start this version once so that
//! it completes its last batch.
//!
//! The unit tests (in [`committer`]) crash the protocol at every request (recovery included, with the
//! rebuild from Kafka), lose the answer of every request, and run a stale owner against a new
//! one, on [`ticket_s3::store::memory::MemStore`].

pub mod committer;
pub mod totals;
mod upgrade;

use std::sync::Arc;

use ticket_commit::retry::{BucketCheck, Check};
use ticket_commit::{Committer, Destination, Retrier, Totals};
use ticket_core::keys::Layout;
use ticket_s3::store::SharedStore;

pub use committer::{MadeWith, ObjectCommitter};
#[cfg(doc)]
use ticket_commit::{Batch, Plan};

/// The object layout as an output: what it gives the stream (committers, totals, the check
/// that judges a failed request).
#[derive(Clone)]
pub struct Objects {
    pub store: SharedStore,
    pub layout: Layout,
    pub made_with: MadeWith,
}

impl Destination for Objects {
    /// Partition `partition`'s [`ObjectCommitter`].
    fn committer(&self, partition: i32, retry: Retrier) -> Box<dyn Committer> {
        Box::new(ObjectCommitter::new(
            self.store.clone(),
            self.layout.clone(),
            partition,
            retry,
            self.made_with.clone(),
        ))
    }

    /// Every partition's checkpoint summed.
    fn totals(&self) -> Box<dyn Totals> {
        Box::new(totals::CheckpointTotals {
            store: self.store.clone(),
            layout: self.layout.clone(),
        })
    }

    /// The bucket.
    fn check(&self) -> Arc<dyn Check> {
        Arc::new(BucketCheck::new(self.store.clone(), self.layout.prefix()))
    }
}
