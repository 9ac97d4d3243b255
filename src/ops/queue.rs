//! `bookingctl queue …`: the waiting queue of one schedule, through the api's admin routes
//! (`GET`/`PATCH /v1/admin/schedules/{scheduleId}/queue`, admin bearer token), so a change takes
//! the same path, checks and effects as any other admin's; and the queue sizes `status` reads
//! straight from Redis.

use std::time::Duration;

use redis::AsyncCommands;
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{opt, Ops, OpsError, Report, Table};

/// The api's admin routes.
#[derive(Clone, Debug)]
pub struct AdminApi {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl AdminApi {
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("an HTTP client");
        Self { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http }
    }

    fn url(&self, schedule: Uuid) -> String {
        format!("{}/v1/admin/schedules/{schedule}/queue", self.base)
    }

    async fn answer(r: reqwest::Response) -> Result<QueueView, OpsError> {
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("");
            let msg = body["error"]["message"].as_str().unwrap_or("");
            return Err(OpsError::Api(format!("{status} {code} {msg}").trim().to_string()));
        }
        match body {
            Value::Object(m) => Ok(QueueView(m)),
            other => Err(OpsError::Api(format!("unexpected answer {other}"))),
        }
    }

    /// `GET /v1/admin/schedules/{scheduleId}/queue`.
    pub async fn get(&self, schedule: Uuid) -> Result<QueueView, OpsError> {
        if self.token.is_empty() {
            return Err(OpsError::Usage("the queue commands need --admin-token (ADMIN_TOKEN), the api's admin token".into()));
        }
        let r = self.http.get(self.url(schedule)).bearer_auth(&self.token).send().await.map_err(|e| OpsError::Api(e.to_string()))?;
        Self::answer(r).await
    }

    /// `PATCH /v1/admin/schedules/{scheduleId}/queue` with `change`.
    pub async fn patch(&self, schedule: Uuid, change: &Value) -> Result<QueueView, OpsError> {
        if self.token.is_empty() {
            return Err(OpsError::Usage("the queue commands need --admin-token (ADMIN_TOKEN), the api's admin token".into()));
        }
        let r = self.http.patch(self.url(schedule)).bearer_auth(&self.token).json(change).send().await.map_err(|e| OpsError::Api(e.to_string()))?;
        Self::answer(r).await
    }
}

/// The admin queue view, as the api returns it (`waiting`, `active`, `paused`, `batch`, …).
#[derive(Debug, Clone, Serialize)]
pub struct QueueView(pub Map<String, Value>);

impl Report for QueueView {
    fn table(&self) -> String {
        let mut t = Table::new(&["field", "value"]);
        for (k, v) in &self.0 {
            t.row(&[k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)]);
        }
        t.to_string()
    }
}

/// `queue show`.
pub async fn show(ops: &Ops, schedule: Uuid) -> Result<QueueView, OpsError> {
    ops.api.get(schedule).await
}

/// A change to one schedule's admission.
#[derive(Debug, Clone, Default)]
pub struct QueueChange {
    pub paused: Option<bool>,
    pub batch: Option<u32>,
    pub max_active: Option<u32>,
}

impl QueueChange {
    fn body(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = self.paused {
            m.insert("paused".into(), json!(p));
        }
        if let Some(b) = self.batch {
            m.insert("batch".into(), json!(b));
        }
        if let Some(a) = self.max_active {
            m.insert("maxActive".into(), json!(a));
        }
        Value::Object(m)
    }
}

/// `queue pause`, `resume`, `set`: applies `change` and records it with the before and after.
pub async fn change(ops: &Ops, schedule: Uuid, change: &QueueChange) -> Result<QueueView, OpsError> {
    let body = change.body();
    if body.as_object().is_none_or(|m| m.is_empty()) {
        return Err(OpsError::Usage("nothing to change: give --batch and/or --max-active".into()));
    }
    let before = ops.api.get(schedule).await.ok();
    let after = ops.api.patch(schedule, &body).await?;
    ops.audit("queue", json!({"scheduleId": schedule, "change": body, "before": before.map(|b| b.0), "after": after.0})).await;
    Ok(after)
}

/// One schedule's queue for `status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    pub schedule_id: String,
    pub waiting: Option<u64>,
    pub active: Option<u64>,
    pub paused: Option<bool>,
}

/// Every schedule with a queue, read from Redis as the admin view reads it
/// ([`crate::queue::stored`]): the same figures as `queue show`, with no api or token needed.
pub async fn queues(ops: &Ops) -> Result<Vec<QueueStatus>, OpsError> {
    let mut conn = ops.redis()?;
    let mut schedules: Vec<String> = conn.smembers(ops.keys.queue_schedules()).await?;
    schedules.sort();
    let mut out = Vec::new();
    for s in schedules {
        let Ok(id) = Uuid::parse_str(&s) else { continue };
        let q = crate::queue::stored(&conn, &ops.keys, id).await?;
        out.push(QueueStatus { schedule_id: s, waiting: Some(q.waiting), active: Some(q.active), paused: Some(q.paused) });
    }
    Ok(out)
}

pub(crate) fn queue_rows(t: &mut Table, qs: &[QueueStatus]) {
    for q in qs {
        t.row(&[q.schedule_id.clone(), opt(&q.waiting), opt(&q.active), opt(&q.paused)]);
    }
}
