//! Topic names (behind a prefix, so tests get their own) and their production configs (brief §3).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Every topic of the product, with the prefix applied.
#[derive(Clone, Debug)]
pub struct Topics {
    pub reservation_created: String,
    pub reservation_expiration: String,
    pub reservation_cancelled: String,
    pub payment_completed: String,
    pub payment_refunded: String,
    pub notification_request: String,
}

/// Partitions of every product topic; keys are spread over them by [`partition_for`].
pub const PARTITIONS: i32 = 3;

const DAY_MS: &str = "86400000";
const WEEK_MS: &str = "604800000";

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            reservation_created: format!("{prefix}reservation.created"),
            reservation_expiration: format!("{prefix}reservation.expiration"),
            reservation_cancelled: format!("{prefix}reservation.cancelled"),
            payment_completed: format!("{prefix}payment.completed"),
            payment_refunded: format!("{prefix}payment.refunded"),
            notification_request: format!("{prefix}notification.request"),
        }
    }

    /// The dead-letter topic of `topic`.
    pub fn dlq(topic: &str) -> String {
        format!("{topic}.dlq")
    }

    /// Each topic with its configs; every topic also gets a `.dlq` twin kept for a week.
    pub fn specs(&self) -> Vec<(String, Vec<(&'static str, &'static str)>)> {
        let mut v: Vec<(String, Vec<(&'static str, &'static str)>)> = vec![
            (self.reservation_created.clone(), vec![("retention.ms", DAY_MS)]),
            (
                self.reservation_expiration.clone(),
                vec![("retention.ms", DAY_MS), ("message.timestamp.type", "LogAppendTime")],
            ),
            (self.payment_completed.clone(), vec![("retention.ms", WEEK_MS)]),
            (self.payment_refunded.clone(), vec![("retention.ms", WEEK_MS)]),
            (self.reservation_cancelled.clone(), vec![("retention.ms", DAY_MS)]),
            (self.notification_request.clone(), vec![("retention.ms", WEEK_MS)]),
        ];
        let dlqs: Vec<_> =
            v.iter().map(|(t, _)| (Self::dlq(t), vec![("retention.ms", WEEK_MS)])).collect();
        v.extend(dlqs);
        v
    }
}

/// Creates every topic with its configs; topics that already exist are left as they are.
pub async fn bootstrap_topics(
    brokers: &str,
    topics: &Topics,
    replication_factor: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let specs = topics.specs();
    let new_topics: Vec<NewTopic> = specs
        .iter()
        .map(|(name, configs)| {
            let mut t = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(replication_factor));
            for (k, v) in configs {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "topic creation failed");
                })
            }
        }
    }
    Ok(())
}

/// The partition a key goes to. Every producer of the product sets the partition itself with this
/// function (FNV-1a), so the delay scheduler can tell, from a reservation id alone, which shard a
/// hold belongs to when it re-arms holds from PostgreSQL.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        let k = "6f1c1f3e-2f7a-4c55-9d59-000000000001";
        assert_eq!(partition_for(k, 3), partition_for(k, 3));
        let mut seen = [0; 3];
        for i in 0..300 {
            let p = partition_for(&format!("key-{i}"), 3);
            assert!((0..3).contains(&p));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "keys spread over partitions: {seen:?}");
    }
}
