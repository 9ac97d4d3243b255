//! Consumers sort their failures (issue 15 item 9): data PostgreSQL refuses and a record the
//! export sink answers 4xx to go to the dead-letter topic with the reason, and the consumer goes
//! on with the next message; a 5xx is retried until the sink takes the record.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use booking::app::{self, WorkerSettings};
use booking::export::Sink;
use booking::kafka::{Envelope, EventType, HandleError};
use booking::notification::NotificationRequest;
use booking::payment::PaymentCompleted;
use common::TestEnv;
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::Filter;

async fn worker(env: &TestEnv, sink: Sink) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let t = CancellationToken::new();
    let settings = WorkerSettings {
        sink,
        ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(3600), full: Duration::from_secs(3600) },
        ..common::inproc::worker_settings(env)
    };
    let (res, gp, sd) = (env.res.clone(), format!("{}worker-", env.prefix), t.clone());
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = tokio::spawn(async move {
        app::run_worker(res, settings, &gp, ops, booking::telemetry::install_metrics(), sd).await.unwrap();
    });
    (t, h)
}

async fn produce<T: serde::Serialize + serde::de::DeserializeOwned>(env: &TestEnv, topic: &str, key: &str, env_: &Envelope<T>) {
    let body = serde_json::to_string(env_).unwrap();
    env.res.producer.send(FutureRecord::to(topic).key(key).payload(&body).partition(0), Duration::from_secs(5)).await.unwrap();
}

fn dlq_reason(headers: &[(String, String)]) -> String {
    headers.iter().find(|(k, _)| k == "dlq-reason").map(|(_, v)| v.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_postgresql_refuses_is_dead_lettered_and_the_next_one_is_stored() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let user = Uuid::new_v4();
    let note = |title: &str| Envelope::new(EventType::NotificationRequest, NotificationRequest {
        user_id: user,
        kind: "PAYMENT_CONFIRMED".into(),
        title: title.into(),
        message: "m".into(),
        data: json!({}),
    });
    // A NUL character is valid JSON but PostgreSQL's text refuses it (SQLSTATE 22021): no retry
    // can ever store it.
    let poison = note("nul \u{0} inside");
    let good = note("fine");
    produce(&env, &topic, &user.to_string(), &poison).await;
    produce(&env, &topic, &user.to_string(), &good).await;

    let w = worker(&env, Sink::File(std::env::temp_dir().join(format!("export-{}.jsonl", env.prefix)))).await;
    common::eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE event_id = $1").bind(good.event_id).fetch_one(&env.pool).await.unwrap();
        n == 1
    })
    .await;
    let dlq = env.read_topic(&format!("{topic}.dlq"), 1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1, "the refused notification is dead-lettered");
    assert_eq!(dlq[0].1["eventId"], poison.event_id.to_string());
    let reason = dlq_reason(&dlq[0].2);
    assert!(reason.contains("database refused the data"), "the reason says why: {reason}");
    w.0.cancel();
    let _ = w.1.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_the_sink_answers_400_is_dead_lettered_and_a_503_is_retried_until_accepted() {
    let env = TestEnv::new().await;
    // The sink: 400 for amount 400, 503 the first time it sees amount 503, 200 otherwise.
    let seen: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<i64>>> = Arc::default();
    let (s, a) = (seen.clone(), accepted.clone());
    let route = warp::post().and(warp::body::json()).map(move |v: Value| {
        let amount = v["amount"].as_i64().unwrap_or_default();
        let n = {
            let mut seen = s.lock().unwrap();
            let n = seen.entry(amount).or_default();
            *n += 1;
            *n
        };
        let status = match (amount, n) {
            (400, _) => 400,
            (503, 1) => 503,
            _ => {
                a.lock().unwrap().push(amount);
                200
            }
        };
        warp::reply::with_status("", warp::http::StatusCode::from_u16(status).unwrap())
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/export", listener.local_addr().unwrap());
    let server = tokio::spawn(warp::serve(route).incoming(listener).run());

    let topic = env.topics().payment_completed.clone();
    let payment = |amount: i64| Envelope::new(EventType::PaymentCompleted, PaymentCompleted {
        payment_id: Uuid::new_v4(),
        reservation_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        schedule_id: Uuid::new_v4(),
        seat_id: Uuid::new_v4(),
        amount,
        paid_at: chrono::Utc::now(),
    });
    let refused = payment(400);
    let sent = [payment(100), refused.clone(), payment(503), payment(200)];
    for p in &sent {
        produce(&env, &topic, "k", p).await;
    }
    let w = worker(&env, Sink::parse(&url).unwrap()).await;
    common::eventually(Duration::from_secs(30), || async { accepted.lock().unwrap().len() == 3 }).await;
    assert_eq!(*accepted.lock().unwrap(), vec![100, 503, 200], "the records after the refused one are exported, in order");
    assert_eq!(seen.lock().unwrap()[&503], 2, "the 503 was retried");
    assert_eq!(seen.lock().unwrap()[&400], 1, "the 400 was not retried");

    let dlq = env.read_topic(&format!("{topic}.dlq"), 1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].1["eventId"], refused.event_id.to_string());
    assert!(dlq_reason(&dlq[0].2).contains("400"), "the reason names the answer: {:?}", dlq[0].2);
    // The four arrive in one batch: what the sink did not accept left no "exported" mark behind,
    // so replaying the dead letter exports it then.
    let marked: Vec<i64> = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM processed_events p WHERE p.consumer = 'export' AND p.event_id = id) FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n) ORDER BY n",
    )
    .bind(vec![sent[0].payload.payment_id, refused.payload.payment_id, sent[2].payload.payment_id, sent[3].payload.payment_id])
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(marked, vec![1, 0, 1, 1], "one mark per exported payment, none for the refused one");
    w.0.cancel();
    let _ = w.1.await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_and_data_errors_are_poison_and_connection_errors_are_transient() {
    let env = TestEnv::new().await;
    let dup = sqlx::query("SELECT 1/0").execute(&env.pool).await.unwrap_err();
    assert!(matches!(HandleError::from(dup), HandleError::Poison(_)), "22012 division by zero is a data error");
    let user = Uuid::new_v4();
    let fk = sqlx::query("INSERT INTO point_ledger (user_id, kind, amount, balance_after) VALUES ($1, 'CHARGE', 1, 1)")
        .bind(user)
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(matches!(HandleError::from(fk), HandleError::Poison(_)), "23503 foreign key violation is poison");
    let closed = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let down = sqlx::query("SELECT 1").execute(&closed).await.unwrap_err();
    assert!(matches!(HandleError::from(down), HandleError::Transient(_)), "no server is transient");
}
