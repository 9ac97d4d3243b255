//! Reading a topic of the stack back, to its end: what the benchmark learns from Kafka itself
//! (each record's append time, and its envelope) rather than from PostgreSQL, where the outbox
//! keeps only what is still to be sent.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// One record of a topic.
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// The broker's append time (the stack's topics use `LogAppendTime`), in ms since the epoch.
    pub appended_ms: Option<i64>,
}

/// Every record on `topic` now, from the beginning to the end of each partition (nothing more
/// is awaited). Fails when no record or end arrives for 5 s.
pub async fn read_to_end(brokers: &str, topic: &str) -> Result<Vec<Record>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..booking::kafka::PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut out, mut at_end) = (Vec::new(), HashSet::new());
    while at_end.len() < booking::kafka::PARTITIONS as usize {
        match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(Ok(m)) => out.push(Record {
                key: m.key_view::<str>().and_then(|k| k.ok()).map(str::to_string),
                payload: m.payload().unwrap_or_default().to_vec(),
                appended_ms: m.timestamp().to_millis(),
            }),
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Ok(Err(e)) => bail!("reading {topic}: {e}"),
            Err(_) => bail!("reading {topic}: nothing for 5 s"),
        }
    }
    Ok(out)
}
