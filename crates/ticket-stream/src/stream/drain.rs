//! `--drain`: when the topic's end as of start is reached. No Kafka in here: the consumer's
//! positions are passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// A partition past its end offset as of start with no message for this long is done: a
/// broker that under-reports its high watermark (Tansu 0.6) may never send end-of-partition.
pub const DRAIN_IDLE: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct Drain {
    /// Each partition's end offset as of start.
    targets: BTreeMap<i32, i64>,
    done: BTreeSet<i32>,
    /// When a message of a partition last arrived.
    last_message: HashMap<i32, Instant>,
}

impl Drain {
    pub fn new(targets: BTreeMap<i32, i64>, now: Instant) -> Drain {
        let last_message = targets.keys().map(|p| (*p, now)).collect();
        Drain {
            targets,
            done: BTreeSet::new(),
            last_message,
        }
    }

    pub fn targets(&self) -> &BTreeMap<i32, i64> {
        &self.targets
    }

    pub fn message(&mut self, partition: i32, now: Instant) {
        self.last_message.insert(partition, now);
    }

    /// End of partition reported; `position` is the fetch position (past transaction markers).
    pub fn end_of_partition(&mut self, partition: i32, position: Option<i64>) {
        if position
            .zip(self.targets.get(&partition))
            .is_some_and(|(pos, end)| pos >= *end)
        {
            self.done.insert(partition);
        }
    }

    /// The idle rule, checked on every tick.
    pub fn tick(&mut self, now: Instant, position: impl Fn(i32) -> Option<i64>) {
        for (p, end) in &self.targets {
            if !self.done.contains(p)
                && self
                    .last_message
                    .get(p)
                    .is_some_and(|t| now.saturating_duration_since(*t) > DRAIN_IDLE)
                && position(*p).is_some_and(|pos| pos >= *end)
            {
                self.done.insert(*p);
            }
        }
    }

    /// The partition was sent back to an earlier offset: not done any more.
    pub fn rewound(&mut self, partition: i32, now: Instant) {
        self.done.remove(&partition);
        self.last_message.insert(partition, now);
    }

    pub fn finished(&self) -> bool {
        self.targets.keys().all(|p| self.done.contains(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_when_every_partition_reached_its_end_as_of_start() {
        let t0 = Instant::now();
        let mut d = Drain::new(BTreeMap::from([(0, 100), (1, 0)]), t0);
        assert!(!d.finished());
        d.end_of_partition(0, Some(99));
        assert!(!d.finished(), "short of the end");
        d.end_of_partition(0, Some(100));
        // Partition 1 is empty and never reports the end: the idle rule finishes it.
        d.tick(t0 + Duration::from_secs(1), |_| Some(0));
        assert!(!d.finished());
        d.tick(t0 + DRAIN_IDLE + Duration::from_millis(1), |_| Some(0));
        assert!(d.finished());
    }

    #[test]
    fn a_rewound_partition_is_not_done_any_more() {
        let t0 = Instant::now();
        let mut d = Drain::new(BTreeMap::from([(0, 10)]), t0);
        d.end_of_partition(0, Some(10));
        assert!(d.finished());
        d.rewound(0, t0);
        assert!(!d.finished());
    }
}
