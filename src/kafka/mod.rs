//! Kafka plumbing: topic names and their configs (created by us, never by the broker), the event
//! envelope of the design document §4-2, the idempotent producer, and the at-least-once consumer
//! runner with retry and dead-letter handling.

mod consumer;
mod envelope;
mod topics;

pub use consumer::{
    consumer_config, is_data_error, ConsumerRunner, HandleError, Handler, Incoming, PartitionWatch, RunnerContext,
};
pub use envelope::{Envelope, EventType};
pub use topics::{bootstrap_topics, partition_for, Topics, PARTITIONS};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

/// How long a send waits for Kafka's acknowledgement before it fails (`message.timeout.ms`).
/// The delay scheduler's lease must exceed it (`--lease`).
pub const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An idempotent producer: `acks=all` and `enable.idempotence`, so a retried send is written once
/// and in order per partition. `message.timeout.ms` bounds how long a send waits for a broker
/// that is down; callers treat a timeout as "not published" and try again later.
/// `topic.metadata.propagation.max.ms` is kept below it, so a send to a topic that does not exist
/// fails as "unknown topic" (which the outbox relay sets aside) rather than as a timeout (which it
/// would retry forever).
pub fn producer(brokers: &str, client_id: &str) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string())
        .set("topic.metadata.propagation.max.ms", "5000")
        // Topics are created by `bootstrap_topics` with their partitions, replication and
        // retention; a send or a metadata request (the health check) must never make the broker
        // create one with its defaults, whatever `auto.create.topics.enable` says there.
        .set("allow.auto.create.topics", "false")
        .set("socket.keepalive.enable", "true")
        .create()
}
