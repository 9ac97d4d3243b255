//! `/health`: asks each dependency a real question (a query, a PING, a metadata request) with a
//! short timeout and answers 503 naming the one that failed.
//!
//! A burst of probes (a load balancer, hundreds of clients opening connections at once) is
//! answered from one check: [`Health::check`] lets one caller ask the dependencies while the
//! others wait for its answer, which is then reused for [`FRESH_FOR`]. The Kafka question is the
//! metadata of one of our own topics, not of the whole cluster: a broker with many topics made
//! every probe a large request for the broker to answer and for the process to parse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer};
use serde_json::json;
use sqlx::PgPool;
use warp::http::StatusCode;
use warp::Reply;

use crate::kafka::Topics;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one check answers later probes. Short beside any probe interval a load balancer
/// uses, and beside how fast an outage must show (tests poll `/health` with a deadline).
pub const FRESH_FOR: Duration = Duration::from_secs(1);

type Checks = Vec<(&'static str, Check)>;

/// The dependencies a process checks; each is optional because not every daemon uses all three.
#[derive(Clone)]
pub struct Health {
    postgres: Option<PgPool>,
    redis: Option<crate::redis_conn::RedisConn>,
    /// The producer, and the topic whose metadata it asks for.
    kafka: Option<(FutureProducer, String)>,
    /// The last check and when it finished; the lock is held while a check runs, so concurrent
    /// callers wait for it instead of asking again.
    recent: Arc<tokio::sync::Mutex<Option<(Instant, Checks)>>>,
}

/// One dependency's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok,
    Failed(String),
}

impl Health {
    /// Checks these dependencies; Kafka is asked, through `producer`, for the metadata of one of
    /// the product's topics (`reservation.created`, which every process's topics include).
    pub fn new(postgres: Option<PgPool>, redis: Option<crate::redis_conn::RedisConn>, kafka: Option<(FutureProducer, &Topics)>) -> Self {
        let kafka = kafka.map(|(producer, topics)| (producer, topics.reservation_created.clone()));
        Self { postgres, redis, kafka, recent: Arc::default() }
    }

    /// The dependencies' state, asked at most once per [`FRESH_FOR`] however many call at once.
    pub async fn check(&self) -> Checks {
        let mut recent = self.recent.lock().await;
        if let Some((at, checks)) = recent.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return checks.clone();
            }
        }
        let checks = self.check_now().await;
        *recent = Some((Instant::now(), checks.clone()));
        checks
    }

    /// Asks every dependency now, concurrently (an operator's `bookingctl status`, which must
    /// not be answered from an earlier look).
    pub async fn check_now(&self) -> Checks {
        metrics::counter!("health_checks_total").increment(1);
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
                Some((p, topic)) => {
                    let (client, topic) = (p.clone(), topic.clone());
                    // fetch_metadata blocks, so it runs off the async threads. One topic: the
                    // answer still lists the brokers, and stays small however many topics the
                    // cluster holds (the producer never asks the broker to create it).
                    let r = tokio::task::spawn_blocking(move || {
                        client.client().fetch_metadata(Some(&topic), CHECK_TIMEOUT).map(|m| m.brokers().len())
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
