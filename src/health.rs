//! `/health`: asks each dependency a real question (a query, a PING, a metadata request) with a
//! short timeout and answers 503 naming the one that failed.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};
use serde_json::json;
use sqlx::PgPool;
use warp::http::StatusCode;
use warp::Reply;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The dependencies a process checks; each is optional because not every daemon uses all three.
#[derive(Clone, Default)]
pub struct Health {
    pub postgres: Option<PgPool>,
    pub redis: Option<crate::redis_conn::RedisConn>,
    pub kafka: Option<FutureProducer>,
}

/// One dependency's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok,
    Failed(String),
}

impl Health {
    /// Runs every check concurrently.
    pub async fn check(&self) -> Vec<(&'static str, Check)> {
        let pg = async {
            match &self.postgres {
                None => None,
                Some(pool) => Some(
                    match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool))
                        .await
                    {
                        Ok(Ok(_)) => Check::Ok,
                        Ok(Err(e)) => Check::Failed(e.to_string()),
                        Err(_) => Check::Failed("timed out".into()),
                    },
                ),
            }
        };
        let rd = async {
            match &self.redis {
                None => None,
                Some(conn) => {
                    let mut conn = conn.clone();
                    let cmd = redis::cmd("PING");
                    let ping = cmd.query_async::<String>(&mut conn);
                    Some(match tokio::time::timeout(CHECK_TIMEOUT, ping).await {
                        Ok(Ok(_)) => Check::Ok,
                        Ok(Err(e)) => Check::Failed(e.to_string()),
                        Err(_) => Check::Failed("timed out".into()),
                    })
                }
            }
        };
        let kf = async {
            match &self.kafka {
                None => None,
                Some(p) => {
                    let client = p.clone();
                    // fetch_metadata blocks, so it runs off the async threads.
                    let r = tokio::task::spawn_blocking(move || {
                        client.client().fetch_metadata(None, CHECK_TIMEOUT).map(|m| m.brokers().len())
                    })
                    .await;
                    Some(match r {
                        Ok(Ok(n)) if n > 0 => Check::Ok,
                        Ok(Ok(_)) => Check::Failed("no broker".into()),
                        Ok(Err(e)) => Check::Failed(e.to_string()),
                        Err(e) => Check::Failed(e.to_string()),
                    })
                }
            }
        };
        let (pg, rd, kf) = tokio::join!(pg, rd, kf);
        let mut out = Vec::new();
        if let Some(c) = pg {
            out.push(("postgres", c));
        }
        if let Some(c) = rd {
            out.push(("redis", c));
        }
        if let Some(c) = kf {
            out.push(("kafka", c));
        }
        out
    }

    /// `200 {"status":"ok",…}` or `503 {"status":"unavailable",…}` with each dependency's state.
    pub async fn reply(&self) -> warp::reply::Response {
        let checks = self.check().await;
        let ok = checks.iter().all(|(_, c)| *c == Check::Ok);
        let mut deps = serde_json::Map::new();
        for (name, c) in &checks {
            let v = match c {
                Check::Ok => json!({"status": "ok"}),
                Check::Failed(e) => {
                    tracing::warn!(dependency = name, error = %e, "health check failed");
                    json!({"status": "down"})
                }
            };
            metrics::gauge!("dependency_up", "dependency" => *name)
                .set(if *c == Check::Ok { 1.0 } else { 0.0 });
            deps.insert(name.to_string(), v);
        }
        let body = json!({"status": if ok { "ok" } else { "unavailable" }, "dependencies": deps});
        let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    }
}
