//! Data-platform export: each `payment.completed` is handed once to a sink (brief §5), and each
//! `payment.refunded` once more, as its own line (`"eventType":"payment.refunded"`).
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
    /// POSTs each payment as JSON. A 4xx answer (except 408 and 429) means the sink refuses this
    /// record for good: the consumer dead-letters it. 5xx, 408, 429 and transport errors are
    /// retried.
    Http { url: String, client: reqwest::Client },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("file sink: {0}")]
    Io(#[from] std::io::Error),
    #[error("http sink: {0}")]
    Http(String),
    /// The sink answered that this record will never be accepted.
    #[error("http sink refused the record: {0}")]
    Refused(String),
}

impl SinkError {
    /// Whether sending the same record again can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Refused(_))
    }
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

    /// Hands records to the sink in order, stopping at the first failure: how many were accepted,
    /// and the failure. The file takes them all in one write and one sync (a consumer's batch
    /// pays one `fsync`, not one per payment); the HTTP sink still gets one POST per record.
    pub async fn send_all(&self, records: &[&Value]) -> (usize, Option<SinkError>) {
        match self {
            Sink::File(path) => {
                let mut lines = Vec::new();
                for r in records {
                    serde_json::to_writer(&mut lines, r).expect("json values serialize");
                    lines.push(b'\n');
                }
                match append_synced(path, &lines).await {
                    Ok(()) => (records.len(), None),
                    Err(e) => (0, Some(e.into())),
                }
            }
            Sink::Http { .. } => {
                for (i, r) in records.iter().enumerate() {
                    if let Err(e) = self.send(r).await {
                        return (i, Some(e));
                    }
                }
                (records.len(), None)
            }
        }
    }

    /// Hands one record to the sink (durably for the file: written and synced).
    pub async fn send(&self, record: &Value) -> Result<(), SinkError> {
        match self {
            Sink::File(path) => {
                let mut line = serde_json::to_vec(record).expect("json values serialize");
                line.push(b'\n');
                Ok(append_synced(path, &line).await?)
            }
            Sink::Http { url, client } => {
                let resp = client.post(url).json(record).send().await.map_err(|e| SinkError::Http(e.to_string()))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let body = resp.text().await.unwrap_or_default();
                let said = format!("status {status}: {}", body.chars().take(200).collect::<String>());
                let retry_later = status == reqwest::StatusCode::REQUEST_TIMEOUT || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                if status.is_client_error() && !retry_later {
                    Err(SinkError::Refused(said))
                } else {
                    Err(SinkError::Http(said))
                }
            }
        }
    }
}

/// Appends `bytes` to the file at `path` (created if missing) and waits until they are on disk.
async fn append_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    f.write_all(bytes).await?;
    f.sync_data().await
}
