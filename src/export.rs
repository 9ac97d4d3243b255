//! Data-platform export: each `payment.completed` is handed once to a sink (brief §5).
//!
//! Once-ness comes from `processed_events` (consumer `export`, keyed by the payment's event id):
//! the row is inserted in a transaction that commits only after the sink accepted the record, so
//! a replay finds it and skips. The one window left is a crash between the sink's acceptance and
//! the commit; each record carries its `paymentId` so the platform can drop such a repeat.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Where exports go.
#[derive(Clone, Debug)]
pub enum Sink {
    /// Appends one JSON line per payment to a file (local use).
    File(PathBuf),
    /// POSTs each payment as JSON; non-2xx answers are retried by the consumer.
    Http { url: String, client: reqwest::Client },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("file sink: {0}")]
    Io(#[from] std::io::Error),
    #[error("http sink: {0}")]
    Http(String),
}

impl Sink {
    /// Parses `file:PATH` or an `http://`/`https://` URL.
    pub fn parse(spec: &str) -> Result<Self, String> {
        if let Some(path) = spec.strip_prefix("file:") {
            Ok(Sink::File(PathBuf::from(path)))
        } else if spec.starts_with("http://") || spec.starts_with("https://") {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
            Ok(Sink::Http { url: spec.to_string(), client })
        } else {
            Err(format!("unknown sink {spec:?}: use file:PATH or an http(s) URL"))
        }
    }

    /// Hands one record to the sink (durably for the file: written and synced).
    pub async fn send(&self, record: &Value) -> Result<(), SinkError> {
        match self {
            Sink::File(path) => {
                let mut line = serde_json::to_vec(record).expect("json values serialize");
                line.push(b'\n');
                let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
                f.write_all(&line).await?;
                f.sync_data().await?;
                Ok(())
            }
            Sink::Http { url, client } => {
                let resp = client.post(url).json(record).send().await.map_err(|e| SinkError::Http(e.to_string()))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(SinkError::Http(format!("status {}", resp.status())))
                }
            }
        }
    }
}
