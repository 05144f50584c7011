//! The batches of one open partition, with no Kafka and no I/O in them: which offsets were
//! already handled, the batch being built, and the batches handed to the partition's writer
//! but not yet written. [`super::owner::PartitionOwner`] holds one from the moment the
//! partition's committer recovered it.
//!
//! ```text
//!   recovered with Plan::Rebuild ──▶ Rebuilding: exactly the recorded range, as one batch,
//!                                      │          never cut by the policy
//!   recovered with Plan::Resume ─┐     │ sealed at the range's last offset
//!                                ▼     ▼
//!   ┌──▶ Idle ──offer──▶ Building ──seal──▶ InFlight(n) ──written──▶ (commit offsets)
//!   │                      ▲    │                 │
//!   └──────────────────────┴────┘ (building while │ up to MAX_IN_FLIGHT are written)
//!                                                 ▼
//!             a writer failed, revoked, stopping: the owner closes it (owner.rs)
//! ```

use std::collections::VecDeque;
use std::time::Instant;

use ticket_core::batch::{BatchPolicy, FlushReason};

use ticket_commit::Plan;

/// Batches of one partition that may be handed to its writer before the consumer waits: one
/// being committed while the next is encoded, so that S3 round trips, encoding and building
/// overlap. Each one more costs memory (a batch and its body).
pub const MAX_IN_FLIGHT: usize = 2;

/// What a batch under construction holds; its size counts towards `BATCH_MAX_BYTES`.
pub trait Buffer: Default {
    fn bytes(&self) -> usize;

    /// An empty buffer with room for a batch of `records` messages and `bytes` bytes (the
    /// size of the partition's previous batch), so that it does not grow step by step.
    fn with_room_for(records: usize, bytes: usize) -> Self {
        let _ = (records, bytes);
        Self::default()
    }
}

/// A batch being built: the offsets it covers (valid or not) and when it started.
#[derive(Debug)]
pub struct Open<B> {
    pub first: i64,
    pub last: i64,
    pub started: Instant,
    pub buf: B,
    /// A committed range read again from Kafka ([`Plan::Rebuild`]): its dead letters were
    /// sent the first time, and its objects are checked against the record, not committed.
    pub rebuild: bool,
}

impl<B> Open<B> {
    pub fn records(&self) -> usize {
        (self.last - self.first + 1) as usize
    }
}

/// Where a partition is in the life of its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Building,
    InFlight(usize),
    BuildingWhileInFlight(usize),
}

/// What became of a writer's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The batch is durable: commit this offset to Kafka.
    Commit(i64),
    /// The report is of an earlier ownership (revoked, or rewound since): ignore it.
    Stale,
}

#[derive(Debug)]
pub struct Partition<B> {
    /// Tells this ownership from an earlier one of the same partition: reports carry it.
    epoch: u64,
    /// Offsets below this were handled (written, in flight, or in `open`); a message below
    /// it was fetched before a seek and is dropped.
    expected: i64,
    open: Option<Open<B>>,
    /// Sealed batches handed to the writer, oldest first: `(first, last)`.
    in_flight: VecDeque<(i64, i64)>,
    /// Records and bytes of the last batch sealed: the room the next one starts with.
    last_size: (usize, usize),
    /// The committed range `(first, last)` to read again as one batch before anything else
    /// ([`Plan::Rebuild`]), until it is sealed.
    rebuild: Option<(i64, i64)>,
}

/// A message that a rebuild of a committed range cannot take: the range is not in Kafka as
/// it was when it was committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "offsets {first}..={last} are committed in S3 but some of their objects are not written yet, and Kafka no longer has offset {missing} (it delivered {got} instead: retention or compaction removed it, or the topic was deleted and created again)"
)]
pub struct RangeGone {
    pub first: i64,
    pub last: i64,
    pub missing: i64,
    pub got: i64,
}

impl<B: Buffer> Partition<B> {
    /// A partition owned from `next_offset` on (its checkpoint's).
    pub fn new(epoch: u64, next_offset: i64) -> Partition<B> {
        Partition {
            epoch,
            expected: next_offset,
            open: None,
            in_flight: VecDeque::new(),
            last_size: (0, 0),
            rebuild: None,
        }
    }

    /// A partition owned as its committer recovered it: from an offset, or first reading a
    /// committed range again as exactly one batch.
    pub fn from_plan(epoch: u64, plan: Plan) -> Partition<B> {
        let mut p = Partition::new(epoch, plan.start());
        if let Plan::Rebuild { first, last } = plan {
            p.rebuild = Some((first, last));
        }
        p
    }

    /// Whether the message at `offset` may be offered: while a committed range is read
    /// again, its first offset must be the first to come (a data message: it began the batch)
    /// and its last must come before anything past it. Gaps inside are checked by the
    /// committer against the recorded counts and checksums (a transaction's marker takes an
    /// offset too, so a gap alone proves nothing).
    pub fn check(&self, offset: i64) -> Result<(), RangeGone> {
        let Some((first, last)) = self.rebuild else {
            return Ok(());
        };
        if offset < self.expected {
            return Ok(()); // dropped by `offer` anyway
        }
        let started = self.open.is_some();
        if (!started && offset != first) || offset > last {
            return Err(RangeGone {
                first,
                last,
                missing: if started { last } else { first },
                got: offset,
            });
        }
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next offset to handle: where a `--drain` stands in the partition.
    pub fn expected(&self) -> i64 {
        self.expected
    }

    /// The committed range being read again, while some of it is still to come.
    pub fn rebuilding(&self) -> Option<(i64, i64)> {
        let (first, last) = self.rebuild?;
        let all_read = self.open.as_ref().is_some_and(|o| o.last == last);
        (!all_read).then_some((first, last))
    }

    pub fn phase(&self) -> Phase {
        match (self.open.is_some(), self.in_flight.len()) {
            (false, 0) => Phase::Idle,
            (true, 0) => Phase::Building,
            (false, n) => Phase::InFlight(n),
            (true, n) => Phase::BuildingWhileInFlight(n),
        }
    }

    /// The batch under construction to add the message at `offset` to, or `None` if that
    /// offset was already handled.
    pub fn offer(&mut self, offset: i64, now: Instant) -> Option<&mut B> {
        if offset < self.expected {
            return None;
        }
        self.expected = offset + 1;
        let open = self.open.get_or_insert_with(|| Open {
            first: offset,
            last: offset,
            started: now,
            buf: B::with_room_for(self.last_size.0, self.last_size.1),
            rebuild: false,
        });
        open.last = offset;
        Some(&mut open.buf)
    }

    /// Whether the batch under construction is due by the policy.
    pub fn due(&self, policy: &BatchPolicy, now: Instant) -> Option<FlushReason> {
        let open = self.open.as_ref()?;
        if let Some((_, last)) = self.rebuild {
            // Cut where it was cut the first time, never by the policy.
            return (open.last == last).then_some(FlushReason::Rebuilt);
        }
        policy.due(
            open.records(),
            open.buf.bytes(),
            now.saturating_duration_since(open.started),
        )
    }

    /// When the batch under construction becomes due by age, if it is not handed over before.
    pub fn deadline(&self, policy: &BatchPolicy) -> Option<Instant> {
        if self.rebuild.is_some() {
            return None;
        }
        self.open.as_ref().map(|o| o.started + policy.max_age)
    }

    /// Whether the writer can take another batch now.
    pub fn can_seal(&self) -> bool {
        let complete = match (self.rebuild, &self.open) {
            (Some((_, last)), Some(open)) => open.last == last,
            _ => true,
        };
        self.open.is_some() && complete && self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// Hands the batch under construction over (for its writer), if the writer can take it.
    pub fn seal(&mut self) -> Option<Open<B>> {
        if !self.can_seal() {
            return None;
        }
        let mut open = self.open.take()?;
        open.rebuild = self.rebuild.take().is_some();
        self.last_size = (open.records(), open.buf.bytes());
        self.in_flight.push_back((open.first, open.last));
        Some(open)
    }

    /// The writer wrote the batch `first..=last` of ownership `epoch`.
    pub fn written(&mut self, epoch: u64, first: i64, last: i64) -> Written {
        if epoch != self.epoch || self.in_flight.front() != Some(&(first, last)) {
            return Written::Stale;
        }
        self.in_flight.pop_front();
        Written::Commit(last + 1)
    }

    /// Drops everything not yet written and resumes at `next_offset` as ownership `epoch`
    /// (after a fence or a failed dead letter; the caller seeks the consumer).
    pub fn rewind(&mut self, epoch: u64, next_offset: i64) {
        *self = Partition::new(epoch, next_offset);
    }

    /// The offsets handled but not written yet (in flight or being built), if any.
    pub fn unwritten(&self) -> Option<(i64, i64)> {
        let first = self
            .in_flight
            .front()
            .map(|b| b.0)
            .or(self.open.as_ref().map(|o| o.first))?;
        let last = self
            .open
            .as_ref()
            .map(|o| o.last)
            .or(self.in_flight.back().map(|b| b.1))?;
        Some((first, last))
    }

    /// Nothing buffered and nothing in flight.
    pub fn is_settled(&self) -> bool {
        self.phase() == Phase::Idle
    }

    /// On a stop: drops a committed range read again only in part (it cannot be written as
    /// a batch of its own; the next owner reads it again).
    pub fn drop_partial_rebuild(&mut self) {
        if self.rebuild.is_some() {
            self.open = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A buffer that is just the offsets it holds (and the room it was made with).
    #[derive(Default, Debug)]
    struct Offsets(Vec<i64>, (usize, usize));

    impl Buffer for Offsets {
        fn bytes(&self) -> usize {
            self.0.len() * 100
        }

        fn with_room_for(records: usize, bytes: usize) -> Self {
            Offsets(Vec::with_capacity(records), (records, bytes))
        }
    }

    fn policy() -> BatchPolicy {
        BatchPolicy {
            max_records: 3,
            max_bytes: 1_000,
            max_age: Duration::from_secs(5),
        }
    }

    fn feed(p: &mut Partition<Offsets>, offsets: std::ops::RangeInclusive<i64>, now: Instant) {
        for o in offsets {
            if let Some(b) = p.offer(o, now) {
                b.0.push(o);
            }
        }
    }

    #[test]
    fn batches_are_sealed_in_order_and_committed_as_their_writer_reports() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 10);
        assert_eq!(p.phase(), Phase::Idle);
        feed(&mut p, 10..=12, now);
        assert_eq!(p.due(&policy(), now), Some(FlushReason::Size));
        let a = p.seal().expect("first batch");
        assert_eq!(
            (a.first, a.last, a.buf.0.clone()),
            (10, 12, vec![10, 11, 12])
        );
        feed(&mut p, 13..=15, now);
        let b = p.seal().expect("second batch");
        assert_eq!(p.phase(), Phase::InFlight(MAX_IN_FLIGHT));
        // A third batch waits for the writer: the consumer is held back, nothing is lost.
        feed(&mut p, 16..=18, now);
        assert_eq!(p.phase(), Phase::BuildingWhileInFlight(MAX_IN_FLIGHT));
        assert!(p.seal().is_none());
        // Reports commit in order; one out of order is not this partition's to commit.
        assert_eq!(p.written(1, b.first, b.last), Written::Stale);
        assert_eq!(p.written(1, 10, 12), Written::Commit(13));
        assert!(p.can_seal());
        assert_eq!(p.written(1, 13, 15), Written::Commit(16));
        assert_eq!(p.seal().map(|o| (o.first, o.last)), Some((16, 18)));
        assert_eq!(p.written(1, 16, 18), Written::Commit(19));
        assert!(p.is_settled());
    }

    #[test]
    fn a_batch_starts_with_room_for_the_previous_one_and_a_rewind_forgets_it() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 0);
        feed(&mut p, 0..=1, now);
        assert_eq!(p.seal().map(|o| o.buf.1), Some((0, 0)));
        feed(&mut p, 2..=4, now);
        assert_eq!(p.seal().map(|o| o.buf.1), Some((2, 200)));
        feed(&mut p, 5..=5, now);
        p.rewind(2, 5);
        feed(&mut p, 5..=5, now);
        assert_eq!(p.seal().map(|o| o.buf.1), Some((0, 0)));
    }

    #[test]
    fn offsets_already_handled_are_dropped_after_a_seek() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 5);
        // Fetched before the seek to the checkpoint's offset 5.
        feed(&mut p, 0..=6, now);
        assert_eq!(p.seal().map(|o| o.buf.0), Some(vec![5, 6]));
        // Redelivered after a reconnect: already handled.
        feed(&mut p, 5..=6, now);
        assert_eq!(p.phase(), Phase::InFlight(1));
        assert_eq!(p.expected(), 7);
    }

    #[test]
    fn age_makes_a_small_batch_due() {
        let start = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 0);
        assert_eq!(p.due(&policy(), start), None);
        assert_eq!(p.deadline(&policy()), None);
        feed(&mut p, 0..=0, start);
        assert_eq!(p.deadline(&policy()), Some(start + Duration::from_secs(5)));
        assert_eq!(p.due(&policy(), start + Duration::from_secs(1)), None);
        assert_eq!(
            p.due(&policy(), start + Duration::from_secs(5)),
            Some(FlushReason::Age)
        );
    }

    #[test]
    fn a_committed_range_is_read_again_as_exactly_one_batch() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::from_plan(1, Plan::Rebuild { first: 4, last: 9 });
        assert_eq!(p.check(2), Ok(()), "fetched before the seek: dropped");
        feed(&mut p, 2..=8, now);
        // More than the policy's 3 records, older than its 5 s: still not due, not sealed.
        let later = now + Duration::from_secs(60);
        assert_eq!(p.due(&policy(), later), None);
        assert_eq!(p.deadline(&policy()), None);
        assert!(p.seal().is_none());
        feed(&mut p, 9..=9, now);
        assert_eq!(p.due(&policy(), now), Some(FlushReason::Rebuilt));
        let b = p.seal().expect("the rebuilt batch");
        assert!(b.rebuild && (b.first, b.last) == (4, 9), "{b:?}");
        // Then batches are cut by the policy again.
        feed(&mut p, 10..=12, now);
        assert_eq!(p.due(&policy(), now), Some(FlushReason::Size));
        assert!(p.seal().is_some_and(|o| !o.rebuild));
    }

    #[test]
    fn a_committed_range_kafka_no_longer_has_is_an_error_not_a_skip() {
        // Retention deleted 4..=5: the consumer's first message is 6.
        let p = Partition::<Offsets>::from_plan(1, Plan::Rebuild { first: 4, last: 9 });
        let gone = p.check(6).expect_err("a gap");
        assert_eq!((gone.missing, gone.got), (4, 6));
        assert!(gone.to_string().contains("4..=9"), "{gone}");
        // The range's last offset missing: the next one comes before it.
        let mut p = Partition::<Offsets>::from_plan(1, Plan::Rebuild { first: 4, last: 9 });
        feed(&mut p, 4..=5, Instant::now());
        assert!(
            p.check(7).is_ok(),
            "a gap inside (a marker) is the committer's to judge"
        );
        let gone = p.check(10).expect_err("past the range");
        assert_eq!((gone.missing, gone.got), (9, 10));
        // A plain resume accepts gaps (transaction markers take offsets too).
        let p = Partition::<Offsets>::from_plan(1, Plan::Resume { at: 4 });
        assert!(p.check(6).is_ok());
    }

    #[test]
    fn what_is_unwritten_spans_the_batches_in_flight_and_the_one_being_built() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 10);
        assert_eq!(p.unwritten(), None);
        feed(&mut p, 10..=12, now);
        assert_eq!(p.unwritten(), Some((10, 12)));
        p.seal().expect("batch");
        feed(&mut p, 13..=14, now);
        assert_eq!(p.unwritten(), Some((10, 14)));
        assert_eq!(p.written(1, 10, 12), Written::Commit(13));
        assert_eq!(p.unwritten(), Some((13, 14)));
        p.seal().expect("batch");
        assert_eq!(p.unwritten(), Some((13, 14)));
        assert_eq!(p.written(1, 13, 14), Written::Commit(15));
        assert_eq!(p.unwritten(), None);
    }

    #[test]
    fn a_rewind_drops_what_is_not_written_and_ignores_the_old_epoch() {
        let now = Instant::now();
        let mut p = Partition::<Offsets>::new(1, 0);
        feed(&mut p, 0..=2, now);
        let a = p.seal().expect("batch");
        feed(&mut p, 3..=4, now);
        // The writer failed on `a` (fenced, or a dead letter not delivered): resume at the
        // checkpoint's offset, as a new ownership.
        p.rewind(2, 0);
        assert!(p.is_settled());
        assert_eq!(p.written(1, a.first, a.last), Written::Stale);
        feed(&mut p, 0..=2, now);
        let again = p.seal().expect("replayed batch");
        assert_eq!(again.buf.0, vec![0, 1, 2]);
        assert_eq!(p.written(2, 0, 2), Written::Commit(3));
    }
}
