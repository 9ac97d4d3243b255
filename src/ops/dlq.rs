//! `bookingctl dlq …`: reading the dead-letter topics and putting dead letters back.
//!
//! A dead letter is what [`crate::kafka::ConsumerRunner`] wrote to `<topic>.dlq`: the original
//! key and payload, with the headers `dlq-reason`, `dlq-source` (`topic/partition/offset`) and
//! `dlq-consumer`.
//!
//! Replay guarantees, and where they come from:
//! - Each dead letter is replayed once, however often `dlq replay` runs: its position in the
//!   dead-letter topic is the key of a `dlq_replays` row, locked while the message is produced and
//!   counted only after Kafka acknowledged it (then committed). Two operators replaying at once
//!   serialize on that row; `--force` replays again and counts again.
//! - A crash between the acknowledgement and the commit can replay a message a second time; the
//!   consumers are idempotent (every effect is keyed by `eventId` or a conditional update), which
//!   is what makes a replay harmless in the first place.
//! - The replay goes to the source topic, with the original key, on the partition every producer
//!   of the product uses for that key ([`partition_for`]), so per-key order with later events holds
//!   as well as it can; it carries `replayed-from` and `replay-count` headers.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::{fmt_time, Ops, OpsError, Report, Table};
use crate::kafka::{partition_for, Topics, PARTITIONS};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// The product's source topics and their dead-letter twins.
pub fn dlq_topics(topics: &Topics) -> Vec<(String, String)> {
    topics
        .specs()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| !t.ends_with(".dlq"))
        .map(|t| {
            let d = Topics::dlq(&t);
            (t, d)
        })
        .collect()
}

/// Finds `(source, dlq)` from what an operator typed: a source or dead-letter topic, with or
/// without the topic prefix.
pub fn resolve(topics: &Topics, prefix: &str, arg: &str) -> Result<(String, String), OpsError> {
    let all = dlq_topics(topics);
    all.iter()
        .find(|(s, d)| {
            let bare_s = s.strip_prefix(prefix).unwrap_or(s);
            let bare_d = d.strip_prefix(prefix).unwrap_or(d);
            [s.as_str(), d.as_str(), bare_s, bare_d].contains(&arg)
        })
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|(s, _)| s.as_str()).collect();
            OpsError::Usage(format!("unknown topic {arg:?}; the topics are {}", names.join(", ")))
        })
}

/// A position in a dead-letter topic: `PARTITION:OFFSET`, or just `OFFSET` when that is unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: Option<i32>,
    pub offset: i64,
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not OFFSET or PARTITION:OFFSET");
        match s.split_once(':') {
            Some((p, o)) => Ok(Self { partition: Some(p.parse().map_err(|_| bad())?), offset: o.parse().map_err(|_| bad())? }),
            None => Ok(Self { partition: None, offset: s.parse().map_err(|_| bad())? }),
        }
    }
}

/// One dead letter.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub dlq_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub time: Option<DateTime<Utc>>,
    pub key: Option<String>,
    pub reason: Option<String>,
    pub original_topic: String,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    pub consumer: Option<String>,
    /// How often bookingctl replayed it (`None` when PostgreSQL could not be asked).
    pub replayed: Option<i32>,
    pub headers: Vec<(String, String)>,
    /// The payload: JSON when it parses, otherwise its text.
    pub payload: serde_json::Value,
    #[serde(skip)]
    raw: Vec<u8>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn dead_letter(source: &str, m: &BorrowedMessage<'_>) -> DeadLetter {
    let headers: Vec<(String, String)> = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
        .unwrap_or_default();
    let raw = m.payload().unwrap_or_default().to_vec();
    // dlq-source is `topic/partition/offset`; topic names cannot contain '/'.
    let src: Vec<&str> = header(&headers, "dlq-source").map(|s| s.rsplitn(3, '/').collect()).unwrap_or_default();
    let (original_topic, original_partition, original_offset) = match src.as_slice() {
        [o, p, t] => (t.to_string(), p.parse().ok(), o.parse().ok()),
        _ => (source.to_string(), None, None),
    };
    DeadLetter {
        dlq_topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        time: m.timestamp().to_millis().and_then(DateTime::from_timestamp_millis),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        reason: header(&headers, "dlq-reason").map(str::to_string),
        original_topic,
        original_partition,
        original_offset,
        consumer: header(&headers, "dlq-consumer").map(str::to_string),
        replayed: None,
        payload: serde_json::from_slice(&raw).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned())),
        headers,
        raw,
    }
}

pub(crate) fn reader(brokers: &str) -> Result<BaseConsumer, OpsError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bookingctl-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?)
}

/// `(low, high)` watermarks of every partition of `topic`. Asked again for a few seconds on an
/// error: right after a topic is created or while a partition changes leader the broker answers
/// "unknown partition" or "not leader" for a moment.
pub(crate) fn watermarks(c: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, OpsError> {
    let deadline = std::time::Instant::now() + KAFKA_TIMEOUT;
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        loop {
            match c.fetch_watermarks(topic, p, KAFKA_TIMEOUT) {
                Ok((l, h)) => {
                    out.push((p, l, h));
                    break;
                }
                Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    Ok(out)
}

/// Reads the messages of `dlq` at `wanted` positions (every message when `None`), blocking.
fn read(brokers: &str, source: &str, dlq: &str, wanted: Option<&[Position]>, pb: &indicatif::ProgressBar) -> Result<Vec<DeadLetter>, OpsError> {
    let c = reader(brokers)?;
    let marks = watermarks(&c, dlq)?;
    let mut tpl = TopicPartitionList::new();
    // Per partition: the offsets still to read (every offset up to the high watermark when
    // reading everything).
    let mut todo: HashMap<i32, Vec<i64>> = HashMap::new();
    for &(p, lo, hi) in &marks {
        let offsets: Vec<i64> = match wanted {
            None => (lo..hi).collect(),
            Some(ws) => {
                let mut v: Vec<i64> = ws.iter().filter(|w| w.partition.is_none_or(|wp| wp == p) && (lo..hi).contains(&w.offset)).map(|w| w.offset).collect();
                v.sort();
                v
            }
        };
        if let Some(first) = offsets.first() {
            tpl.add_partition_offset(dlq, p, Offset::Offset(*first))?;
            todo.insert(p, offsets);
        }
    }
    if let Some(ws) = wanted {
        for w in ws.iter().filter(|w| w.partition.is_none()) {
            let holders: Vec<i32> = todo.iter().filter(|(_, o)| o.contains(&w.offset)).map(|(p, _)| *p).collect();
            if holders.len() > 1 {
                return Err(OpsError::Usage(format!(
                    "offset {} exists in partitions {holders:?} of {dlq}: write PARTITION:OFFSET",
                    w.offset
                )));
            }
        }
    }
    pb.set_length(todo.values().map(|v| v.len() as u64).sum());
    let mut out = Vec::new();
    if todo.is_empty() {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while todo.values().any(|v| !v.is_empty()) {
        if std::time::Instant::now() > deadline {
            return Err(OpsError::Usage(format!("timed out reading {dlq}")));
        }
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m?;
        let Some(rest) = todo.get_mut(&m.partition()) else { continue };
        if let Some(i) = rest.iter().position(|o| *o == m.offset()) {
            rest.remove(i);
            out.push(dead_letter(source, &m));
            pb.inc(1);
        }
        // Offsets below the next wanted one were skipped (compaction, transactions): drop them.
        let off = m.offset();
        rest.retain(|o| *o > off);
    }
    Ok(out)
}

async fn read_async(ops: &Ops, source: &str, dlq: &str, wanted: Option<Vec<Position>>, pb: &indicatif::ProgressBar) -> Result<Vec<DeadLetter>, OpsError> {
    let (brokers, source, dlq, pb) = (ops.brokers.clone(), source.to_string(), dlq.to_string(), pb.clone());
    tokio::task::spawn_blocking(move || read(&brokers, &source, &dlq, wanted.as_deref(), &pb))
        .await
        .map_err(|e| OpsError::Usage(format!("reader task failed: {e}")))?
}

/// Fills in how often each dead letter was replayed (left `None` if PostgreSQL is unreachable).
async fn with_replays(ops: &Ops, mut items: Vec<DeadLetter>) -> Vec<DeadLetter> {
    let rows: Result<Vec<(String, i32, i64, i32)>, _> =
        sqlx::query_as("SELECT dlq_topic, dlq_partition, dlq_offset, replay_count FROM dlq_replays WHERE dlq_topic = ANY($1)")
            .bind(items.iter().map(|d| d.dlq_topic.clone()).collect::<Vec<_>>())
            .fetch_all(&ops.pool)
            .await;
    if let Ok(rows) = rows {
        let counts: HashMap<(String, i32, i64), i32> = rows.into_iter().map(|(t, p, o, n)| ((t, p, o), n)).collect();
        for d in &mut items {
            d.replayed = Some(counts.get(&(d.dlq_topic.clone(), d.partition, d.offset)).copied().unwrap_or(0));
        }
    }
    items
}

/// `dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetters(pub Vec<DeadLetter>);

impl Report for DeadLetters {
    fn table(&self) -> String {
        let mut t = Table::new(&["time", "dlq topic", "position", "key", "reason", "original", "replayed"]);
        for d in &self.0 {
            let original = format!(
                "{}/{}/{}",
                d.original_topic,
                d.original_partition.map_or("?".into(), |p| p.to_string()),
                d.original_offset.map_or("?".into(), |o| o.to_string())
            );
            let mut reason = d.reason.clone().unwrap_or_else(|| "-".into());
            if reason.chars().count() > 60 {
                reason = reason.chars().take(59).collect::<String>() + "…";
            }
            t.row(&[
                d.time.as_ref().map_or("-".into(), fmt_time),
                d.dlq_topic.clone(),
                format!("{}:{}", d.partition, d.offset),
                d.key.clone().unwrap_or_else(|| "-".into()),
                reason,
                original,
                d.replayed.map_or("?".into(), |n| n.to_string()),
            ]);
        }
        t.to_string()
    }
}

/// The dead letters of one topic (or of all), oldest first, since `since` if given.
pub async fn list(ops: &Ops, prefix: &str, topic: Option<&str>, since: Option<DateTime<Utc>>, pb: &indicatif::ProgressBar) -> Result<DeadLetters, OpsError> {
    let pairs = match topic {
        Some(t) => vec![resolve(&ops.topics, prefix, t)?],
        None => dlq_topics(&ops.topics),
    };
    let mut all = Vec::new();
    for (source, dlq) in pairs {
        all.extend(read_async(ops, &source, &dlq, None, pb).await?);
    }
    pb.finish_and_clear();
    all.retain(|d| since.is_none_or(|s| d.time.is_none_or(|t| t >= s)));
    all.sort_by_key(|d| d.time);
    Ok(DeadLetters(with_replays(ops, all).await))
}

impl Report for DeadLetter {
    fn table(&self) -> String {
        let mut out = String::new();
        let mut t = Table::new(&["field", "value"]);
        t.row(&["dlq position", &format!("{} {}:{}", self.dlq_topic, self.partition, self.offset)]);
        t.row(&["time", &self.time.as_ref().map_or("-".into(), fmt_time)]);
        t.row(&["key", self.key.as_deref().unwrap_or("-")]);
        t.row(&["reason", self.reason.as_deref().unwrap_or("-")]);
        t.row(&["original", &format!("{} partition {} offset {}", self.original_topic, super::opt(&self.original_partition), super::opt(&self.original_offset))]);
        t.row(&["consumer", self.consumer.as_deref().unwrap_or("-")]);
        t.row(&["replayed", &self.replayed.map_or("?".into(), |n| format!("{n} time(s)"))]);
        for (k, v) in &self.headers {
            t.row(&[format!("header {k}"), v.clone()]);
        }
        out.push_str(&t.to_string());
        out.push_str("payload:\n");
        out.push_str(&serde_json::to_string_pretty(&self.payload).unwrap_or_default());
        out.push('\n');
        out
    }
}

/// One dead letter, by topic and position.
pub async fn show(ops: &Ops, prefix: &str, topic: &str, at: Position) -> Result<DeadLetter, OpsError> {
    let (source, dlq) = resolve(&ops.topics, prefix, topic)?;
    let found = read_async(ops, &source, &dlq, Some(vec![at]), &indicatif::ProgressBar::hidden()).await?;
    let found = with_replays(ops, found).await;
    found.into_iter().next().ok_or_else(|| OpsError::NotFound(format!("no message at {}{} in {dlq}", at.partition.map_or(String::new(), |p| format!("{p}:")), at.offset)))
}

/// What `dlq replay` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// The topic (source or dead-letter, prefix optional); every dead-letter topic when `None`.
    pub topic: Option<String>,
    /// Positions to replay (needs `topic`).
    pub offsets: Vec<Position>,
    /// Replay every dead letter of the topic(s).
    pub all: bool,
    /// Show what would be replayed; change nothing.
    pub dry_run: bool,
    /// Replay even what was replayed before.
    pub force: bool,
}

/// What happened to one dead letter.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayItem {
    pub dlq_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub target_topic: String,
    /// `replayed`, `wouldReplay`, `skipped` (replayed before; `--force` to replay again).
    pub outcome: &'static str,
    /// Replays of this dead letter so far, this one included.
    pub replay_count: i32,
    /// Where the copy landed (`partition:offset` of the target topic).
    pub replayed_to: Option<String>,
}

/// `dlq replay`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    pub dry_run: bool,
    pub replayed: usize,
    pub skipped: usize,
    pub items: Vec<ReplayItem>,
}

impl Report for Replayed {
    fn table(&self) -> String {
        let mut t = Table::new(&["dlq topic", "position", "key", "to", "outcome", "replays"]);
        for i in &self.items {
            t.row(&[
                i.dlq_topic.clone(),
                format!("{}:{}", i.partition, i.offset),
                i.key.clone().unwrap_or_else(|| "-".into()),
                format!("{}{}", i.target_topic, i.replayed_to.as_ref().map_or(String::new(), |p| format!(" {p}"))),
                i.outcome.to_string(),
                i.replay_count.to_string(),
            ]);
        }
        let verb = if self.dry_run { "would replay" } else { "replayed" };
        format!("{t}{verb} {}, skipped {} already replayed (--force replays them again)\n", self.replayed, self.skipped)
    }
}

/// Selects the dead letters of a replay request.
async fn select(ops: &Ops, prefix: &str, req: &ReplayRequest, pb: &indicatif::ProgressBar) -> Result<Vec<DeadLetter>, OpsError> {
    if req.offsets.is_empty() && !req.all {
        return Err(OpsError::Usage("say what to replay: --offset PARTITION:OFFSET … (with --topic) or --all".into()));
    }
    if !req.offsets.is_empty() && req.all {
        return Err(OpsError::Usage("--offset and --all exclude each other".into()));
    }
    if !req.offsets.is_empty() {
        let topic = req.topic.as_deref().ok_or_else(|| OpsError::Usage("--offset needs --topic".into()))?;
        let (source, dlq) = resolve(&ops.topics, prefix, topic)?;
        let found = read_async(ops, &source, &dlq, Some(req.offsets.clone()), pb).await?;
        for w in &req.offsets {
            if !found.iter().any(|d| d.offset == w.offset && w.partition.is_none_or(|p| p == d.partition)) {
                return Err(OpsError::NotFound(format!("no message at {}{} in {dlq}", w.partition.map_or(String::new(), |p| format!("{p}:")), w.offset)));
            }
        }
        return Ok(found);
    }
    Ok(list(ops, prefix, req.topic.as_deref(), None, pb).await?.0)
}

/// The dead letters a request names, with how often each was replayed: what `replay` would do.
pub async fn plan(ops: &Ops, prefix: &str, req: &ReplayRequest) -> Result<Replayed, OpsError> {
    let letters = with_replays(ops, select(ops, prefix, req, &indicatif::ProgressBar::hidden()).await?).await;
    let mut out = Replayed { dry_run: true, replayed: 0, skipped: 0, items: Vec::new() };
    for d in letters {
        let before = d.replayed.unwrap_or(0);
        let skip = before > 0 && !req.force;
        if skip { out.skipped += 1 } else { out.replayed += 1 }
        out.items.push(ReplayItem {
            dlq_topic: d.dlq_topic,
            partition: d.partition,
            offset: d.offset,
            key: d.key,
            target_topic: d.original_topic,
            outcome: if skip { "skipped" } else { "wouldReplay" },
            replay_count: before,
            replayed_to: None,
        });
    }
    Ok(out)
}

/// Re-produces the selected dead letters to their source topics (see the module comment for
/// the once-only guarantee). With `dry_run`, only reports what it would do.
pub async fn replay(ops: &Ops, prefix: &str, req: &ReplayRequest, pb: &indicatif::ProgressBar) -> Result<Replayed, OpsError> {
    if req.dry_run {
        return plan(ops, prefix, req).await;
    }
    let letters = select(ops, prefix, req, &indicatif::ProgressBar::hidden()).await?;
    pb.set_length(letters.len() as u64);
    let mut out = Replayed { dry_run: false, replayed: 0, skipped: 0, items: Vec::new() };
    for d in letters {
        let item = replay_one(ops, &d, req.force).await?;
        if item.outcome == "replayed" { out.replayed += 1 } else { out.skipped += 1 }
        out.items.push(item);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let replayed: Vec<String> = out.items.iter().filter(|i| i.outcome == "replayed").map(|i| format!("{}/{}/{}", i.dlq_topic, i.partition, i.offset)).collect();
    if !replayed.is_empty() || req.force {
        ops.audit("dlq replay", serde_json::json!({"replayed": replayed, "skipped": out.skipped, "force": req.force})).await;
    }
    Ok(out)
}

async fn replay_one(ops: &Ops, d: &DeadLetter, force: bool) -> Result<ReplayItem, OpsError> {
    let mut item = ReplayItem {
        dlq_topic: d.dlq_topic.clone(),
        partition: d.partition,
        offset: d.offset,
        key: d.key.clone(),
        target_topic: d.original_topic.clone(),
        outcome: "skipped",
        replay_count: 0,
        replayed_to: None,
    };
    let mut tx = crate::db::begin(&ops.pool).await?;
    // The row exists before it is locked, so a concurrent replay of the same letter waits here.
    sqlx::query(
        "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, target_topic, last_replayed_by)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&d.dlq_topic)
    .bind(d.partition)
    .bind(d.offset)
    .bind(&d.original_topic)
    .bind(&ops.actor)
    .execute(&mut *tx)
    .await?;
    let before: i32 = sqlx::query_scalar("SELECT replay_count FROM dlq_replays WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3 FOR UPDATE")
        .bind(&d.dlq_topic)
        .bind(d.partition)
        .bind(d.offset)
        .fetch_one(&mut *tx)
        .await?;
    item.replay_count = before;
    if before > 0 && !force {
        tx.rollback().await?;
        return Ok(item);
    }
    let count = (before + 1).to_string();
    let from = format!("{}/{}/{}", d.dlq_topic, d.partition, d.offset);
    let mut headers = OwnedHeaders::new();
    // The consumer's own dlq-* headers described the failure; the replay says where it came from.
    for (k, v) in d.headers.iter().filter(|(k, _)| !k.starts_with("dlq-") && k != "replayed-from" && k != "replay-count") {
        headers = headers.insert(Header { key: k, value: Some(v.as_str()) });
    }
    headers = headers
        .insert(Header { key: "replayed-from", value: Some(from.as_str()) })
        .insert(Header { key: "replay-count", value: Some(count.as_str()) });
    let mut record = FutureRecord::to(&d.original_topic).payload(&d.raw).headers(headers);
    if let Some(k) = &d.key {
        record = record.key(k).partition(partition_for(k, PARTITIONS));
    }
    let delivery = ops.producer.send(record, KAFKA_TIMEOUT).await.map_err(|(e, _)| OpsError::Kafka(e))?;
    sqlx::query(
        "UPDATE dlq_replays SET replay_count = replay_count + 1, last_replayed_at = now(), last_replayed_by = $4
         WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
    )
    .bind(&d.dlq_topic)
    .bind(d.partition)
    .bind(d.offset)
    .bind(&ops.actor)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    item.outcome = "replayed";
    item.replay_count = before + 1;
    item.replayed_to = Some(format!("{}:{}", delivery.partition, delivery.offset));
    tracing::info!(actor = %ops.actor, from = %from, to = %d.original_topic, "dead letter replayed");
    Ok(item)
}

/// Messages waiting in one dead-letter topic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqSize {
    pub topic: String,
    pub messages: Option<i64>,
}

/// The size of every dead-letter topic (`None` where Kafka did not answer).
pub async fn sizes(ops: &Ops) -> Vec<DlqSize> {
    let brokers = ops.brokers.clone();
    let names: Vec<String> = dlq_topics(&ops.topics).into_iter().map(|(_, d)| d).collect();
    tokio::task::spawn_blocking(move || {
        let c = reader(&brokers).ok();
        names
            .into_iter()
            .map(|topic| {
                let messages = c.as_ref().and_then(|c| watermarks(c, &topic).ok()).map(|m| m.iter().map(|(_, l, h)| h - l).sum());
                DlqSize { topic, messages }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_with_or_without_a_partition() {
        assert_eq!("3".parse::<Position>().unwrap(), Position { partition: None, offset: 3 });
        assert_eq!("1:42".parse::<Position>().unwrap(), Position { partition: Some(1), offset: 42 });
        assert!("x:1".parse::<Position>().is_err());
    }

    #[test]
    fn a_topic_is_found_by_its_source_or_dead_letter_name_with_or_without_the_prefix() {
        let t = Topics::new("p.");
        let want = ("p.reservation.created".to_string(), "p.reservation.created.dlq".to_string());
        for arg in ["reservation.created", "reservation.created.dlq", "p.reservation.created", "p.reservation.created.dlq"] {
            assert_eq!(resolve(&t, "p.", arg).unwrap(), want, "{arg}");
        }
        assert!(resolve(&t, "p.", "nope").is_err());
    }
}
