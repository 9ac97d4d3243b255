//! Scenario 3, the sell-out: many schedules of 50 seats filled by concurrent clients, each picking
//! a random schedule that still has seats and a random seat in it (so clients collide like real
//! buyers do). Measures holds per second and the latency of every attempt.
//!
//! Scenario 4, payments: the holds of a sell-out paid concurrently (design document §2-2
//! bottleneck 2: 160 ms with the ranking updated inside the payment, 110 ms without). The ranking
//! consumer in the worker should be running: we also measure how long the ranking takes to show
//! every payment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::run::{bookers, pool, Booker, Rng};
use super::stats::{Summary, Throughput};
use super::Ctx;

/// Price of a bench seat; every booker is charged enough for any number of seats.
pub const PRICE: i64 = 1000;
const POINTS: i64 = 10_000_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub schedules: usize,
    pub seats_per_schedule: usize,
    /// Concurrent clients (each a user ACTIVE in every schedule).
    pub clients: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SellOutResult {
    pub config: Option<Config>,
    pub seats: usize,
    /// 201 answers (must equal `seats`).
    pub holds: usize,
    /// 409 answers: another client got there first.
    pub conflicts: usize,
    pub errors: usize,
    /// HELD reservations in these schedules afterwards.
    pub db_held: i64,
    pub throughput: Throughput,
    pub attempts_per_second: f64,
    /// Every attempt (201 and 409).
    pub latency: Summary,
    /// Successful holds only.
    pub hold_latency: Summary,
}

/// A seat held during the sell-out.
#[derive(Debug, Clone)]
pub struct Held {
    pub booker: usize,
    pub reservation: Uuid,
    pub schedule: Uuid,
}

/// The sell-out's result, plus what the payments need.
pub struct SellOut {
    pub result: SellOutResult,
    pub bookers: Vec<Booker>,
    pub schedules: Vec<Uuid>,
    pub held: Vec<Held>,
}

/// A sell-out ready to start: its schedules and seats exist, and every booker is ACTIVE in every
/// schedule.
pub struct Prepared {
    schedules: Vec<Uuid>,
    seats: Vec<Vec<Uuid>>,
    bookers: Vec<Booker>,
}

/// Creates the sell-out's schedules and its bookers, and waits until each booker is ACTIVE in
/// every schedule. Not measured: the bookers' queue entries and admissions start a notification
/// each (clients × schedules × 2, 7,680 with the defaults), whose pipeline is still running when
/// the last booker is ACTIVE. The caller waits for the machine to be quiet after this, so that
/// the holds are not charged for the queue's work (the queue spike measures that).
pub async fn prepare(ctx: &Ctx, cfg: &Config) -> Result<Prepared> {
    let schedules = ctx.api.create_schedules(&format!("bench {} sell-out", ctx.run_id), cfg.schedules, cfg.seats_per_schedule as i32, PRICE).await?;
    let mut seats = Vec::with_capacity(schedules.len());
    for s in &schedules {
        seats.push(ctx.api.seat_ids(*s).await?);
    }
    let bookers = bookers(ctx, cfg.clients, "sell-out", &schedules, Some(POINTS), cfg.clients).await?;
    Ok(Prepared { schedules, seats, bookers })
}

/// Runs a prepared sell-out: the clock starts with the first hold.
pub async fn run(ctx: &Ctx, cfg: &Config, prepared: Prepared) -> Result<SellOut> {
    let Prepared { schedules, seats, bookers } = prepared;
    let total: usize = seats.iter().map(Vec::len).sum();
    let bookers = Arc::new(bookers);

    let remaining: Arc<Vec<Mutex<Vec<Uuid>>>> = Arc::new(seats.into_iter().map(Mutex::new).collect());
    let held: Arc<Mutex<Vec<Held>>> = Arc::default();
    let attempts: Arc<Mutex<Vec<(u16, f64)>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let bar = ctx.bar(total, "sell-out: holding");
    let started = Instant::now();
    let (api, sched) = (ctx.api.clone(), Arc::new(schedules.clone()));
    let (b2, r2, h2, a2, e2, bar2) = (bookers.clone(), remaining.clone(), held.clone(), attempts.clone(), errors.clone(), bar.clone());
    pool(cfg.clients, cfg.clients, &indicatif::ProgressBar::hidden(), move |c| {
        let (api, sched, bookers, remaining, held, attempts, errors, bar) =
            (api.clone(), sched.clone(), b2.clone(), r2.clone(), h2.clone(), a2.clone(), e2.clone(), bar2.clone());
        async move {
            let mut rng = Rng::new();
            let booker = &bookers[c];
            loop {
                // A random schedule that still has seats, then a random seat of it.
                let start = rng.below(sched.len());
                let pick = (0..sched.len()).map(|k| (start + k) % sched.len()).find_map(|s| {
                    let r = remaining[s].lock().unwrap();
                    (!r.is_empty()).then(|| (s, r[rng.below(r.len())]))
                });
                let Some((s, seat)) = pick else { break };
                match api.hold(&booker.user, &booker.tokens[s], seat).await {
                    Ok(a) => {
                        attempts.lock().unwrap().push((a.status, a.took.as_secs_f64() * 1000.0));
                        match a.status {
                            201 | 409 => {
                                remaining[s].lock().unwrap().retain(|x| *x != seat);
                                if a.status == 201 {
                                    let reservation = a.str("reservationId").and_then(|r| Uuid::parse_str(r).ok()).unwrap_or_default();
                                    held.lock().unwrap().push(Held { booker: c, reservation, schedule: sched[s] });
                                    bar.inc(1);
                                }
                            }
                            _ => {
                                if errors.fetch_add(1, Ordering::Relaxed) > 1000 {
                                    break;
                                }
                            }
                        }
                    }
                    Err(_) => {
                        if errors.fetch_add(1, Ordering::Relaxed) > 1000 {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    bar.finish_and_clear();
    let held = std::mem::take(&mut *held.lock().unwrap());
    let attempts = std::mem::take(&mut *attempts.lock().unwrap());
    let db_held: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE schedule_id = ANY($1) AND status = 'HELD'")
        .bind(&schedules)
        .fetch_one(&ctx.pool)
        .await?;
    let result = SellOutResult {
        config: Some(cfg.clone()),
        seats: total,
        holds: held.len(),
        conflicts: attempts.iter().filter(|(s, _)| *s == 409).count(),
        errors: errors.load(Ordering::Relaxed),
        db_held,
        throughput: Throughput::new(held.len(), took),
        attempts_per_second: (attempts.len() as f64 / took.as_secs_f64() * 10.0).round() / 10.0,
        latency: Summary::from_ms(attempts.iter().map(|(_, ms)| *ms).collect()),
        hold_latency: Summary::from_ms(attempts.iter().filter(|(s, _)| *s == 201).map(|(_, ms)| *ms).collect()),
    };
    ctx.say(&format!(
        "sell-out: {} seats held in {:.1} s = {:.0} holds/s, {} conflicts, {} errors; attempts {}",
        result.holds, result.throughput.seconds, result.throughput.per_second, result.conflicts, result.errors, result.latency.short()
    ));
    Ok(SellOut { result, bookers: Arc::try_unwrap(bookers).unwrap_or_else(|a| (*a).clone()), schedules, held })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentsConfig {
    pub concurrency: usize,
    /// Longest wait for the ranking to show every payment.
    pub ranking_timeout_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Payments {
    pub config: Option<PaymentsConfig>,
    pub payments: usize,
    pub confirmed: usize,
    pub failed: usize,
    /// CONFIRMED reservations in PostgreSQL afterwards, among the paid ones.
    pub db_confirmed: i64,
    pub throughput: Throughput,
    pub latency: Summary,
    /// From the last payment's answer until `GET /v1/rankings/schedules` showed every payment
    /// (None when it did not within the timeout, or with more than 100 schedules).
    pub ranking_caught_up_ms: Option<f64>,
}

/// Pays every hold of a sell-out with `concurrency` clients, each payment by the hold's own
/// user, and never two payments of one user at once: a client takes the user whose turn it is,
/// pays one of their holds, and puts them back at the end of the line. That is a sale's shape
/// (many buyers, each paying for their own seats one after another); two payments of one user at
/// once would queue on that user's balance row, which is correct, but measures one user's
/// patience, not the payment path. (Until issue 11's tenth pass, the clients took the holds in a
/// round-robin order of users without that rule: a slow payment let the same user's next one
/// start beside it, and half of the payment statement's samples in `pg_stat_activity` were
/// waits on another payment's lock of the balance row.)
pub async fn payments(ctx: &Ctx, cfg: &PaymentsConfig, sold: &SellOut) -> Result<Payments> {
    if sold.held.is_empty() {
        bail!("payments: the sell-out held nothing");
    }
    let mut by_booker: Vec<Vec<Held>> = vec![Vec::new(); sold.bookers.len()];
    for h in &sold.held {
        by_booker[h.booker].push(h.clone());
    }
    let n = sold.held.len();
    let line: std::collections::VecDeque<Vec<Held>> = by_booker.into_iter().filter(|v| !v.is_empty()).collect();
    let clients = cfg.concurrency.clamp(1, line.len());
    let line = Arc::new(Mutex::new(line));
    let before: i64 = ranking_total(ctx, &sold.schedules).await.unwrap_or(0);
    let bookers = Arc::new(sold.bookers.clone());
    let bar = ctx.bar(n, "payments");
    let started = Instant::now();
    let (api, l2, b2, bar2) = (ctx.api.clone(), line.clone(), bookers.clone(), bar.clone());
    let answers: Vec<Option<(u16, f64, f64)>> = pool(clients, clients, &indicatif::ProgressBar::hidden(), move |_| {
        let (api, line, bookers, bar) = (api.clone(), l2.clone(), b2.clone(), bar2.clone());
        async move {
            let mut out = Vec::new();
            loop {
                let Some(mut holds) = line.lock().unwrap().pop_front() else { break };
                let h = holds.pop().expect("only users with holds wait in line");
                let at = unix_ms();
                out.push(api.pay(&bookers[h.booker].user, h.reservation).await.ok().map(|a| (a.status, a.took.as_secs_f64() * 1000.0, at)));
                bar.inc(1);
                if !holds.is_empty() {
                    line.lock().unwrap().push_back(holds);
                }
            }
            out
        }
    })
    .await
    .into_iter()
    .flatten()
    .collect();
    if let Some(path) = std::env::var_os("BENCH_TRACE_PAYMENTS") {
        // When each payment started and how long it took, one line each: for finding where the
        // slowest ones fall (a first wave, a stall) beside a profile of the same seconds.
        let lines: String = answers.iter().flatten().map(|(_, ms, at)| format!("{at:.3} {ms:.3}\n")).collect();
        std::fs::write(&path, lines).with_context(|| format!("writing {}", std::path::Path::new(&path).display()))?;
    }
    let answers: Vec<Option<(u16, f64)>> = answers.into_iter().map(|a| a.map(|(status, ms, _)| (status, ms))).collect();
    let ids: Vec<Uuid> = sold.held.iter().map(|h| h.reservation).collect();
    let took = started.elapsed();
    let last_answer = Instant::now();
    bar.finish_and_clear();
    let confirmed = answers.iter().filter(|a| matches!(a, Some((201, _)))).count();
    let db_confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE id = ANY($1) AND status = 'CONFIRMED'")
        .bind(&ids)
        .fetch_one(&ctx.pool)
        .await?;

    // The ranking is updated by the worker's consumer of payment.completed, not by the payment.
    let mut ranking_caught_up_ms = None;
    if sold.schedules.len() <= 100 {
        let deadline = Instant::now() + Duration::from_secs_f64(cfg.ranking_timeout_s);
        while Instant::now() < deadline {
            if ranking_total(ctx, &sold.schedules).await.unwrap_or(0) - before >= confirmed as i64 {
                ranking_caught_up_ms = Some((last_answer.elapsed().as_secs_f64() * 1e6).round() / 1000.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let out = Payments {
        // The concurrency reported is the one run: at most one client per user with holds.
        config: Some(PaymentsConfig { concurrency: clients, ..cfg.clone() }),
        payments: n,
        confirmed,
        failed: n - confirmed,
        db_confirmed,
        throughput: Throughput::new(confirmed, took),
        latency: Summary::from_ms(answers.iter().flatten().map(|(_, ms)| *ms).collect()),
        ranking_caught_up_ms,
    };
    ctx.say(&format!(
        "payments: {} confirmed of {n} at {:.0}/s; {}; ranking caught up {:?} ms after the last answer",
        out.confirmed, out.throughput.per_second, out.latency.short(), out.ranking_caught_up_ms
    ));
    Ok(out)
}

/// Confirmed seats of `schedules` as the public ranking shows them.
async fn ranking_total(ctx: &Ctx, schedules: &[Uuid]) -> Result<i64> {
    let v = ctx.api.rankings(100).await?;
    let wanted: std::collections::HashSet<String> = schedules.iter().map(|s| s.to_string()).collect();
    Ok(v["items"]
        .as_array()
        .map(|items| {
            items.iter().filter(|e| e["scheduleId"].as_str().is_some_and(|s| wanted.contains(s))).map(|e| e["soldSeats"].as_i64().unwrap_or(0)).sum()
        })
        .unwrap_or(0))
}

/// Wall-clock milliseconds since the Unix epoch (comparable with `perf` and the daemons' logs).
fn unix_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}
