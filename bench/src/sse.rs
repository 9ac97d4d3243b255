//! A minimal Server-Sent Events reader for `GET /v1/users/me/notifications/stream`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Api, User};

/// One event as received.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An event with the stream it came from and when it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub stream: usize,
    pub event: Event,
    pub at: Instant,
    pub at_utc: DateTime<Utc>,
}

/// Splits complete events off the front of `buf` (events end with a blank line).
pub fn parse_events(buf: &mut String) -> Vec<Event> {
    if buf.contains('\r') {
        *buf = buf.replace("\r\n", "\n").replace('\r', "\n");
    }
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let (mut id, mut event, mut data) = (None, None, Vec::new());
        for line in block.lines() {
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_string()),
                "event" => event = Some(value.to_string()),
                "data" => data.push(value.to_string()),
                _ => {}
            }
        }
        if !data.is_empty() || event.is_some() {
            out.push(Event { id, event, data: data.join("\n") });
        }
    }
    out
}

/// Opens the user's stream; returns once the server answered (from then on it is subscribed).
pub async fn open(api: &Api, user: &User) -> Result<reqwest::Response> {
    let resp = api
        .http
        .get(api.url("/v1/users/me/notifications/stream"))
        .bearer_auth(&user.token)
        .header("Accept", "text/event-stream")
        // Overrides the client's request timeout: a stream stays open for the whole scenario.
        .timeout(Duration::from_secs(24 * 3600))
        .send()
        .await?;
    if resp.status() != 200 {
        bail!("notification stream: {}", resp.status());
    }
    Ok(resp)
}

/// Reads events from an open stream into `tx` until the stream ends or `stop`.
pub async fn pump(stream: usize, mut resp: reqwest::Response, tx: mpsc::UnboundedSender<Arrival>, stop: CancellationToken) {
    let mut buf = String::new();
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return,
            c = resp.chunk() => c,
        };
        match chunk {
            Ok(Some(bytes)) => {
                buf.push_str(&String::from_utf8_lossy(&bytes));
                let (at, at_utc) = (Instant::now(), Utc::now());
                for event in parse_events(&mut buf) {
                    if tx.send(Arrival { stream, event, at, at_utc }).is_err() {
                        return;
                    }
                }
            }
            _ => return,
        }
    }
}
