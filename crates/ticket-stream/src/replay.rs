//! `replay-dlq`: re-inject dead letters into the tickets topic after a fix (a processor that
//! now accepts them, or messages corrected upstream of the DLQ).
//!
//! Each dead letter's original key and bytes are published back to the tickets topic with a
//! `replayed.from` header (`topic/partition/offset` of the original). Publishing and the replay
//! group's DLQ offsets are committed in one Kafka transaction, so a dead letter is re-injected
//! exactly once even if the replay is interrupted and run again; the processor reads committed
//! messages only, and then treats a replayed ticket like any other (exactly once in S3).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: ticket_kafka::KafkaArgs,

    /// The processor's consumer group; the replay uses `<group>-dlq-replay` for its own progress.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "ticket-processor")]
    pub group: String,

    /// The dead-letter topic to replay.
    #[arg(long, env = "DLQ_TOPIC", default_value = "client_tickets_dlq")]
    pub dlq_topic: String,

    /// Only replay dead letters whose error.message contains this text (others are skipped,
    /// and count as handled).
    #[arg(long)]
    pub reason_contains: Option<String>,

    /// List what would be replayed, publish nothing, commit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub read: u64,
    pub replayed: u64,
    pub skipped: u64,
    pub duplicates: u64,
}

/// Replays the dead letters not replayed before, up to the end of the DLQ, then returns.
pub async fn replay_dlq(args: ReplayArgs) -> anyhow::Result<ReplayReport> {
    args.kafka.validate()?;
    let kafka = args.kafka.clone();
    let dlq = args.dlq_topic.clone();
    let partitions = tokio::task::spawn_blocking(move || kafka.partitions_of(&dlq)).await??;
    let Some(partitions) = partitions else {
        bail!(
            "dead-letter topic {:?} does not exist on {} (check DLQ_TOPIC)",
            args.dlq_topic,
            args.kafka.brokers
        );
    };
    let replay_group = format!("{}-dlq-replay", args.group);
    let mut config = args.kafka.client_config();
    crate::stream::with_consumer_defaults(&mut config);
    let consumer: StreamConsumer = config
        .set("group.id", &replay_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating the DLQ consumer")?;
    consumer.subscribe(&[&args.dlq_topic])?;
    let producer: FutureProducer = args
        .kafka
        .client_config()
        .set("transactional.id", &replay_group)
        .create()
        .context("creating the replay producer")?;
    let timeout = Duration::from_secs(30);
    if !args.dry_run {
        producer
            .init_transactions(timeout)
            .context("initialising Kafka transactions (the broker must support them)")?;
        producer.begin_transaction()?;
    }

    let mut report = ReplayReport::default();
    let mut seen = BTreeSet::new();
    let mut at_end = BTreeSet::new();
    let mut positions = TopicPartitionList::new();
    let mut in_txn = 0u64;
    while at_end.len() < partitions {
        let m = match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Err(_) => bail!("no progress on {:?} for 60 s", args.dlq_topic),
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka error (retrying).");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        report.read += 1;
        positions.add_partition_offset(
            &args.dlq_topic,
            m.partition(),
            Offset::Offset(m.offset() + 1),
        )?;
        let header = |name: &str| -> String {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).to_string())
                .unwrap_or_default()
        };
        let source = format!(
            "{}/{}/{}",
            header("source.topic"),
            header("source.partition"),
            header("source.offset")
        );
        let reason = header("error.message");
        if let Some(filter) = &args.reason_contains
            && !reason.contains(filter.as_str())
        {
            report.skipped += 1;
            continue;
        }
        // A crash of the processor can dead-letter a message twice: replay it once.
        if !seen.insert(source.clone()) {
            report.duplicates += 1;
            continue;
        }
        if args.dry_run {
            println!("would replay {source}: {reason}");
            report.replayed += 1;
            continue;
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "replayed.from",
            value: Some(&source),
        });
        let mut record = FutureRecord::to(&args.kafka.topic)
            .payload(m.payload().unwrap_or_default())
            .headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        producer
            .send(record, timeout)
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("re-publishing {source} to {:?}", args.kafka.topic))?;
        report.replayed += 1;
        in_txn += 1;
        if in_txn >= 1000 {
            commit(&producer, &consumer, &positions, timeout)?;
            producer.begin_transaction()?;
            in_txn = 0;
        }
    }
    if !args.dry_run {
        commit(&producer, &consumer, &positions, timeout)?;
    }
    Ok(report)
}

/// Commits the re-published messages and the DLQ positions together.
fn commit(
    producer: &FutureProducer,
    consumer: &StreamConsumer,
    positions: &TopicPartitionList,
    timeout: Duration,
) -> anyhow::Result<()> {
    let metadata = consumer
        .group_metadata()
        .context("no consumer group metadata")?;
    producer.send_offsets_to_transaction(positions, &metadata, timeout)?;
    producer
        .commit_transaction(timeout)
        .context("committing the replay transaction")?;
    Ok(())
}
