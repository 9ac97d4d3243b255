//! The benchmark harness (issue 7) at a small size against the real services: every scenario
//! through the library entry points the `bench` binary uses, with the daemons in-process.
//! These tests check the harness is right (counts add up, one winner, lateness read from the
//! database), never speed.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use booking::app::{self, ExpirerMode, ExpirerSettings, WorkerSettings};
use bench::report::{markdown, Report, Results};
use bench::{end_to_end, expiry, notify_drain, queue_spike, seat_fight, sell_out, Api, Ctx};
use booking::export::Sink;
use booking::scheduler::SchedulerConfig;
use common::{FairSettings, QueueSettings, TestEnv, ADMIN};
use tokio_util::sync::CancellationToken;

type Task = (CancellationToken, tokio::task::JoinHandle<()>);

async fn ops() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn stop(t: Task) {
    t.0.cancel();
    let _ = t.1.await;
}

/// Bench-friendly queue flags: everyone is admitted at the next tick.
fn open_queue() -> QueueSettings {
    QueueSettings { tick: Duration::from_millis(100), batch: 100_000, max_active: 1_000_000, idle: Duration::from_secs(300) }
}

/// Bench bookers hold many seats of one schedule each: no seat limit in the way.
fn bench_fair() -> FairSettings {
    FairSettings { max_seats_per_user: 1_000_000, ..FairSettings::default() }
}

async fn worker(env: &TestEnv) -> Task {
    let t = CancellationToken::new();
    let settings = WorkerSettings {
        sink: Sink::File(std::env::temp_dir().join(format!("bench-export-{}.jsonl", env.prefix))),
        delivery_batch: 200,
        ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(3600), full: Duration::from_secs(3600) },
        ..common::inproc::worker_settings(env)
    };
    let (res, gp, sd, l) = (env.res.clone(), format!("{}worker-", env.prefix), t.clone(), ops().await);
    let h = tokio::spawn(async move {
        app::run_worker(res, settings, &gp, l, booking::telemetry::install_metrics(), sd).await.unwrap();
    });
    (t, h)
}

async fn scheduler(env: &TestEnv) -> Task {
    let t = CancellationToken::new();
    let cfg = SchedulerConfig { batch_size: 500, lease: Duration::from_secs(5), poll_interval: Duration::from_secs(1), rearm_interval: Duration::from_secs(3600) };
    let (res, group, sd, l) = (env.res.clone(), format!("{}scheduler", env.prefix), t.clone(), ops().await);
    let h = tokio::spawn(async move {
        app::run_scheduler(res, cfg, &group, l, booking::telemetry::install_metrics(), sd).await.unwrap();
    });
    (t, h)
}

async fn expirer(env: &TestEnv, mode: ExpirerMode) -> Task {
    let t = CancellationToken::new();
    let s = ExpirerSettings {
        mode,
        sweep_interval: Duration::from_secs(3600),
        sweep_grace: Duration::from_secs(3600),
        sweep_batch: 1000,
        legacy_interval: Duration::from_secs(1),
        outbox_batch: 500,
        outbox_poll: Duration::from_millis(200),
    };
    let (res, group, sd, l) = (env.res.clone(), format!("{}expirer-{mode:?}", env.prefix), t.clone(), ops().await);
    let h = tokio::spawn(async move {
        app::run_expirer(res, s, &group, l, booking::telemetry::install_metrics(), sd).await.unwrap();
    });
    (t, h)
}

fn ctx(env: &TestEnv, api: &common::TestApi) -> Ctx {
    Ctx::new(Api::new(&api.base, ADMIN).unwrap().with_metrics(api.metrics_url.clone()), env.pool.clone(), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_spike_seat_fight_sell_out_and_payments_at_a_small_size() {
    let env = TestEnv::new().await;
    let api = env.api_with(Duration::from_secs(300), open_queue(), bench_fair()).await;
    let w = worker(&env).await;
    let ctx = ctx(&env, &api);

    let q = queue_spike::run(&ctx, &queue_spike::Config {
        users: 40,
        concurrency: 8,
        pollers: 2,
        drain_timeout_s: 60.0,
        kafka_brokers: Some(env.brokers.clone()),
        stack_topic_prefix: Some(env.prefix.clone()),
    }).await.unwrap();
    assert_eq!(q.user_creation.count, 40);
    assert_eq!(q.entry.count, 40, "every user entered");
    assert_eq!(q.entry_errors, 0);
    assert_eq!(q.entry_latency.count, 40);
    assert_eq!(q.admission.active, 40, "every user became ACTIVE");
    assert!(q.position_latency.count >= 40, "at least one position query per user");
    assert_eq!(q.position_errors, 0);
    let n = &q.notifications;
    assert_eq!(n.expected, 80, "one QUEUE_POSITION and one QUEUE_ACTIVATED per user");
    if !(n.drained && n.stored == 80) {
        // Seen once, in a fresh-clone CI run right after the broker was first formatted: 80
        // published, 79 stored, and no progress for 15 s. Not reproduced since; say which one
        // (the outbox keeps only what is unsent).
        let missing: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT o.event_id::text, o.message_key, o.set_aside_at::text, o.envelope->'payload'->>'type' FROM outbox o
             WHERE o.topic LIKE '%notification.request' AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.event_id = o.event_id)",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        let dlq = env.read_topic(&format!("{}.dlq", env.topics().notification_request), usize::MAX, Duration::from_secs(3)).await;
        let dead: Vec<_> = dlq.iter().map(|(k, _, h)| (k.clone(), h.clone())).collect();
        panic!("{n:?}\nstill in the outbox (event id, key, set aside at, type): {missing:?}\ndead letters (key, headers): {dead:?}");
    }
    assert_eq!(n.outbox_to_stored.count, 80, "every stored notification was found on Kafka");
    assert_eq!(n.published, 80);
    assert!(n.outbox_to_stored.min_ms >= 0.0);

    let f = seat_fight::run(&ctx, &seat_fight::Config { fighters: 30, concurrency: 8 }).await.unwrap();
    assert_eq!(f.winners, 1, "exactly one winner: {f:?}");
    assert_eq!(f.losers, 29);
    assert_eq!(f.others, 0);
    assert_eq!(f.db_active_reservations, 1);
    assert_eq!(f.latency.count, 30);
    assert_eq!(f.loser_latency.count, 29);
    assert!(f.all_decided_ms >= f.latency.max_ms * 0.5 && f.latency.max_ms >= f.latency.p99_ms && f.latency.p99_ms >= f.latency.p50_ms);

    let cfg = sell_out::Config { schedules: 3, seats_per_schedule: 10, clients: 6 };
    let sold = sell_out::run(&ctx, &cfg, sell_out::prepare(&ctx, &cfg).await.unwrap()).await.unwrap();
    let s = &sold.result;
    assert_eq!(s.seats, 30);
    assert_eq!(s.holds, 30, "every seat held once: {s:?}");
    assert_eq!(s.errors, 0);
    assert_eq!(s.db_held, 30);
    assert_eq!(s.latency.count, s.holds + s.conflicts, "every attempt is a hold or a conflict");
    assert_eq!(sold.held.len(), 30);

    let p = sell_out::payments(&ctx, &sell_out::PaymentsConfig { concurrency: 4, ranking_timeout_s: 30.0 }, &sold).await.unwrap();
    assert_eq!(p.payments, 30);
    assert_eq!(p.confirmed, 30, "{p:?}");
    assert_eq!(p.db_confirmed, 30);
    assert_eq!(p.latency.count, 30);
    assert!(p.ranking_caught_up_ms.is_some(), "the ranking consumer shows every payment");

    // The one-schedule sale: the same run on seats all of one schedule.
    let cfg = sell_out::Config { schedules: 1, seats_per_schedule: 20, clients: 6 };
    let one = sell_out::run(&ctx, &cfg, sell_out::prepare(&ctx, &cfg).await.unwrap()).await.unwrap().result;
    assert_eq!((one.seats, one.holds, one.errors, one.db_held), (20, 20, 0, 20), "every seat of the one schedule held once: {one:?}");

    // The report renders every figure with the document's beside it.
    let results = Results { queue_spike: Some(q), seat_fight: Some(f), sell_out: Some(s.clone()), one_schedule: Some(one), payments: Some(p), ..Default::default() };
    let report = Report { results, ..Default::default() }.finish();
    assert!(report.figures.iter().any(|f| f.reference == "§2-2 bottleneck 1" && f.document.contains("25 s")));
    assert!(report.figures.iter().any(|f| f.document.contains("160 ms")));
    assert!(report.figures.iter().any(|f| f.document.contains("10,000+")));
    let md = markdown(&report);
    assert!(md.contains("| Seat fight: winners | 1 winner, 29 × 409"), "{md}");
    assert!(md.contains("| One-schedule sale: holds per second") && md.contains("1 schedule × 20 seats, 6 clients"), "{md}");

    stop(w).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_and_expiry_before_and_after_at_a_small_size() {
    let env = TestEnv::new().await;
    let api = env.api_with(Duration::from_secs(4), open_queue(), bench_fair()).await;
    let w = worker(&env).await;
    let s = scheduler(&env).await;
    let e = expirer(&env, ExpirerMode::After).await;
    let ctx = ctx(&env, &api);

    let ee = end_to_end::run(&ctx, &end_to_end::Config { users: 4, pay_concurrency: 2, concurrency: 4, timeout_s: 60.0 }).await.unwrap();
    assert_eq!(ee.streams, 4);
    assert_eq!(ee.payments, 4);
    assert_eq!(ee.payment_events_missing, 0, "{ee:?}");
    assert_eq!(ee.payment_to_stream.count, 4);
    assert_eq!(ee.expiries, 4);
    assert_eq!(ee.expiry_events_missing, 0, "{ee:?}");
    assert_eq!(ee.expiry_lateness.count, 4);
    assert!(ee.expiry_lateness.min_ms >= 0.0, "{ee:?}");
    assert_eq!(ee.duplicates, 0);

    // In-process daemons share one metrics recorder, which the api's operations address serves.
    let metrics = api.metrics_url.clone();
    let cfg = |label: &str| expiry::Config {
        label: label.into(),
        holds: 24,
        window_ms: 1000,
        concurrency: 4,
        stats_settle_ms: 500,
        timeout_s: 60.0,
        scheduler_metrics: metrics.clone(),
        expirer_metrics: metrics.clone(),
    };
    let after = expiry::run(&ctx, &cfg("after")).await.unwrap();
    stop(s).await;
    stop(e).await;
    let e = expirer(&env, ExpirerMode::Before).await;
    let before = expiry::run(&ctx, &cfg("before")).await.unwrap();
    stop(e).await;

    for r in [&after, &before] {
        assert_eq!(r.holds, 24, "{r:?}");
        assert_eq!(r.hold_errors, 0);
        assert_eq!(r.expired, 24, "every hold expired: {r:?}");
        assert_eq!(r.not_expired, 0);
        assert_eq!(r.lateness.count, 24);
        assert_eq!(r.early, 0, "lateness from the database is never negative");
        assert!(r.lateness.min_ms >= 0.0);
        assert!(r.ttl_ms > 3000.0 && r.ttl_ms < 5000.0, "{r:?}");
        assert!(r.reservations.n_tup_upd >= 0 && r.rows_read_per_expiry >= 0.0);
    }
    let stage = |r: &expiry::Expiry, metric: &str| r.stages.iter().find(|s| s.metric == metric).map(|s| s.count).unwrap_or(0.0);
    assert!(stage(&after, "scheduler_publish_lateness_seconds") >= 24.0, "{:?}", after.stages);
    assert!(stage(&after, "expiry_lateness_seconds") >= 24.0, "{:?}", after.stages);
    assert!(stage(&before, "expiry_lateness_seconds") >= 24.0, "{:?}", before.stages);
    // The report puts both side by side with the document's claims.
    let mut results = Results { end_to_end: Some(ee), ..Default::default() };
    results.expiry.insert("after".into(), after);
    results.expiry.insert("before".into(), before);
    let merged = Report::merge(vec![Report { results, ..Default::default() }]);
    assert!(merged.figures.iter().any(|f| f.what.contains("(after)") && f.document == "±100 ms"));
    assert!(merged.figures.iter().any(|f| f.what.contains("(before)") && f.document.contains("10 s")));
    assert!(merged.figures.iter().any(|f| f.document.contains("80 %")));
    let json = serde_json::to_string(&merged).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.figures, merged.figures);

    stop(w).await;
    api.stop().await;
}

#[test]
fn pgbench_summaries_parse_and_the_report_puts_our_rates_beside_the_limits() {
    use bench::limits::{parse, Limit, Limits};
    let out = "transaction type: insert.sql\nnumber of clients: 64\nlatency average = 21.458 ms\ninitial connection time = 40.1 ms\ntps = 1491.298058 (without initial connection time)\n";
    assert_eq!(parse(out), Some((1491.298058, 21.458)));
    assert_eq!(parse("no summary"), None);
    let limits = Limits {
        config: None,
        runs: vec![
            Limit { kind: "insert".into(), clients: 64, tps: 2000.0, latency_avg_ms: 30.0 },
            Limit { kind: "read".into(), clients: 64, tps: 9000.0, latency_avg_ms: 7.0 },
        ],
    };
    let fight = bench::seat_fight::SeatFight { fighters: 500, all_decided_ms: 500.0, ..Default::default() };
    let results = Results { limits: Some(limits), seat_fight: Some(fight), ..Default::default() };
    let report = Report { results, ..Default::default() }.finish();
    let r = report.ratios.iter().find(|r| r.what.contains("500 holds on one seat")).expect("the seat fight beside its limit");
    // 500 one-row commits at 2,000/s take 250 ms: half the speed of the database alone.
    assert_eq!(r.ratio, 0.5);
    let md = markdown(&report);
    assert!(md.contains("Against the machine's own limits") && md.contains("one-row insert-and-commit"), "{md}");
}

#[test]
fn percentiles_and_sse_parsing() {
    use bench::sse::parse_events;
    use bench::stats::{percentile, Summary};
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 50.0), 50.0);
    assert_eq!(percentile(&v, 99.0), 99.0);
    assert_eq!(percentile(&v, 100.0), 100.0);
    let s = Summary::from_ms((1..=5000).rev().map(f64::from).collect());
    assert_eq!((s.count, s.min_ms, s.max_ms, s.p50_ms), (5000, 1.0, 5000.0, 2500.0));
    assert_eq!(s.samples_ms.len(), bench::stats::KEPT_SAMPLES);
    let text = "x_seconds_bucket{path=\"a\",le=\"0.1\"} 1\nx_seconds_bucket{path=\"a\",le=\"1\"} 3\nx_seconds_bucket{path=\"a\",le=\"+Inf\"} 4\n\
                x_seconds_bucket{path=\"b\",le=\"0.1\"} 1\nx_seconds_bucket{path=\"b\",le=\"1\"} 1\nx_seconds_bucket{path=\"b\",le=\"+Inf\"} 1\n\
                x_seconds_sum{path=\"a\"} 5.5\nx_seconds_sum{path=\"b\"} 0.5\nx_seconds_count{path=\"a\"} 4\nx_seconds_count{path=\"b\"} 1\n";
    let h = bench::client::Histogram::parse(text, "x_seconds").unwrap();
    assert_eq!((h.count, h.sum), (5.0, 6.0));
    assert_eq!(h.buckets, vec![(0.1, 2.0), (1.0, 4.0), (f64::INFINITY, 5.0)]);
    assert_eq!(h.quantile_bound(0.5), Some(1.0));
    assert_eq!(h.since(&h).count, 0.0);
    let mut buf = String::from(": keep-alive\n\nid: 7\nevent: PAYMENT_CONFIRMED\ndata: {\"type\":\"PAYMENT_CONFIRMED\"}\n\nid: 8\r\ndata: {\"a\":");
    let events = parse_events(&mut buf);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id.as_deref(), Some("7"));
    assert_eq!(events[0].json()["type"], "PAYMENT_CONFIRMED");
    buf.push_str("1}\n\n");
    let events = parse_events(&mut buf);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].json()["a"], 1);
    assert!(buf.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_drain_stores_and_delivers_each_request_once_at_a_small_size() {
    let env = TestEnv::new().await;
    // No api: the scenario talks to Kafka and PostgreSQL only.
    let ctx = Ctx::new(Api::new("http://127.0.0.1:9", ADMIN).unwrap(), env.pool.clone(), false);
    let settings = WorkerSettings {
        sink: Sink::File(std::env::temp_dir().join(format!("bench-drain-export-{}.jsonl", env.prefix))),
        delivery_batch: 100,
        ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(3600), full: Duration::from_secs(3600) },
        ..common::inproc::worker_settings(&env)
    };
    let cfg = notify_drain::Config {
        notifications: 600,
        users: 50,
        kafka_brokers: env.res.brokers.clone(),
        topic_prefix: format!("{}drain.", env.prefix),
        replication_factor: 1,
        timeout_s: 60.0,
    };
    let worker = notify_drain::Worker::InProcess { res: env.res.clone(), settings };
    let d = notify_drain::run(&ctx, &cfg, worker, None).await.unwrap();
    assert_eq!(d.produced.count, 600);
    assert!(d.drained, "{d:?}");
    assert_eq!(d.stored, 600, "each request stored once");
    assert_eq!(d.duplicates, 0);
    assert_eq!(d.delivered, 600, "each stored notification DELIVERED");
    assert!(d.all_stored_after_start_s.is_some() && d.all_delivered_after_start_s.is_some());
    assert!(d.all_stored_after_start_s <= d.all_delivered_after_start_s);
    assert!(d.peak_stored_second >= 1 && d.peak_stored_second <= 600);
    let (rows, distinct_users): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT user_id) FROM notifications WHERE data->>'benchRun' = $1")
        .bind(&ctx.run_id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!((rows, distinct_users), (600, 50));

    // The report shows it beside the document's 10,000+/s.
    let results = Results { notify_drain: Some(d), ..Default::default() };
    let md = markdown(&Report { results, ..Default::default() }.finish());
    assert!(md.contains("the worker alone") && md.contains("10,000+ per second"), "{md}");
}
