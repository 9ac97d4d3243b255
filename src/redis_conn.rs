//! One Redis connection type for both topologies: a single Redis (a reconnecting
//! [`ConnectionManager`]) or a Redis Cluster (the redis crate's own `cluster_async` client, which
//! follows MOVED/ASK redirections and fails over to promoted replicas by itself).
//!
//! Every module of the product takes a [`RedisConn`] and runs the same commands and [`redis::Script`]s
//! on either topology: it implements [`ConnectionLike`]. On a cluster, a command or script is routed
//! by its first key, so every script's keys must share one hash slot: `keys.rs` says which keys
//! share a `{hash tag}` and proves it in a unit test.
//!
//! The URL chooses the topology: `redis://host:port` is one Redis; `redis+cluster://h1:p1,h2:p2,…`
//! (any number of seed nodes) is a cluster.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A Lua script whose SHA1 is computed once: `redis::Script::new` hashes the text on every call,
/// and the queue's entry script runs once per entrant.
pub struct Lua {
    text: &'static str,
    script: std::sync::OnceLock<redis::Script>,
}

impl Lua {
    pub const fn new(text: &'static str) -> Self {
        Self { text, script: std::sync::OnceLock::new() }
    }

    /// The script, to invoke (`EVALSHA`, then `EVAL` if Redis does not know it yet).
    pub fn script(&self) -> &redis::Script {
        self.script.get_or_init(|| redis::Script::new(self.text))
    }

    /// The text, for an `EVAL` queued in a pipeline.
    pub fn text(&self) -> &'static str {
        self.text
    }
}

/// The URL scheme that selects Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// A cheap-to-clone connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to the Redis or Redis Cluster named by `url` (see the module comment). Commands
    /// fail fast while Redis is unreachable (callers retry) instead of hanging.
    pub async fn connect(url: &str) -> RedisResult<Self> {
        if let Some(nodes) = url.strip_prefix(CLUSTER_SCHEME) {
            let seeds: Vec<String> = nodes.split(',').map(str::trim).filter(|n| !n.is_empty()).map(|n| format!("redis://{n}")).collect();
            let client = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(2))
                // A failover takes the cluster a few seconds (node timeout + election); retrying with
                // backoff across it lets a command land on the promoted replica.
                .retries(6)
                .build()?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(url)?;
            // How soon after Redis comes back the first command gets through is set by the
            // reconnect backoff, not by the timeouts. The crate's defaults (a 1-s first delay
            // multiplied by 100 each time, capped by its 60-s maximum) meant that an outage of
            // more than about a second left every command of the process hanging for up to a
            // minute after Redis was back: the delay scheduler published no expiry meanwhile.
            // Delays of 1 to 2 s (with jitter), five times, then the next command starts again.
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(2))
                .set_factor(2)
                .set_max_delay(1000)
                .set_number_of_retries(5);
            Ok(RedisConn::Single(ConnectionManager::new_with_config(client, cfg).await?))
        }
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, cmd: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
