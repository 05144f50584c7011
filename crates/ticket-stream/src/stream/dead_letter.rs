//! The dead-letter topic: an invalid message goes there with its key, its bytes (truncated if
//! the producer could not send them whole) and headers saying why and where it came from.

use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

/// librdkafka's default `message.max.bytes`, when KAFKA_OPTIONS does not set it.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Room kept under `message.max.bytes` for the key, the headers and the record's framing.
const RECORD_OVERHEAD: usize = 16 * 1024;

/// How long to wait for room in the producer's local queue before trying again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(50);

/// Why a dead letter was not delivered, and so what to do with its batch.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Worth another try (timeout, broker unavailable): the batch is processed again.
    #[error("dead letter not delivered to {topic}: {error} (will retry)")]
    Transient { topic: String, error: KafkaError },
    /// Will fail the same way every time: stop and say what to fix.
    #[error("dead letter refused by {topic}: {error} ({hint})")]
    Permanent {
        topic: String,
        error: KafkaError,
        hint: &'static str,
    },
    /// The processor is stopping.
    #[error("stopped while waiting for room in the dead-letter producer's queue")]
    Aborted,
}

/// One invalid message, as read.
pub struct DeadLetter<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub reason: &'a str,
}

/// Sends invalid messages to the dead-letter topic (idempotent producer, acks=all).
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
    /// The producer's `message.max.bytes`: a larger record is refused before it is sent.
    message_max_bytes: usize,
}

impl DeadLetters {
    pub fn new(mut config: ClientConfig, topic: &str, source_topic: &str) -> anyhow::Result<Self> {
        let message_max_bytes = config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let producer = config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .context("creating the dead-letter producer (check KAFKA_OPTIONS)")?;
        Ok(DeadLetters {
            producer,
            topic: topic.to_string(),
            source_topic: source_topic.to_string(),
            message_max_bytes,
        })
    }

    /// Queues a dead letter; waits (until `abort`) only while the local queue is full. The
    /// returned future resolves when the broker has it.
    pub async fn enqueue(
        &self,
        letter: &DeadLetter<'_>,
        abort: &CancellationToken,
    ) -> Result<DeliveryFuture, DeadLetterError> {
        let key_len = letter.key.map_or(0, <[u8]>::len);
        let budget = self
            .message_max_bytes
            .saturating_sub(RECORD_OVERHEAD + key_len + letter.reason.len());
        let kept = letter.payload.len().min(budget);
        let (p, o, size) = (
            letter.partition.to_string(),
            letter.offset.to_string(),
            letter.payload.len().to_string(),
        );
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "error.message",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "source.topic",
                value: Some(&self.source_topic),
            })
            .insert(Header {
                key: "source.partition",
                value: Some(&p),
            })
            .insert(Header {
                key: "source.offset",
                value: Some(&o),
            });
        if kept < letter.payload.len() {
            tracing::warn!(
                partition = letter.partition,
                offset = letter.offset,
                size = letter.payload.len(),
                kept,
                "Dead letter too large for the producer; sending its first bytes."
            );
            headers = headers
                .insert(Header {
                    key: "payload.truncated",
                    value: Some("true"),
                })
                .insert(Header {
                    key: "payload.original.size",
                    value: Some(&size),
                });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(&letter.payload[..kept])
            .headers(headers);
        if let Some(k) = letter.key {
            record = record.key(k);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::select! {
                        _ = tokio::time::sleep(QUEUE_FULL_WAIT) => {}
                        _ = abort.cancelled() => return Err(DeadLetterError::Aborted),
                    }
                }
                Err((error, _)) => return Err(self.classify(error)),
            }
        }
    }

    /// Waits for the broker's answer on a queued dead letter.
    pub async fn delivered(&self, future: DeliveryFuture) -> Result<(), DeadLetterError> {
        match future.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(self.classify(error)),
            Err(_) => Err(DeadLetterError::Transient {
                topic: self.topic.clone(),
                error: KafkaError::Canceled,
            }),
        }
    }

    fn classify(&self, error: KafkaError) -> DeadLetterError {
        let hint = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                Some(
                    "raise the dead-letter topic's max.message.bytes, or lower message.max.bytes in KAFKA_OPTIONS so that large dead letters are truncated to fit",
                )
            }
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication,
            ) => Some("grant the processor's user WRITE on DLQ_TOPIC"),
            Some(
                RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage,
            ) => Some("check DLQ_TOPIC and the topic's configuration"),
            _ => None,
        };
        let topic = self.topic.clone();
        match hint {
            Some(hint) => DeadLetterError::Permanent { topic, error, hint },
            None => DeadLetterError::Transient { topic, error },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_transient_and_a_size_refusal_is_not() {
        let dl = DeadLetters::new(ClientConfig::new(), "dlq", "t").expect("producer");
        assert!(matches!(
            dl.classify(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
            )),
            DeadLetterError::Permanent { .. }
        ));
        assert!(matches!(
            dl.classify(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            )),
            DeadLetterError::Transient { .. }
        ));
    }
}
