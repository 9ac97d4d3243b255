//! A small typed client of the booking API (the same calls as `tests/common/mod.rs`).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use uuid::Uuid;

/// The api under test.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    /// The api's `/metrics` on its operations address (`--metrics-addr`): the public listener
    /// does not serve it. Without it, scenarios go without the api's counters.
    pub metrics_url: Option<String>,
    pub http: reqwest::Client,
    pub admin_token: String,
}

/// A user as the bench drives it.
#[derive(Clone, Debug)]
pub struct User {
    pub id: Uuid,
    pub token: String,
}

/// Status, body and round-trip time of one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub took: Duration,
}

impl Answer {
    pub fn str(&self, field: &str) -> Option<&str> {
        self.body[field].as_str()
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.body["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

impl Api {
    /// A client for the api at `base` (no trailing slash), with a connection pool large enough for
    /// every concurrent request of a scenario.
    pub fn new(base: &str, admin_token: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Duration::from_secs(300))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Self { base: base.trim_end_matches('/').to_string(), metrics_url: None, http, admin_token: admin_token.to_string() })
    }

    /// Reads the api's counters from `url` (its `--metrics-addr` + `/metrics`).
    pub fn with_metrics(mut self, url: Option<String>) -> Self {
        self.metrics_url = url;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn answer(req: reqwest::RequestBuilder) -> Result<Answer> {
        let started = Instant::now();
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let took = started.elapsed();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok(Answer { status, body, took })
    }

    fn expect(a: Answer, want: u16, what: &str) -> Result<Answer> {
        if a.status != want {
            bail!("{what}: expected {want}, got {} {}", a.status, a.body);
        }
        Ok(a)
    }

    /// `GET /health`; any answer counts (used to open pooled connections before a fight).
    pub async fn health(&self) -> Result<u16> {
        Ok(Self::answer(self.http.get(self.url("/health"))).await?.status)
    }

    /// `POST /v1/users`.
    pub async fn create_user_timed(&self, name: &str) -> Result<(User, Duration)> {
        let a = Self::answer(self.http.post(self.url("/v1/users")).json(&json!({ "name": name }))).await?;
        let a = Self::expect(a, 201, "create user")?;
        let id = a.str("userId").and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| anyhow!("no userId in {}", a.body))?;
        let token = a.str("token").ok_or_else(|| anyhow!("no token"))?.to_string();
        Ok((User { id, token }, a.took))
    }

    pub async fn create_user(&self, name: &str) -> Result<User> {
        Ok(self.create_user_timed(name).await?.0)
    }

    /// `POST /v1/users/me/points/charges` (1 … 10,000,000 points).
    pub async fn charge(&self, u: &User, amount: i64) -> Result<()> {
        let req = self.http.post(self.url("/v1/users/me/points/charges")).bearer_auth(&u.token)
            .header("Idempotency-Key", Uuid::new_v4().to_string()).json(&json!({ "amount": amount }));
        Self::expect(Self::answer(req).await?, 200, "charge")?;
        Ok(())
    }

    /// Creates concerts with `schedules` schedules of `seats` seats at `price` (at most 100
    /// schedules per concert, so several concerts when needed); returns the schedule ids.
    pub async fn create_schedules(&self, title: &str, schedules: usize, seats: i32, price: i64) -> Result<Vec<Uuid>> {
        let mut out = Vec::with_capacity(schedules);
        let mut left = schedules;
        while left > 0 {
            let n = left.min(100);
            let list: Vec<Value> = (0..n)
                .map(|_| json!({"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": seats, "price": price}))
                .collect();
            let req = self.http.post(self.url("/v1/admin/concerts")).bearer_auth(&self.admin_token).json(&json!({"title": title, "schedules": list}));
            let a = Self::expect(Self::answer(req).await?, 201, "create concert (is --admin-token right?)")?;
            for s in a.body["schedules"].as_array().ok_or_else(|| anyhow!("no schedules in {}", a.body))? {
                out.push(s["scheduleId"].as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| anyhow!("bad scheduleId"))?);
            }
            left -= n;
        }
        Ok(out)
    }

    /// The seat ids of a schedule, by seat number.
    pub async fn seat_ids(&self, schedule: Uuid) -> Result<Vec<Uuid>> {
        let a = Self::expect(Self::answer(self.http.get(self.url(&format!("/v1/schedules/{schedule}/seats")))).await?, 200, "seats")?;
        let mut seats: Vec<(i64, Uuid)> = a.body["items"]
            .as_array()
            .ok_or_else(|| anyhow!("no items"))?
            .iter()
            .filter_map(|s| Some((s["seatNo"].as_i64()?, Uuid::parse_str(s["seatId"].as_str()?).ok()?)))
            .collect();
        seats.sort();
        Ok(seats.into_iter().map(|(_, id)| id).collect())
    }

    /// `POST /v1/queue/tokens`: the answer (201 with `queueToken`, `status`, `position`).
    pub async fn enter_queue(&self, u: &User, schedule: Uuid) -> Result<Answer> {
        Self::answer(self.http.post(self.url("/v1/queue/tokens")).bearer_auth(&u.token).json(&json!({ "scheduleId": schedule }))).await
    }

    /// Enters the queue and returns the queue token.
    pub async fn queue_token(&self, u: &User, schedule: Uuid) -> Result<String> {
        let a = Self::expect(self.enter_queue(u, schedule).await?, 201, "enter queue")?;
        Ok(a.str("queueToken").ok_or_else(|| anyhow!("no queueToken"))?.to_string())
    }

    /// `GET /v1/queue/tokens/me`: the answer (`status` WAITING / ACTIVE / EXPIRED, `position`).
    pub async fn queue_me(&self, u: &User, token: &str) -> Result<Answer> {
        Self::answer(self.http.get(self.url("/v1/queue/tokens/me")).bearer_auth(&u.token).header("X-Queue-Token", token)).await
    }

    /// `POST /v1/reservations` (201 with `reservationId`, `expiresAt`; 409 `SEAT_UNAVAILABLE`).
    pub async fn hold(&self, u: &User, queue_token: &str, seat: Uuid) -> Result<Answer> {
        let req = self.http.post(self.url("/v1/reservations")).bearer_auth(&u.token).header("X-Queue-Token", queue_token).json(&json!({ "seatId": seat }));
        Self::answer(req).await
    }

    /// `POST /v1/payments` with a fresh `Idempotency-Key`.
    pub async fn pay(&self, u: &User, reservation: Uuid) -> Result<Answer> {
        let req = self.http.post(self.url("/v1/payments")).bearer_auth(&u.token)
            .header("Idempotency-Key", Uuid::new_v4().to_string()).json(&json!({ "reservationId": reservation }));
        Self::answer(req).await
    }

    /// `DELETE /v1/reservations/{id}`.
    pub async fn cancel(&self, u: &User, reservation: Uuid) -> Result<u16> {
        Ok(Self::answer(self.http.delete(self.url(&format!("/v1/reservations/{reservation}"))).bearer_auth(&u.token)).await?.status)
    }

    /// `GET /v1/rankings/schedules?limit=N`.
    pub async fn rankings(&self, limit: usize) -> Result<Value> {
        let a = Self::answer(self.http.get(self.url(&format!("/v1/rankings/schedules?limit={limit}")))).await?;
        Ok(Self::expect(a, 200, "rankings")?.body)
    }

    /// `GET /metrics` of the api's operations address (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        let url = self.metrics_url.as_deref().context("the api's metrics URL (--api-metrics) was not given")?;
        let resp = self.http.get(url).send().await.context("GET /metrics")?;
        Ok(resp.text().await?)
    }

    /// Sum of every series of a counter or gauge in the api's `/metrics` (None if absent).
    pub async fn metric_sum(&self, name: &str) -> Option<f64> {
        let text = self.metrics().await.ok()?;
        metric_sum(&text, name)
    }
}

/// Sum over every label set of `name` in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A histogram of Prometheus text, summed over every label set except `le`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub count: f64,
    pub sum: f64,
    /// (upper bound, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Reads histogram `name` (without the `_bucket` / `_sum` / `_count` suffix) from `text`.
    pub fn parse(text: &str, name: &str) -> Option<Self> {
        let count = metric_sum(text, &format!("{name}_count"))?;
        let sum = metric_sum(text, &format!("{name}_sum")).unwrap_or(0.0);
        let mut by_le: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
        let prefix = format!("{name}_bucket{{");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else { continue };
            let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
            let Some(le) = labels.split(',').find_map(|kv| kv.trim().strip_prefix("le=\"").map(|v| v.trim_end_matches('"'))) else { continue };
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            let v: f64 = value.trim().parse().unwrap_or(0.0);
            by_le.entry(le.to_string()).or_insert((bound, 0.0)).1 += v;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        Some(Self { count, sum, buckets })
    }

    /// What was observed between `before` and `self`.
    pub fn since(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| (*le, c - before.buckets.iter().find(|(b, _)| b == le).map(|(_, c)| *c).unwrap_or(0.0)))
            .collect();
        Histogram { count: self.count - before.count, sum: self.sum - before.sum, buckets }
    }

    /// The upper bound of the bucket holding quantile `q` (0–1).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
    }
}
