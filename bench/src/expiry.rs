//! Scenario 5, expiry accuracy (design document §7-1: expiries up to 10 s late before, ±100 ms
//! after, with 80 % less database load).
//!
//! N holds are taken with their requests paced over `window`, so (the hold TTL being fixed by the
//! api's `--hold-ttl`) their expiries are spread over the same window. Nobody pays; whichever
//! expirer runs (the delay-scheduler pipeline, or `expirer --mode before`) ends them. From
//! PostgreSQL: lateness `expired_at − expires_at` of every hold, and the database work between
//! "all holds taken" and "all holds expired" from `pg_stat_user_tables` on `reservations` (rows read
//! = `seq_tup_read + idx_tup_fetch`) and `pg_stat_database` (whole database, every process).
//!
//! For clean statistics the TTL must exceed the time to take the holds plus `stats_settle`
//! (PostgreSQL backends flush their counters within 10 s once idle): then no expiry happens before
//! the first snapshot. `stats_clean` in the result says whether that held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::pg::{self, DbStats, TableStats};
use super::run::{bookers, pool};
use super::stats::Summary;
use super::Ctx;

/// Most seats a schedule may have (the catalog's limit).
const MAX_SEATS: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Names this measurement (`after`, `before`); the report shows them side by side.
    pub label: String,
    pub holds: usize,
    /// Requested spread of the expiries.
    pub window_ms: u64,
    /// Concurrent hold requests (and users).
    pub concurrency: usize,
    /// Wait before each statistics snapshot.
    pub stats_settle_ms: u64,
    /// Longest wait for the last expiry, after the last hold's `expiresAt`.
    pub timeout_s: f64,
    /// `/metrics` of the delay-scheduler and of the expirer, to split the lateness by stage.
    #[serde(default)]
    pub scheduler_metrics: Option<String>,
    #[serde(default)]
    pub expirer_metrics: Option<String>,
}

/// One stage of the expiry path, from a daemon's latency histogram (seconds → ms; percentiles are
/// bucket upper bounds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stage {
    pub stage: String,
    pub metric: String,
    pub count: f64,
    pub mean_ms: f64,
    pub p50_at_most_ms: Option<f64>,
    pub p99_at_most_ms: Option<f64>,
}

/// The stages read from the daemons' metrics: (daemon, metric, meaning).
const STAGES: &[(&str, &str, &str)] = &[
    ("scheduler", "scheduler_publish_lateness_seconds", "delay-scheduler: Kafka acknowledged reservation.expiration − expiresAt"),
    ("expirer", "expiry_message_lateness_seconds", "broker append time of reservation.expiration − expiresAt (seen by the expirer)"),
    ("expirer", "expiry_lateness_seconds", "expirer: UPDATE … EXPIRED committed − expiresAt (all paths)"),
];

async fn scrape(ctx: &Ctx, cfg: &Config) -> Vec<Option<super::client::Histogram>> {
    let mut texts = Vec::new();
    for url in [&cfg.scheduler_metrics, &cfg.expirer_metrics] {
        let text = match url {
            Some(u) => match ctx.api.http.get(u).send().await {
                Ok(r) => r.text().await.ok(),
                Err(_) => None,
            },
            None => None,
        };
        texts.push(text);
    }
    STAGES
        .iter()
        .map(|(daemon, metric, _)| {
            let text = if *daemon == "scheduler" { &texts[0] } else { &texts[1] };
            text.as_deref().and_then(|t| super::client::Histogram::parse(t, metric))
        })
        .collect()
}

fn stages(before: &[Option<super::client::Histogram>], after: &[Option<super::client::Histogram>]) -> Vec<Stage> {
    let ms = |s: f64| (s * 1e6).round() / 1000.0;
    STAGES
        .iter()
        .zip(before.iter().zip(after))
        .filter_map(|((_, metric, meaning), (b, a))| {
            let d = a.as_ref()?.since(b.as_ref().unwrap_or(&Default::default()));
            (d.count > 0.0).then(|| Stage {
                stage: meaning.to_string(),
                metric: metric.to_string(),
                count: d.count,
                mean_ms: ms(d.sum / d.count),
                p50_at_most_ms: d.quantile_bound(0.5).filter(|x| x.is_finite()).map(ms),
                p99_at_most_ms: d.quantile_bound(0.99).filter(|x| x.is_finite()).map(ms),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Expiry {
    pub config: Option<Config>,
    pub holds: usize,
    pub hold_errors: usize,
    /// `expiresAt − createdAt` of the holds (the api's `--hold-ttl`).
    pub ttl_ms: f64,
    /// Time taken by the hold requests.
    pub hold_phase_ms: f64,
    /// Actual spread of `expires_at` (last − first).
    pub expiry_spread_ms: f64,
    pub expired: usize,
    pub not_expired: usize,
    /// `expired_at − expires_at`, from PostgreSQL.
    pub lateness: Summary,
    /// Expiries / (last − first `expired_at`): the expirer's rate while it had work.
    pub expiries_per_second: f64,
    /// Holds expired earlier than their `expires_at` (must be 0).
    pub early: usize,
    /// `reservations` counters between "all held" and "all expired".
    pub reservations: TableStats,
    pub rows_read_per_expiry: f64,
    pub scans_per_expiry: f64,
    /// Whole-database counters over the same interval (includes other processes' work, such as
    /// the worker storing the expiry notifications).
    pub database: DbStats,
    pub db_tuples_per_expiry: f64,
    pub db_commits_per_expiry: f64,
    /// The measurement interval (first snapshot → second snapshot).
    pub measured_ms: f64,
    /// No expiry happened before the first snapshot, and both snapshots were taken after a settle.
    pub stats_clean: bool,
    /// Where the lateness accrues, from the daemons' histograms (when their metrics were given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
}

/// Runs the expiry measurement with whatever expirer the stack runs.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Result<Expiry> {
    let n = cfg.holds;
    let schedules_n = n.div_ceil(MAX_SEATS);
    let per = n.div_ceil(schedules_n);
    let schedules = ctx.api.create_schedules(&format!("bench {} expiry {}", ctx.run_id, cfg.label), schedules_n, per as i32, 1000).await?;
    // (seat, index of its schedule), in schedule order.
    let mut seats: Vec<(Uuid, usize)> = Vec::with_capacity(n);
    for (k, s) in schedules.iter().enumerate() {
        seats.extend(ctx.api.seat_ids(*s).await?.into_iter().map(|seat| (seat, k)));
    }
    seats.truncate(n);
    let users = cfg.concurrency.min(n).max(1);
    let bookers = Arc::new(bookers(ctx, users, &format!("expiry {}", cfg.label), &schedules, None, cfg.concurrency).await?);
    let notes_base = pg::max_id(&ctx.pool, "notifications").await?;
    let hist0 = scrape(ctx, cfg).await;

    // Paced holds: hold i leaves at start + window × i / n (or as soon as possible when behind).
    let bar = ctx.bar(n, &format!("expiry {}: holding", cfg.label));
    let window = Duration::from_millis(cfg.window_ms);
    let seats = Arc::new(seats);
    let started = tokio::time::Instant::now();
    let (api, b2, s2) = (ctx.api.clone(), bookers.clone(), seats.clone());
    let answers = pool(n, cfg.concurrency, &bar, move |i| {
        let (api, bookers, seats) = (api.clone(), b2.clone(), s2.clone());
        async move {
            tokio::time::sleep_until(started + window.mul_f64(i as f64 / n as f64)).await;
            let b = &bookers[i % bookers.len()];
            let (seat, s) = seats[i];
            let a = api.hold(&b.user, &b.tokens[s], seat).await.ok()?;
            if a.status != 201 {
                return None;
            }
            let id = Uuid::parse_str(a.str("reservationId")?).ok()?;
            let expires: DateTime<Utc> = a.str("expiresAt")?.parse().ok()?;
            let created: DateTime<Utc> = a.str("createdAt")?.parse().ok()?;
            Some((id, expires, created))
        }
    })
    .await;
    let hold_phase = started.elapsed();
    bar.finish_and_clear();
    let held: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = answers.iter().flatten().cloned().collect();
    let hold_errors = n - held.len();
    if held.is_empty() {
        bail!("expiry {}: no hold succeeded", cfg.label);
    }
    let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
    let first = held.iter().map(|h| h.1).min().expect("non-empty");
    let last = held.iter().map(|h| h.1).max().expect("non-empty");
    let ttl_ms = held.iter().map(|h| (h.1 - h.2).num_milliseconds() as f64).sum::<f64>() / held.len() as f64;
    ctx.say(&format!(
        "expiry {}: {} holds in {:.1} s (TTL {:.1} s), expiries spread over {} ms",
        cfg.label,
        held.len(),
        hold_phase.as_secs_f64(),
        ttl_ms / 1000.0,
        (last - first).num_milliseconds()
    ));

    // Let the hold requests' statistics reach the shared counters, but not past the first expiry.
    let settle = Duration::from_millis(cfg.stats_settle_ms);
    let until_first = (first - Utc::now()).to_std().unwrap_or_default();
    let mut clean = until_first > settle + Duration::from_millis(300);
    tokio::time::sleep(if clean { settle } else { until_first.saturating_sub(Duration::from_millis(300)) }).await;
    let (t1, d1, at1) = (pg::table_stats(&ctx.pool, "reservations").await?, pg::db_stats(&ctx.pool).await?, Instant::now());
    if Utc::now() >= first {
        clean = false;
    }

    // Wait for every expiry by counting the RESERVATION_EXPIRED notifications the worker stored,
    // not by reading `reservations` (that would count as expiry work).
    let bar = ctx.bar(held.len(), &format!("expiry {}: expired", cfg.label));
    let deadline = last + chrono::Duration::milliseconds((cfg.timeout_s * 1000.0) as i64);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notifications WHERE id > $1 AND type = 'RESERVATION_EXPIRED'",
        )
        .bind(notes_base)
        .fetch_one(&ctx.pool)
        .await?;
        bar.set_position(done as u64);
        if done as usize >= held.len() || Utc::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let hist1 = scrape(ctx, cfg).await;
    tokio::time::sleep(settle).await;
    let (t2, d2, measured) = (pg::table_stats(&ctx.pool, "reservations").await?, pg::db_stats(&ctx.pool).await?, at1.elapsed());

    // The authoritative check, now that reading `reservations` no longer matters.
    let mut rows = lateness_rows(ctx, &ids).await?;
    while rows.len() < ids.len() && Utc::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rows = lateness_rows(ctx, &ids).await?;
    }
    let expired = rows.len();
    let early = rows.iter().filter(|(ms, _)| *ms < 0.0).count();
    let (first_at, last_at) = rows.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (_, at)| (lo.min(*at), hi.max(*at)));
    let expiries_per_second = if expired > 1 && last_at > first_at { ((expired as f64 / (last_at - first_at)) * 10.0).round() / 10.0 } else { 0.0 };
    let reservations = t2.delta(&t1);
    let database = d2.delta(&d1);
    let per = |x: i64| if expired > 0 { ((x as f64 / expired as f64) * 1000.0).round() / 1000.0 } else { 0.0 };
    let out = Expiry {
        config: Some(cfg.clone()),
        holds: held.len(),
        hold_errors,
        ttl_ms: ttl_ms.round(),
        hold_phase_ms: (hold_phase.as_secs_f64() * 1000.0).round(),
        expiry_spread_ms: (last - first).num_milliseconds() as f64,
        expired,
        not_expired: held.len() - expired,
        lateness: Summary::from_ms(rows.iter().map(|(ms, _)| *ms).collect()),
        expiries_per_second,
        early,
        reservations,
        rows_read_per_expiry: per(reservations.rows_read()),
        scans_per_expiry: per(reservations.scans()),
        database,
        db_tuples_per_expiry: per(database.tup_returned + database.tup_fetched),
        db_commits_per_expiry: per(database.xact_commit),
        measured_ms: (measured.as_secs_f64() * 1000.0).round(),
        stats_clean: clean,
        stages: stages(&hist0, &hist1),
    };
    ctx.say(&format!(
        "expiry {}: {}/{} expired, lateness {}; reservations rows read per expiry {:.2} (scans {:.2}){}",
        cfg.label,
        out.expired,
        out.holds,
        out.lateness.short(),
        out.rows_read_per_expiry,
        out.scans_per_expiry,
        if clean { "" } else { " (statistics not clean: raise --hold-ttl)" }
    ));
    Ok(out)
}

/// (lateness in ms, `expired_at` in epoch seconds) of the holds among `ids` that are EXPIRED.
pub(crate) async fn lateness_rows(ctx: &Ctx, ids: &[Uuid]) -> Result<Vec<(f64, f64)>> {
    Ok(sqlx::query_as(
        "SELECT (EXTRACT(EPOCH FROM expired_at - expires_at) * 1000)::float8, EXTRACT(EPOCH FROM expired_at)::float8 FROM reservations
         WHERE id = ANY($1) AND status = 'EXPIRED' AND expired_at IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(&ctx.pool)
    .await?)
}
