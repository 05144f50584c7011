//! `--drain`: own every partition from where S3 says it stopped, and end at the topic's end
//! as of start, with nothing committed left unwritten.
//!
//! [`Drain`] is the rule, with no Kafka in it (the consumer's positions are passed in); the
//! `Processor` methods after it are its Kafka side, called by the loop: the assignment and
//! the end offsets at start (`Processor::start_drain`), the positions on each tick, and the
//! end test (`Processor::drain_done`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::{Offset, TopicPartitionList};

use super::kafka::Kafka;
use super::{Event, Processor, range_gone, recover, still_in_kafka};

/// A partition past its end offset as of start with no message for this long is done: a
/// broker that under-reports its high watermark (Tansu 0.6) may never send end-of-partition.
pub const DRAIN_IDLE: Duration = Duration::from_secs(3);

/// How long the query of a partition's end offset may take (on a blocking thread of its own:
/// the loop never waits for it).
const END_OFFSET_TIMEOUT: Duration = Duration::from_secs(2);

/// A partition at its end as of start that still has to read a committed range again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// Kafka may still deliver the range: wait another idle period.
    Wait,
    /// Kafka has it no more: the partition ends before the range's last offset (`end`), or
    /// the consumer is past it (`position`) without having received it.
    Gone {
        end: Option<i64>,
        position: Option<i64>,
    },
}

#[derive(Debug)]
pub struct Drain {
    /// Each partition's end offset as of start.
    targets: BTreeMap<i32, i64>,
    done: BTreeSet<i32>,
    /// When a message of a partition last arrived.
    last_message: HashMap<i32, Instant>,
    /// Partitions whose committed range looked gone at the last end test.
    gone_once: BTreeSet<i32>,
    /// The partitions' end offsets as last read for the end test (`None`: the query failed).
    ends: HashMap<i32, Option<i64>>,
    /// Partitions whose end offset is being read.
    asking: BTreeSet<i32>,
}

impl Drain {
    pub fn new(targets: BTreeMap<i32, i64>, now: Instant) -> Drain {
        let last_message = targets.keys().map(|p| (*p, now)).collect();
        Drain {
            targets,
            done: BTreeSet::new(),
            last_message,
            gone_once: BTreeSet::new(),
            ends: HashMap::new(),
            asking: BTreeSet::new(),
        }
    }

    /// Whether to start reading the partition's end offset (none being read already).
    pub fn ask_end(&mut self, partition: i32) -> bool {
        self.asking.insert(partition)
    }

    /// The partition's end offset was read (`None`: it could not be).
    pub fn end_read(&mut self, partition: i32, end: Option<i64>) {
        self.asking.remove(&partition);
        self.ends.insert(partition, end);
    }

    /// The partition's end offset as last read, if it was.
    pub fn end(&self, partition: i32) -> Option<i64> {
        self.ends.get(&partition).copied().flatten()
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

    /// The end test for a partition that is done but still has offsets `..=last` of a
    /// committed range to read again, with the consumer's `position` and Kafka's `end` offset
    /// now (`None`: not known). Gone only when it looks so at two end tests in a row, an idle
    /// period apart (an end offset a broker under-reports once does not fail a drain);
    /// otherwise the partition is not done any more and waits.
    pub fn unfinished(
        &mut self,
        partition: i32,
        last: i64,
        position: Option<i64>,
        end: Option<i64>,
        now: Instant,
    ) -> Unfinished {
        let past = position.is_some_and(|p| p > last);
        let short = end.is_some_and(|e| e <= last);
        if (past || short) && !self.gone_once.insert(partition) {
            return Unfinished::Gone {
                end: end.filter(|_| short),
                position: position.filter(|_| past),
            };
        }
        if !(past || short) {
            self.gone_once.remove(&partition);
        }
        self.rewound(partition, now);
        Unfinished::Wait
    }
}

impl<K: Kafka> Processor<K> {
    /// Whether the drain is over: every partition at its end as of start, and no committed
    /// range left to read again.
    pub(super) fn drain_done(&mut self) -> anyhow::Result<bool> {
        if !self.drain.as_ref().is_some_and(Drain::finished) || !self.nothing_left_to_rebuild()? {
            return Ok(false);
        }
        tracing::info!("Reached the end of the topic as of start.");
        Ok(true)
    }

    /// The idle rule, with the consumer's positions.
    pub(super) fn drain_tick(&mut self, now: Instant) {
        let Some(d) = &self.drain else {
            return;
        };
        let positions: HashMap<i32, Option<i64>> = d
            .targets()
            .keys()
            .map(|p| (*p, self.position(*p)))
            .collect();
        if let Some(d) = &mut self.drain {
            d.tick(now, |p| positions.get(&p).copied().flatten());
        }
    }

    /// At the end of the topic as of start: whether no partition is still reading a committed
    /// range again. `--drain` never ends with a committed batch unwritten: while Kafka may
    /// still deliver the range, the drain waits; once it cannot ([`Drain::unfinished`]), that
    /// is the error a message from elsewhere in the range would give ([`range_gone`]). A
    /// broker that answers a fetch past a partition's end with nothing (Tansu 0.6) instead of
    /// "offset out of range" only ever gets here. No verdict while a partition is paused or a
    /// partition is loading: its plan may be a rebuild, and no message comes meanwhile.
    fn nothing_left_to_rebuild(&mut self) -> anyhow::Result<bool> {
        if !self.paused.is_empty() || self.owners.values().any(|o| !o.is_open()) {
            return Ok(false);
        }
        let rebuilding: Vec<(i32, (i64, i64))> = self
            .owners
            .iter()
            .filter_map(|(p, o)| Some((*p, o.rebuilding()?)))
            .collect();
        for (partition, (first, last)) in rebuilding {
            // The end offset as last read (an idle period ago at most), and read again for
            // the next end test: the verdict needs two in a row anyway.
            self.ask_end_offset(partition);
            let kafka = &self.settings.kafka;
            let position = self.position(partition);
            let Some(d) = &mut self.drain else {
                continue;
            };
            let end = d.end(partition);
            let why = match d.unfinished(partition, last, position, end, Instant::now()) {
                Unfinished::Wait => {
                    tracing::info!(
                        partition,
                        first,
                        last,
                        ?end,
                        ?position,
                        "Waiting for a committed range to be read again before the drain ends."
                    );
                    continue;
                }
                Unfinished::Gone { end: Some(end), .. } => format!(
                    "the partition ends at offset {end} now: the topic was deleted and created again, or its log truncated"
                ),
                Unfinished::Gone { position, .. } => format!(
                    "the consumer is at offset {} without having received offset {last}: the topic was deleted and created again, or its log compacted",
                    position.unwrap_or(last + 1)
                ),
            };
            return Err(range_gone(
                &kafka.topic,
                &self.settings.layout,
                partition,
                &format!(
                    "offsets {first}..={last} are committed in S3 but some of their objects are not written yet, and Kafka no longer has them ({why})"
                ),
            ));
        }
        Ok(self.drain.as_ref().is_some_and(Drain::finished))
    }

    /// Reads the partition's end offset on a blocking thread; the answer comes back to the
    /// loop as [`Event::EndOffset`].
    fn ask_end_offset(&mut self, partition: i32) {
        if !self.drain.as_mut().is_some_and(|d| d.ask_end(partition)) {
            return;
        }
        let (consumer, events) = (self.consumer.clone(), self.events_tx.clone());
        let topic = self.settings.kafka.topic.clone();
        tokio::task::spawn_blocking(move || {
            let end = match consumer.fetch_watermarks(&topic, partition, END_OFFSET_TIMEOUT) {
                Ok((_, high)) => Some(high),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "Cannot read the partition's end offset (Kafka unreachable?); the drain waits.");
                    None
                }
            };
            let _ = events.send(Event::EndOffset { partition, end });
        });
    }

    /// Owns every partition, starting where S3 says each one stopped, and takes each one's end
    /// offset as of now.
    pub(super) async fn start_drain(&mut self, partitions: i32) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        let mut targets = BTreeMap::new();
        let topic = self.settings.kafka.topic.clone();
        for partition in 0..partitions {
            let (committer, plan) = recover(&self.writers, partition)
                .await
                .map_err(anyhow::Error::from)
                .with_context(|| format!("loading the checkpoint of partition {partition}"))?;
            tokio::task::block_in_place(|| {
                still_in_kafka(
                    self.consumer.as_ref(),
                    &self.settings.kafka,
                    &self.writers.layout,
                    partition,
                    plan,
                )
            })?;
            let next = plan.start();
            let (_, high) = tokio::task::block_in_place(|| {
                self.consumer.fetch_watermarks(
                    &topic,
                    partition,
                    self.settings.kafka.connect_timeout(),
                )
            })
            .with_context(|| format!("reading the end offset of {topic}/{partition}"))?;
            targets.insert(partition, high);
            tpl.add_partition_offset(
                &topic,
                partition,
                if next > 0 {
                    Offset::Offset(next)
                } else {
                    Offset::Beginning
                },
            )?;
            self.next_epoch += 1;
            self.own(partition, self.next_epoch, committer, plan);
        }
        self.update_gauge();
        tracing::info!(end_offsets = ?targets, "Draining up to these offsets.");
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions")?;
        self.drain = Some(Drain::new(targets, Instant::now()));
        Ok(())
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
    fn a_committed_range_is_gone_only_when_it_looks_so_twice_in_a_row() {
        let t0 = Instant::now();
        let mut d = Drain::new(BTreeMap::from([(0, 10)]), t0);
        d.end_of_partition(0, Some(30));
        assert!(d.finished());
        // Range 30..=39 still to read; the partition ends at 1 (created again, say).
        assert_eq!(d.unfinished(0, 39, Some(30), Some(1), t0), Unfinished::Wait);
        assert!(!d.finished(), "waiting is not done");
        // Kafka could not be asked: no verdict, and the next one starts over.
        assert_eq!(d.unfinished(0, 39, Some(30), None, t0), Unfinished::Wait);
        assert_eq!(d.unfinished(0, 39, Some(30), Some(1), t0), Unfinished::Wait);
        assert_eq!(
            d.unfinished(0, 39, Some(30), Some(1), t0),
            Unfinished::Gone {
                end: Some(1),
                position: None
            }
        );
        // The range is in Kafka: wait, however often asked.
        let mut d = Drain::new(BTreeMap::from([(0, 10)]), t0);
        for _ in 0..3 {
            assert_eq!(
                d.unfinished(0, 39, Some(30), Some(45), t0),
                Unfinished::Wait
            );
        }
        // The consumer got past the range's last offset without it (a marker after a gap).
        d.unfinished(0, 39, Some(41), Some(45), t0);
        assert_eq!(
            d.unfinished(0, 39, Some(41), Some(45), t0),
            Unfinished::Gone {
                end: None,
                position: Some(41)
            }
        );
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
