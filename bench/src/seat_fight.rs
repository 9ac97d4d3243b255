//! Scenario 2, the seat fight (design document §2-2 bottleneck 1: 500 requests for one seat took
//! 25 s behind a distributed lock): F users, all ACTIVE, ask for the same seat at the same moment.
//! PostgreSQL decides with one insert under a partial unique index; we measure how long each
//! request waited for its answer, count the winners (must be 1) and check the database agrees.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::run::{bookers, pool};
use super::stats::Summary;
use super::Ctx;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub fighters: usize,
    /// Concurrency of the setup (users, queue).
    pub concurrency: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeatFight {
    pub config: Option<Config>,
    pub fighters: usize,
    /// 201 answers.
    pub winners: usize,
    /// 409 `SEAT_UNAVAILABLE` answers.
    pub losers: usize,
    /// Anything else (errors).
    pub others: usize,
    /// HELD or CONFIRMED reservations of the seat in PostgreSQL afterwards.
    pub db_active_reservations: i64,
    /// From the release of all requests to the last answer.
    pub all_decided_ms: f64,
    pub latency: Summary,
    pub winner_ms: f64,
    pub loser_latency: Summary,
}

/// Runs the fight.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Result<SeatFight> {
    let schedule = ctx.api.create_schedules(&format!("bench {} seat fight", ctx.run_id), 1, 1, 1000).await?[0];
    let seat = ctx.api.seat_ids(schedule).await?[0];
    let fighters = bookers(ctx, cfg.fighters, "seat fight", &[schedule], None, cfg.concurrency).await?;

    // Open one pooled connection per fighter first, so the fight measures decisions, not TCP
    // handshakes.
    let f = cfg.fighters;
    let warm = Arc::new(tokio::sync::Barrier::new(f));
    let api = ctx.api.clone();
    pool(f, f, &indicatif::ProgressBar::hidden(), move |_| {
        let (api, warm) = (api.clone(), warm.clone());
        async move {
            warm.wait().await;
            let _ = api.health().await;
        }
    })
    .await;

    // Everyone waits at the barrier; then all requests leave together.
    let go = Arc::new(tokio::sync::Barrier::new(f + 1));
    let fighters = Arc::new(fighters);
    let mut tasks = Vec::with_capacity(f);
    for i in 0..f {
        let (api, go, fighters) = (ctx.api.clone(), go.clone(), fighters.clone());
        tasks.push(tokio::spawn(async move {
            let b = &fighters[i];
            go.wait().await;
            let a = api.hold(&b.user, &b.tokens[0], seat).await;
            (Instant::now(), a)
        }));
    }
    go.wait().await;
    let released = Instant::now();
    let mut answers = Vec::with_capacity(f);
    for t in tasks {
        answers.push(t.await?);
    }
    let all_decided_ms = answers.iter().map(|(at, _)| at.duration_since(released).as_secs_f64() * 1000.0).fold(0.0, f64::max);

    let (mut winners, mut losers, mut others) = (0, 0, 0);
    let (mut all, mut lost, mut winner_ms, mut winner) = (Vec::new(), Vec::new(), 0.0, None);
    for (i, (_, a)) in answers.iter().enumerate() {
        match a {
            Ok(a) => {
                let ms = a.took.as_secs_f64() * 1000.0;
                all.push(ms);
                match a.status {
                    201 => {
                        winners += 1;
                        winner_ms = ms;
                        winner = a.str("reservationId").and_then(|s| Uuid::parse_str(s).ok()).map(|r| (i, r));
                    }
                    409 => {
                        losers += 1;
                        lost.push(ms);
                    }
                    _ => others += 1,
                }
            }
            Err(_) => others += 1,
        }
    }
    let db_active_reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE seat_id = $1 AND status IN ('HELD', 'CONFIRMED')")
        .bind(seat)
        .fetch_one(&ctx.pool)
        .await?;
    // Leave nothing behind that would expire during a later scenario.
    if let Some((i, r)) = winner {
        let _ = ctx.api.cancel(&fighters[i].user, r).await;
    }
    let out = SeatFight {
        config: Some(cfg.clone()),
        fighters: f,
        winners,
        losers,
        others,
        db_active_reservations,
        all_decided_ms: (all_decided_ms * 1000.0).round() / 1000.0,
        latency: Summary::from_ms(all),
        winner_ms: (winner_ms * 1000.0).round() / 1000.0,
        loser_latency: Summary::from_ms(lost),
    };
    ctx.say(&format!(
        "seat fight: {f} requests, {winners} winner, {losers} × 409, {others} other; all decided in {:.0} ms; {}",
        out.all_decided_ms,
        out.latency.short()
    ));
    Ok(out)
}
