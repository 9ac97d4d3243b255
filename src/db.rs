//! PostgreSQL pool and the embedded migrations (applied by every binary at start; sqlx takes an
//! advisory lock, so several processes starting together apply them once), and [`Tx`], the one
//! way the product opens a transaction.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgTransactionManager};
use sqlx::{Connection as _, Executor as _, Postgres, TransactionManager};

/// The migrations in `migrations/`, compiled into the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The SQL timestamp `expr` as JSON text in the RFC 3339 form chrono writes (UTC, `Z`, to the
/// microsecond), for an answer or an event whose time only the statement knows (`now()`, an
/// `expires_at` it computed).
pub fn rfc3339_sql(expr: &str) -> String {
    format!("to_jsonb(to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))")
}

/// Connects a pool of at most `max` connections. Each connection carries the program's name as
/// `application_name` (unless the URL sets one), so `pg_stat_activity` and the server's logs say
/// which process a session belongs to: what an operator looks at first when the database is
/// busy, and how the benchmark splits PostgreSQL's CPU among its clients.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    connect_warmed(url, max, &[]).await
}

/// A statement a new connection runs once before its first use (see [`connect_warmed`]).
pub type Warm = for<'c> fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>;

/// Like [`connect`], and every connection the pool opens first runs each of `warm` once, inside
/// a transaction it rolls back.
///
/// Why: the first run of a statement on a connection costs far more than the next ones: sqlx's
/// describe round trip, PostgreSQL's parsing and analysis, and its catalog lookups for every
/// table and index the statement touches. Measured on a fresh connection (issue 11, fourteenth
/// pass): the payment's statement 3.9 to 4.7 ms the first time, 0.3 to 0.7 ms after; the hold's
/// call 0.7 to 1.0 ms, then 0.2 ms. At the start of a sale every connection of the pool is cold
/// at once, and that extra database time lands on the first wave of requests. Warmed when
/// opened, a connection has paid for it before it serves.
///
/// The schema must be migrated before the pool opens its first connection (as
/// [`crate::app::Resources::connect_warmed`] does). A warm-up that fails anyway is logged as a
/// warning (every connection of the pool would stay cold) and the connection is used: it is only
/// colder. One whose rollback fails is discarded.
pub async fn connect_warmed(url: &str, max: u32, warm: &'static [Warm]) -> Result<PgPool, sqlx::Error> {
    let mut options: PgConnectOptions = url.parse()?;
    if options.get_application_name().is_none() {
        if let Some(name) = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())) {
            options = options.application_name(&name);
        }
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        // sqlx pings every idle connection it hands out by default: one more round trip per
        // borrow, and under a spike round trips are what the database's CPU goes on (a hold or
        // a payment borrows once; sqlx also pings each connection it takes back, which no
        // option turns off). A connection that was in use a moment ago is alive, so only one
        // that sat idle for a while is checked; one that broke since then fails its statement,
        // that request gets a 503 like any other during an outage, and sqlx's ping on return
        // discards the connection.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for w in warm {
                    conn.execute("BEGIN").await?;
                    if let Err(e) = w(conn).await {
                        tracing::warn!(error = %e, "warming a new connection failed; it serves cold");
                    }
                    conn.execute("ROLLBACK").await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
}

/// How long a pooled connection may sit idle before it is checked before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A transaction on a pooled connection that may be abandoned at any `.await` and may fail in
/// its first statement without harming whoever uses the connection next. Open it with [`begin`]
/// or [`begin_with`], never with sqlx's `Pool::begin` (clippy.toml forbids it).
///
/// Why not sqlx's `Transaction`: in sqlx 0.8 (and 0.9) a transaction counts as open only once
/// its `BEGIN` was answered. So
/// - a `begin` abandoned while it waits (an HTTP client hanging up during a hold's seat-limit
///   lock wait, a timeout around a call) returns the connection to the pool with the `BEGIN`
///   executed and nothing to end it: the session sits in a transaction holding whatever lock
///   it waited for, and the next borrower's statements run, uncommitted, inside it;
/// - a `begin_with` whose statement fails (a lock timeout, a cancelled query) returns it inside
///   the aborted transaction, where every later statement fails with "current transaction is
///   aborted" for the rest of the connection's life.
///
/// `tests/plumbing.rs` shows both. Here, until the opening round trip has been answered without
/// error the connection is closed, never returned, when the `Tx` goes away: the server ends the
/// session, and with it the transaction and its locks. After that, dropping an uncommitted `Tx`
/// rolls back, as sqlx's does.
pub struct Tx {
    conn: Option<PoolConnection<Postgres>>,
    state: TxState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TxState {
    /// The opening round trip has not been answered, or failed.
    Opening,
    Open,
    /// Committed or rolled back.
    Ended,
}

/// Opens a transaction (`BEGIN`).
pub async fn begin(pool: &PgPool) -> Result<Tx, sqlx::Error> {
    Tx::open(pool, None).await
}

/// Opens a transaction with `statement`, a `BEGIN` followed by what must run first (a lock), in
/// one round trip.
pub async fn begin_with(pool: &PgPool, statement: impl Into<Cow<'static, str>>) -> Result<Tx, sqlx::Error> {
    Tx::open(pool, Some(statement.into())).await
}

/// Opens a transaction with `statement`, as [`begin_with`] does, on a connection already borrowed
/// (a read before the transaction on the same connection saves the pool a return and a borrow).
pub async fn begin_on(conn: PoolConnection<Postgres>, statement: impl Into<Cow<'static, str>>) -> Result<Tx, sqlx::Error> {
    Tx::open_on(conn, Some(statement.into())).await
}

impl Tx {
    async fn open(pool: &PgPool, statement: Option<Cow<'static, str>>) -> Result<Tx, sqlx::Error> {
        Tx::open_on(pool.acquire().await?, statement).await
    }

    async fn open_on(conn: PoolConnection<Postgres>, statement: Option<Cow<'static, str>>) -> Result<Tx, sqlx::Error> {
        let mut tx = Tx { conn: Some(conn), state: TxState::Opening };
        PgTransactionManager::begin(&mut tx, statement).await?;
        tx.state = TxState::Open;
        Ok(tx)
    }

    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::commit(&mut self).await?;
        self.state = TxState::Ended;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::rollback(&mut self).await?;
        self.state = TxState::Ended;
        Ok(())
    }
}

impl Deref for Tx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a Tx holds its connection until dropped")
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a Tx holds its connection until dropped")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        match self.state {
            // Whether the server ran the BEGIN, and what became of its first statement, is
            // unknown: nobody else may get this session.
            TxState::Opening => conn.close_on_drop(),
            // Queues the ROLLBACK; the pool sends it before handing the connection out again.
            TxState::Open => PgTransactionManager::start_rollback(&mut conn),
            TxState::Ended => {}
        }
    }
}
