//! The consumer seam: everything the loop asks of Kafka, as one small trait ([`Kafka`]), with
//! the rdkafka adapter here (the consumer's settings, [`consumer`], and librdkafka's
//! callbacks, [`Ctx`]) and a scripted in-memory one for the loop's unit tests (`scripted` and
//! `tests_loop`, in tests only). Rebalances reach the loop as [`Event::Revoked`] from the
//! adapter (librdkafka's callback, or the script), like every other event.
//!
//! The trait speaks rdkafka's own types (its `Message` trait, `TopicPartitionList`, errors), so
//! the adapter is a list of one-line calls and the loop reads a message without a copy.

use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::{Event, Settings};
use crate::metrics::Metrics;

/// What the consumer's loop asks of Kafka.
pub trait Kafka: Send + Sync + 'static {
    /// A message as the loop reads it (borrowed from the consumer's queue by rdkafka).
    type Message<'a>: Message
    where
        Self: 'a;
    /// The messages of the assigned, unpaused partitions, as they are fetched; with
    /// `enable.partition.eof`, `KafkaError::PartitionEOF` at each partition's end.
    fn messages(&self) -> impl Stream<Item = KafkaResult<Self::Message<'_>>> + Unpin + '_;
    /// Joins the group on `topic` (partitions come and go by rebalance).
    fn subscribe(&self, topic: &str) -> KafkaResult<()>;
    /// Takes exactly these partitions, from these offsets (`--drain`).
    fn assign(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    fn unsubscribe(&self);
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    /// Asynchronous: what was fetched before it is dropped.
    fn seek(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()>;
    fn commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()>;
    /// The fetch position of each assigned partition.
    fn position(&self) -> KafkaResult<TopicPartitionList>;
    /// A partition's first and end offsets; blocks (call it off the loop).
    fn fetch_watermarks(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> KafkaResult<(i64, i64)>;
}

/// librdkafka consumer properties the processors set unless `KAFKA_OPTIONS` does (README,
/// "Without Docker"), each with why.
pub const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    // Failover within seconds rather than librdkafka's 45 s.
    ("session.timeout.ms", "10000"),
    // A fetch with nothing new returns after this long (librdkafka's default is 500 ms, and a
    // broker that does not answer early makes every message that late): part of the latency.
    ("fetch.wait.max.ms", "100"),
    // When the writers hold the consumer back (MAX_IN_FLIGHT batches per partition),
    // librdkafka's local queue fills and it pauses fetching for this long, 1 s by default: the
    // consumer then emptied the queue and sat idle for most of that second, about half of a
    // 1M-ticket drain (BENCHMARKS.md).
    ("fetch.queue.backoff.ms", "20"),
    // Librdkafka's prefetch queue, 64 MB by default: at 16 MB a drain's peak memory is about
    // 25 MB lower and its speed the same (BENCHMARKS.md); that still holds many fetches.
    ("queued.max.messages.kbytes", "16384"),
];

/// Adds [`CONSUMER_DEFAULTS`] to `config` where it has no value of its own.
pub fn with_consumer_defaults(config: &mut ClientConfig) {
    for (key, value) in CONSUMER_DEFAULTS {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
}

/// librdkafka's consumer for the processor's settings: the group, offsets stored and committed
/// by the loop alone, and [`CONSUMER_DEFAULTS`] where `KAFKA_OPTIONS` sets nothing.
pub fn consumer(
    settings: &Settings,
    events: UnboundedSender<Event>,
    metrics: Metrics,
) -> anyhow::Result<StreamConsumer<Ctx>> {
    let context = Ctx { events, metrics };
    let mut config = settings.kafka.client_config();
    with_consumer_defaults(&mut config);
    tracing::info!(
        session_timeout_ms = config.get("session.timeout.ms").unwrap_or("45000"),
        max_poll_interval_ms = config.get("max.poll.interval.ms").unwrap_or("300000"),
        "Kafka consumer settings."
    );
    config
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // --drain stops at the first end-of-partition at or past the end offset seen at start.
        .set(
            "enable.partition.eof",
            if settings.drain { "true" } else { "false" },
        )
        .create_with_context(context)
        .context("creating the Kafka consumer (check KAFKA_OPTIONS)")
}

/// librdkafka's callbacks: rebalances become events, statistics become the lag metric.
pub struct Ctx {
    pub events: UnboundedSender<Event>,
    pub metrics: Metrics,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.metrics.consumer_lag.set(lag);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // With --drain, reaching the end of a partition is the expected way to finish, and
        // librdkafka also reports it as a client-wide error: not worth an ERROR line.
        if let rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) =
            error
        {
            tracing::debug!(reason, "End of a partition.");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "Partitions revoked.");
                let _ = self.events.send(Event::Revoked(parts));
            }
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "Partitions assigned.");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }
}

/// The rdkafka adapter: librdkafka's consumer.
impl Kafka for StreamConsumer<Ctx> {
    type Message<'a> = BorrowedMessage<'a>;

    fn messages(&self) -> impl Stream<Item = KafkaResult<BorrowedMessage<'_>>> + Unpin + '_ {
        self.stream()
    }

    fn subscribe(&self, topic: &str) -> KafkaResult<()> {
        Consumer::subscribe(self, &[topic])
    }

    fn assign(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::assign(self, partitions)
    }

    fn unsubscribe(&self) {
        Consumer::unsubscribe(self)
    }

    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::pause(self, partitions)
    }

    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::resume(self, partitions)
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        Consumer::seek(
            self,
            topic,
            partition,
            Offset::Offset(offset),
            Duration::ZERO,
        )
    }

    fn commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
        Consumer::commit(self, offsets, mode)
    }

    fn position(&self) -> KafkaResult<TopicPartitionList> {
        Consumer::position(self)
    }

    fn fetch_watermarks(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> KafkaResult<(i64, i64)> {
        Consumer::fetch_watermarks(self, topic, partition, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_defaults_fill_gaps_and_keep_what_kafka_options_set() {
        let mut config = ClientConfig::new();
        config.set("fetch.queue.backoff.ms", "1000");
        with_consumer_defaults(&mut config);
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("1000"));
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("100"));
    }
}
