//! Hostile input (issue: faults and abuse): every attempt gets a clean 4xx or is stored
//! harmlessly, never a 5xx, and nothing is half-written.

mod common;

use std::time::Duration;

use common::{QueueSettings, TestEnv, ADMIN};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_and_strings_are_refused_or_stored_verbatim() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let h = &api.http;
    // Deeply nested JSON stops at the parser's depth limit: 400, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = h.post(api.url("/v1/users")).body(deep[..60_000].to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let nested = format!("{{\"name\": {}1{}}}", "[".repeat(1000), "]".repeat(1000));
    let r = h.post(api.url("/v1/users")).body(nested).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Non-UTF-8, and a body far over the limit without a Content-Length (chunked).
    let r = h.post(api.url("/v1/users")).body(vec![b'{', 0xc3, 0x28, b'}']).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(chunked_post(&api.base, "/v1/users", 100, 1024).await, 413);
    // SQL and script fragments are data: stored and returned verbatim, JSON-escaped.
    let evil = "Robert'); DROP TABLE users;-- <script>alert(1)</script>";
    let r = h.post(api.url("/v1/users")).json(&json!({"name": evil})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-type"], "application/json");
    let r = h.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN)
        .json(&json!({"title": evil, "schedules": [{"startsAt": "2030-01-01T00:00:00Z", "bookingOpensAt": "2029-01-01T00:00:00Z", "price": 1}]})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let concerts: Value = h.get(api.url("/v1/concerts")).send().await.unwrap().json().await.unwrap();
    assert_eq!(concerts["items"][0]["title"], evil);
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&env.pool).await.unwrap();
    assert_eq!(users, 1, "the users table is intact");
    // Huge and negative numbers.
    for (price, seats) in [(json!(-1), json!(5)), (json!(1e30), json!(5)), (json!(5), json!(-3)), (json!(5), json!(10_000_000_000i64)), (json!(5), json!(0))] {
        let r = h.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN)
            .json(&json!({"title": "x", "schedules": [{"startsAt": "2030-01-01T00:00:00Z", "bookingOpensAt": "2029-01-01T00:00:00Z", "price": price, "seatCount": seats}]})).send().await.unwrap();
        assert_eq!(r.status(), 400, "price {price} seats {seats}");
    }
    // A NUL byte is valid JSON but PostgreSQL text cannot hold it; it and the other control
    // characters are refused by name before anything is written (schemathesis found the 500).
    for bad in ["\u{84}C\u{ef}\u{0}\u{c1}", "line\nbreak", "tab\there"] {
        let r = h.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN)
            .json(&json!({"title": bad, "schedules": [{"startsAt": "2030-01-01T00:00:00Z", "bookingOpensAt": "2029-01-01T00:00:00Z", "price": 1}]})).send().await.unwrap();
        assert_eq!(r.status(), 400, "title {bad:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!((body["error"]["code"].as_str(), body["error"]["field"].as_str()), (Some("INVALID_INPUT"), Some("title")), "{body}");
        let r = h.post(api.url("/v1/users")).json(&json!({"name": bad})).send().await.unwrap();
        assert_eq!(r.status(), 400, "name {bad:?}");
    }
    let concerts: i64 = sqlx::query_scalar("SELECT count(*) FROM concerts").fetch_one(&env.pool).await.unwrap();
    assert_eq!(concerts, 1, "no refused concert was half-written");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_keys_forged_headers_and_a_queue_flood_change_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let h = &api.http;
    let u = api.user("mallory").await;
    let charge = |key: &str, amount: i64| h.post(api.url("/v1/users/me/points/charges")).bearer_auth(&u.token).header("Idempotency-Key", key).json(&json!({"amount": amount})).send();
    assert_eq!(charge("k1", 100).await.unwrap().status(), 200);
    let r = charge("k1", 100_000).await.unwrap();
    assert_eq!(r.status(), 422, "a replayed key with another body");
    assert_eq!(api.balance(&u).await, 100);
    // Header values that are not visible ASCII are refused.
    for bad in ["key with spaces", "ключ", &"k".repeat(300)] {
        let r = h.post(api.url("/v1/users/me/points/charges")).bearer_auth(&u.token).header("Idempotency-Key", bad).json(&json!({"amount": 1})).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
    }
    let r = h.get(api.url("/v1/users/me/points")).header("Authorization", "Bearer x\u{7f}y").send().await;
    if let Ok(r) = r {
        assert!(r.status().is_client_error());
    }
    let r = h.get(api.url("/v1/users/me/points")).header("Authorization", "Basic dXNlcjpwYXNz").send().await.unwrap();
    assert_eq!(r.status(), 401);
    // One user flooding the queue keeps one place.
    let (schedule, _) = api.concert(1, 10).await;
    let first = api.enter_queue(&u, &schedule).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (http, url, token, s) = (h.clone(), api.url("/v1/queue/tokens"), u.token.clone(), schedule.clone());
        tasks.push(tokio::spawn(async move { http.post(url).bearer_auth(token).json(&json!({"scheduleId": s})).send().await.unwrap().json::<Value>().await.unwrap() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap()["queueToken"], first["queueToken"]);
    }
    let mut conn = env.res.redis.clone();
    let uuid = uuid::Uuid::parse_str(&schedule).unwrap();
    let entries: i64 = redis::cmd("ZCARD").arg(env.keys().queue_waiting(uuid)).query_async::<i64>(&mut conn).await.unwrap()
        + redis::cmd("ZCARD").arg(env.keys().queue_active(uuid)).query_async::<i64>(&mut conn).await.unwrap();
    assert_eq!(entries, 1);
    // The admission tick writes the entrant's QUEUE_POSITION: once nothing is left pending,
    // exactly one was written.
    let pending = env.keys().queue_pending_notifications(uuid);
    let drained = || async {
        let mut conn = env.res.redis.clone();
        redis::cmd("LLEN").arg(&pending).query_async::<i64>(&mut conn).await.unwrap() == 0
    };
    common::eventually(Duration::from_secs(10), drained).await;
    let positions = env.written_events(&env.topics().notification_request, |e| e["payload"]["type"] == "QUEUE_POSITION").await;
    assert_eq!(positions, 1, "one QUEUE_POSITION notification, not 201");
    api.stop().await;
}

/// Sends a chunked body (no Content-Length) of `chunks` × `size` bytes over a raw connection and
/// returns the status code.
async fn chunked_post(base: &str, path: &str, chunks: usize, size: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{size:x}\r\n{}\r\n", " ".repeat(size));
    for _ in 0..chunks {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break; // the server may answer and close before reading everything
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}
