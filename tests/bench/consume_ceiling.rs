//! The ceiling for the end-to-end figure: how fast the same client library (rdkafka) reads
//! the topic from the same broker, doing nothing with the messages.
//! `consume-ceiling BROKERS TOPIC` prints `{"messages": N, "seconds": S}`.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (brokers, topic) = (
        args.next().unwrap_or_default(),
        args.next().unwrap_or_default(),
    );
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "consume-ceiling")
        .set("enable.partition.eof", "true")
        .create()?;
    let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
    }
    let start = Instant::now();
    c.assign(&tpl)?;
    let (mut n, mut bytes, mut at_end) = (0u64, 0usize, std::collections::BTreeSet::new());
    while at_end.len() < partitions.len() {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    println!(
        "{{\"messages\": {n}, \"bytes\": {bytes}, \"seconds\": {}}}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
