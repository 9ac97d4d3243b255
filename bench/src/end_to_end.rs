//! Scenario 6, end to end, as a user sees it on `GET /v1/users/me/notifications/stream`:
//! - from a payment's answer to its `PAYMENT_CONFIRMED` event on the stream (issue 5);
//! - from a hold's `expiresAt` to its `RESERVATION_EXPIRED` event (issue 7), split into the expiry
//!   itself (`expired_at − expires_at`, from PostgreSQL) and the notification path after it.
//!
//! K users each open their stream, hold two seats, pay the first and let the second expire. Needs
//! the whole stack: relay, Kafka, the worker storing notifications, the delay-scheduler and the
//! expirer; and a short `--hold-ttl` on the api (the scenario waits for the expiries).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::run::{bookers, pool};
use super::sse;
use super::stats::Summary;
use super::Ctx;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub users: usize,
    /// Concurrent payments (kept low: this measures the pipeline, not the payment queue).
    pub pay_concurrency: usize,
    pub concurrency: usize,
    /// Longest wait for the last event after the last `expiresAt`.
    pub timeout_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndToEnd {
    pub config: Option<Config>,
    pub streams: usize,
    pub payments: usize,
    /// Payment answer received → PAYMENT_CONFIRMED on the stream.
    pub payment_to_stream: Summary,
    pub payment_events_missing: usize,
    pub expiries: usize,
    /// `expiresAt` → RESERVATION_EXPIRED on the stream.
    pub expiry_to_stream: Summary,
    /// `expired_at − expires_at` of the same holds (PostgreSQL).
    pub expiry_lateness: Summary,
    /// `expired_at` → RESERVATION_EXPIRED on the stream (outbox, Kafka, worker, stream).
    pub expired_to_stream: Summary,
    pub expiry_events_missing: usize,
    /// Events of those kinds seen more than once for the same reservation.
    pub duplicates: usize,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Result<EndToEnd> {
    let k = cfg.users;
    let schedule = ctx.api.create_schedules(&format!("bench {} end to end", ctx.run_id), 1, (2 * k) as i32, 1000).await?[0];
    let seats = Arc::new(ctx.api.seat_ids(schedule).await?);
    let bookers = Arc::new(bookers(ctx, k, "end to end", &[schedule], Some(10_000_000), cfg.concurrency).await?);

    // Streams first: once a stream's answer arrived, the server is subscribed.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let bar = ctx.bar(k, "end to end: opening streams");
    let mut pumps = Vec::with_capacity(k);
    for (i, b) in bookers.iter().enumerate() {
        let resp = sse::open(&ctx.api, &b.user).await?;
        pumps.push(tokio::spawn(sse::pump(i, resp, tx.clone(), stop.clone())));
        bar.inc(1);
    }
    drop(tx);
    bar.finish_and_clear();

    // Two holds per user: seat 2i is paid, seat 2i+1 expires.
    let bar = ctx.bar(2 * k, "end to end: holding");
    let (api, b2, s2) = (ctx.api.clone(), bookers.clone(), seats.clone());
    let holds = pool(2 * k, cfg.concurrency, &bar, move |j| {
        let (api, bookers, seats) = (api.clone(), b2.clone(), s2.clone());
        async move {
            let b = &bookers[j / 2];
            let a = api.hold(&b.user, &b.tokens[0], seats[j]).await?;
            if a.status != 201 {
                bail!("hold: {} {}", a.status, a.body);
            }
            let id = Uuid::parse_str(a.str("reservationId").unwrap_or_default())?;
            let expires: DateTime<Utc> = a.str("expiresAt").unwrap_or_default().parse()?;
            Ok((id, expires))
        }
    })
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let to_pay: Vec<(usize, Uuid)> = (0..k).map(|i| (i, holds[2 * i].0)).collect();
    let to_expire: HashMap<Uuid, DateTime<Utc>> = (0..k).map(|i| holds[2 * i + 1]).collect();
    let last_expiry = to_expire.values().max().copied().unwrap_or_else(Utc::now);

    let bar = ctx.bar(k, "end to end: paying");
    let (api, b2, p2) = (ctx.api.clone(), bookers.clone(), Arc::new(to_pay));
    let paid = pool(k, cfg.pay_concurrency, &bar, move |n| {
        let (api, bookers, to_pay) = (api.clone(), b2.clone(), p2.clone());
        async move {
            let (i, r) = to_pay[n];
            let a = api.pay(&bookers[i].user, r).await.ok()?;
            (a.status == 201).then(|| (r, Instant::now()))
        }
    })
    .await;
    bar.finish_and_clear();
    let paid: HashMap<Uuid, Instant> = paid.into_iter().flatten().collect();

    // Collect events until every payment and expiry showed up, or the timeout.
    let bar = ctx.bar(paid.len() + to_expire.len(), "end to end: events");
    let deadline = last_expiry + chrono::Duration::milliseconds((cfg.timeout_s * 1000.0) as i64);
    let (mut pay_seen, mut exp_seen): (HashMap<Uuid, Instant>, HashMap<Uuid, DateTime<Utc>>) = Default::default();
    let mut duplicates = 0;
    while pay_seen.len() < paid.len() || exp_seen.len() < to_expire.len() {
        let left = (deadline - Utc::now()).to_std().unwrap_or_default();
        if left.is_zero() {
            break;
        }
        let Ok(Some(arrival)) = tokio::time::timeout(left.min(Duration::from_secs(1)), rx.recv()).await else { continue };
        let v = arrival.event.json();
        let Some(r) = v["data"]["reservationId"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else { continue };
        match v["type"].as_str() {
            Some("PAYMENT_CONFIRMED") if paid.contains_key(&r) => {
                if pay_seen.insert(r, arrival.at).is_some() {
                    duplicates += 1;
                }
            }
            Some("RESERVATION_EXPIRED") if to_expire.contains_key(&r) => {
                if exp_seen.insert(r, arrival.at_utc).is_some() {
                    duplicates += 1;
                }
            }
            _ => continue,
        }
        bar.set_position((pay_seen.len() + exp_seen.len()) as u64);
    }
    bar.finish_and_clear();
    stop.cancel();
    for p in pumps {
        let _ = p.await;
    }

    let payment_to_stream: Vec<f64> = pay_seen.iter().map(|(r, at)| signed_ms(paid[r], *at)).collect();
    let expiry_to_stream: Vec<f64> = exp_seen.iter().map(|(r, at)| (*at - to_expire[r]).num_microseconds().unwrap_or(0) as f64 / 1000.0).collect();
    let ids: Vec<Uuid> = to_expire.keys().copied().collect();
    let rows: Vec<(Uuid, DateTime<Utc>, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT id, expires_at, expired_at FROM reservations WHERE id = ANY($1)").bind(&ids).fetch_all(&ctx.pool).await?;
    let mut lateness = Vec::new();
    let mut after_expired = Vec::new();
    for (id, expires, expired) in rows {
        if let Some(expired) = expired {
            lateness.push((expired - expires).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            if let Some(at) = exp_seen.get(&id) {
                after_expired.push((*at - expired).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
    }
    let out = EndToEnd {
        config: Some(cfg.clone()),
        streams: k,
        payments: paid.len(),
        payment_to_stream: Summary::from_ms(payment_to_stream),
        payment_events_missing: paid.len() - pay_seen.len(),
        expiries: to_expire.len(),
        expiry_to_stream: Summary::from_ms(expiry_to_stream),
        expiry_lateness: Summary::from_ms(lateness),
        expired_to_stream: Summary::from_ms(after_expired),
        expiry_events_missing: to_expire.len() - exp_seen.len(),
        duplicates,
    };
    ctx.say(&format!(
        "end to end: payment → stream {}; expiresAt → stream {} (expiry {} + notification {})",
        out.payment_to_stream.short(),
        out.expiry_to_stream.short(),
        out.expiry_lateness.short(),
        out.expired_to_stream.short()
    ));
    Ok(out)
}

/// `later − earlier` in ms, negative when `later` came first.
fn signed_ms(earlier: Instant, later: Instant) -> f64 {
    if later >= earlier {
        later.duration_since(earlier).as_secs_f64() * 1000.0
    } else {
        -(earlier.duration_since(later).as_secs_f64() * 1000.0)
    }
}
