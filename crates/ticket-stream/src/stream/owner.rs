//! [`PartitionOwner`]: one partition this instance is responsible for, the one owner of its
//! state from the moment it is first seen to the moment it is closed.
//!
//! ```text
//!   first message / --drain's assignment
//!              │
//!              ▼
//!          Loading ──── its committer recovers it from the store (a task); messages are
//!              │        dropped meanwhile, the seek to the plan's offset re-fetches them
//!              │ recovered (a Plan)
//!              ▼
//!            Open ───── its batches (partition.rs: Rebuilding a committed range first if the
//!              │        plan says so, then Idle, Building, InFlight) and the writer, whose
//!              │        tasks own the committer and the committer's store
//!              │
//!              ▼ close(Revoked | Rewind | Stop): the one way out
//!           (gone) ──── Revoked, Rewind: the writer is cancelled, unwritten batches dropped
//!                       (the next owner reads them again); Stop: the writer finishes what it
//!                       was given. A late report carries the old epoch and is ignored.
//! ```
//!
//! The consumer's loop (`stream`) keeps the consumer, numbers the ownerships (epochs) and
//! commits offsets when an owner reports a batch durable; everything else about a partition
//! is here.

use std::sync::Arc;
use std::time::Instant;

use ticket_core::batch::BatchPolicy;
use tokio::task::JoinHandle;

use super::partition::{Partition, RangeGone, Written};
use super::writer::{RawBatch, Writer, WriterContext};
use crate::metrics::Metrics;
use ticket_commit::{Committer, Plan};

/// A message as [`PartitionOwner::accept`] takes it: offset, Kafka timestamp (ms), key, payload.
pub type Incoming<'a> = (i64, Option<i64>, Option<&'a [u8]>, Option<&'a [u8]>);

pub struct PartitionOwner {
    pub id: i32,
    /// Tells this ownership from an earlier one of the same partition: reports carry it.
    epoch: u64,
    life: Life,
}

enum Life {
    /// Its committer is recovering it; its messages are dropped (the seek re-fetches them).
    Loading,
    /// Recovered: its batches, and the writer that owns its committer.
    Open {
        batches: Partition<RawBatch>,
        writer: Writer,
    },
}

/// Why a partition is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Another instance owns it now (a rebalance).
    Revoked,
    /// A batch was not written (fenced, a dead letter not delivered, the processor stopping
    /// while retrying): read it again from the checkpoint, as a new ownership if still ours.
    Rewind,
    /// The processor stops: the writer finishes the batches it was given.
    Stop,
}

/// What [`PartitionOwner::hand_over`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// Nothing due (or still loading).
    NotDue,
    /// The due batch went to the writer.
    Sent,
    /// A batch is due but the writer has no room: the consumer should wait.
    NoRoom,
}

impl PartitionOwner {
    /// A partition first seen: its committer is being recovered.
    pub fn loading(id: i32, epoch: u64) -> PartitionOwner {
        PartitionOwner {
            id,
            epoch,
            life: Life::Loading,
        }
    }

    /// A partition recovered as `plan` says, with a writer of its own around `committer`.
    pub fn open(
        id: i32,
        epoch: u64,
        ctx: Arc<WriterContext>,
        committer: Box<dyn Committer>,
        plan: Plan,
    ) -> PartitionOwner {
        PartitionOwner {
            id,
            epoch,
            life: Life::Open {
                batches: Partition::from_plan(epoch, plan),
                writer: Writer::spawn(ctx, id, epoch, committer),
            },
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Still recovering, as ownership `epoch`.
    pub fn is_loading_as(&self, epoch: u64) -> bool {
        self.epoch == epoch && matches!(self.life, Life::Loading)
    }

    pub fn is_open(&self) -> bool {
        matches!(self.life, Life::Open { .. })
    }

    /// The next offset to handle, once open: where a `--drain` stands in the partition.
    pub fn expected(&self) -> Option<i64> {
        match &self.life {
            Life::Open { batches, .. } => Some(batches.expected()),
            Life::Loading => None,
        }
    }

    /// The offsets handled but not written yet, if any (see [`Partition::unwritten`]).
    pub fn unwritten(&self) -> Option<(i64, i64)> {
        match &self.life {
            Life::Open { batches, .. } => batches.unwritten(),
            Life::Loading => None,
        }
    }

    /// The committed range being read again, while some of it is still to come.
    pub fn rebuilding(&self) -> Option<(i64, i64)> {
        match &self.life {
            Life::Open { batches, .. } => batches.rebuilding(),
            Life::Loading => None,
        }
    }

    /// Adds a message to the open batch (a message while loading, or one already handled, is
    /// dropped); an error if it shows a committed range being read again is gone from Kafka.
    pub fn accept(
        &mut self,
        (offset, timestamp, key, payload): Incoming<'_>,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<(), RangeGone> {
        let Life::Open { batches, .. } = &mut self.life else {
            return Ok(());
        };
        batches.check(offset)?;
        if let Some(batch) = batches.offer(offset, now) {
            batch.push(offset, timestamp, key, payload.unwrap_or_default());
            metrics.tickets_in.inc();
        }
        Ok(())
    }

    /// When the open batch is due by age, if the writer could take it then.
    pub fn deadline(&self, policy: &BatchPolicy) -> Option<Instant> {
        match &self.life {
            Life::Open { batches, .. } if batches.can_seal() => batches.deadline(policy),
            _ => None,
        }
    }

    /// Hands the open batch to the writer if it is due.
    pub fn hand_over(&mut self, policy: &BatchPolicy, now: Instant) -> HandOver {
        let Life::Open { batches, writer } = &mut self.life else {
            return HandOver::NotDue;
        };
        if batches.due(policy, now).is_none() {
            return HandOver::NotDue;
        }
        match batches.seal() {
            Some(batch) => {
                writer.send(batch);
                HandOver::Sent
            }
            None => HandOver::NoRoom,
        }
    }

    /// The writer wrote the batch `first..=last` of ownership `epoch`.
    pub fn written(&mut self, epoch: u64, first: i64, last: i64) -> Written {
        match &mut self.life {
            Life::Open { batches, .. } if epoch == self.epoch => {
                batches.written(epoch, first, last)
            }
            _ => Written::Stale,
        }
    }

    /// On a stop: hands over whatever is buffered, as the writer has room (a committed range
    /// read again only in part cannot be a batch of its own: it is dropped, and read again by
    /// the next owner). Returns whether anything is still to be written.
    pub fn flush_for_stop(&mut self) -> bool {
        let Life::Open { batches, writer } = &mut self.life else {
            return false;
        };
        batches.drop_partial_rebuild();
        if let Some(batch) = batches.seal() {
            writer.send(batch);
        }
        !batches.is_settled()
    }

    /// Closes the partition. On [`Close::Stop`], returns the writer's task, which ends once
    /// the batches it was given are written.
    pub fn close(self, why: Close) -> Option<JoinHandle<()>> {
        let Life::Open { batches, writer } = self.life else {
            return None;
        };
        if why == Close::Stop {
            return Some(writer.close());
        }
        if !batches.is_settled() {
            tracing::info!(
                partition = self.id,
                phase = ?batches.phase(),
                why = ?why,
                "Dropping the unwritten batches of a partition closed."
            );
        }
        writer.cancel();
        None
    }
}
