//! `bookingctl status`: one screen for a sale. Each part is read on its own, so a dependency
//! that is down shows as down (and its figures as unknown) instead of hiding the rest.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::dlq::{self, DlqSize};
use super::outbox::{self, OutboxStatus};
use super::queue::{self, QueueStatus};
use super::scheduler::{self, ShardStatus};
use super::{opt, Ops, Report, Table};
use crate::health::{Check, Health};
use crate::kafka::PARTITIONS;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

/// One dependency.
#[derive(Debug, Clone, Serialize)]
pub struct Dependency {
    pub name: &'static str,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One partition of a topic as one group sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed yet, everything retained is due).
    pub committed: Option<i64>,
    pub end: i64,
    pub lag: i64,
}

/// One group on one topic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupLag {
    pub group: String,
    /// Total lag over the partitions (`None` when Kafka did not answer).
    pub lag: Option<i64>,
    pub partitions: Vec<PartitionLag>,
}

/// One topic with each group consuming it.
#[derive(Debug, Clone, Serialize)]
pub struct TopicLag {
    pub topic: String,
    pub groups: Vec<GroupLag>,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub dependencies: Vec<Dependency>,
    /// `None` while PostgreSQL is down.
    pub outbox: Option<OutboxStatus>,
    pub topics: Vec<TopicLag>,
    pub scheduler: Vec<ShardStatus>,
    /// `None` while Redis is down.
    pub queues: Option<Vec<QueueStatus>>,
    pub dlq: Vec<DlqSize>,
}

/// Gathers the status; never fails, a missing part says why in `dependencies`.
pub async fn status(ops: &Ops) -> Status {
    let health = Health::new(Some(ops.pool.clone()), ops.redis.clone().ok(), Some((ops.producer.clone(), &ops.topics)));
    let mut checks = health.check_now().await;
    if checks.iter().any(|(_, c)| *c != Check::Ok) {
        // Asked once more before saying "down": one slow answer on a loaded machine is not an outage.
        checks = health.check_now().await;
    }
    let mut dependencies: Vec<Dependency> = checks
        .into_iter()
        .map(|(name, c)| match c {
            Check::Ok => Dependency { name, up: true, error: None },
            Check::Failed(e) => Dependency { name, up: false, error: Some(e) },
        })
        .collect();
    if let Err(e) = &ops.redis {
        dependencies.insert(1, Dependency { name: "redis", up: false, error: Some(e.clone()) });
    }
    let pg_up = dependencies.iter().any(|d| d.name == "postgres" && d.up);
    let outbox = if pg_up { outbox::status(ops).await.ok() } else { None };
    let topics = lags(ops).await;
    let scheduler = scheduler::shards(ops).await;
    let queues = queue::queues(ops).await.ok();
    let dlq = dlq::sizes(ops).await;
    Status { dependencies, outbox, topics, scheduler, queues, dlq }
}

/// Consumer lag of every group on every topic: end offset minus the committed offset, per
/// partition (from the start of the retained log when nothing is committed yet).
async fn lags(ops: &Ops) -> Vec<TopicLag> {
    let brokers = ops.brokers.clone();
    let consumers = ops.groups.consumers(&ops.topics);
    tokio::task::spawn_blocking(move || {
        consumers
            .into_iter()
            .map(|(topic, groups)| {
                let marks: Option<Vec<(i64, i64)>> = dlq::reader(&brokers)
                    .ok()
                    .and_then(|c| dlq::watermarks(&c, &topic).ok())
                    .map(|m| m.into_iter().map(|(_, l, h)| (l, h)).collect());
                let groups = groups.into_iter().map(|group| group_lag(&brokers, &topic, &group, marks.as_deref())).collect();
                TopicLag { topic, groups }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

fn group_lag(brokers: &str, topic: &str, group: &str, marks: Option<&[(i64, i64)]>) -> GroupLag {
    let unknown = GroupLag { group: group.to_string(), lag: None, partitions: Vec::new() };
    let Some(marks) = marks else { return unknown };
    // A consumer that never subscribes: it only asks the group coordinator for committed offsets.
    let Ok(c) = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).set("enable.auto.commit", "false").create::<BaseConsumer>() else {
        return unknown;
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let Ok(committed) = c.committed_offsets(tpl, KAFKA_TIMEOUT) else { return unknown };
    let mut partitions = Vec::new();
    for (p, &(lo, hi)) in marks.iter().enumerate() {
        let at = committed.find_partition(topic, p as i32).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        let lag = (hi - at.unwrap_or(lo).max(lo)).max(0);
        partitions.push(PartitionLag { partition: p as i32, committed: at, end: hi, lag });
    }
    GroupLag { group: group.to_string(), lag: Some(partitions.iter().map(|p| p.lag).sum()), partitions }
}

impl Report for Status {
    fn table(&self) -> String {
        let mut out = String::new();
        let mut t = Table::new(&["dependency", "state"]);
        for d in &self.dependencies {
            t.row(&[d.name.to_string(), if d.up { "up".into() } else { format!("DOWN: {}", d.error.as_deref().unwrap_or("")) }]);
        }
        out.push_str(&t.to_string());

        out.push_str("\noutbox\n");
        let mut t = Table::new(&["backlog", "oldest age", "set aside"]);
        match &self.outbox {
            Some(o) => t.row(&[o.backlog.to_string(), format!("{:.1}s", o.oldest_age_seconds), o.set_aside.to_string()]),
            None => t.row(&["?", "?", "?"]),
        };
        out.push_str(&t.to_string());

        out.push_str("\nconsumer lag\n");
        let mut t = Table::new(&["topic", "group", "lag", "per partition"]);
        for topic in &self.topics {
            for g in &topic.groups {
                let per: Vec<String> = g.partitions.iter().map(|p| format!("{}:{}", p.partition, p.lag)).collect();
                t.row(&[topic.topic.clone(), g.group.clone(), opt(&g.lag), per.join(" ")]);
            }
        }
        out.push_str(&t.to_string());

        out.push_str("\nscheduler\n");
        let mut t = Table::new(&["shard", "due", "in flight", "next due"]);
        scheduler::shard_rows(&mut t, &self.scheduler);
        out.push_str(&t.to_string());

        out.push_str("\nqueues\n");
        let mut t = Table::new(&["schedule", "waiting", "active", "paused"]);
        match &self.queues {
            Some(q) => queue::queue_rows(&mut t, q),
            None => {
                t.row(&["? (Redis down)", "?", "?", "?"]);
            }
        }
        out.push_str(&t.to_string());

        out.push_str("\ndead letters\n");
        let mut t = Table::new(&["topic", "messages"]);
        for d in &self.dlq {
            t.row(&[d.topic.clone(), opt(&d.messages)]);
        }
        out.push_str(&t.to_string());
        out
    }
}
