//! Points: balance, idempotent charges, and the ledger. Every balance change writes a ledger row
//! with the balance after it, in the same transaction, so balance = charges − uses + refunds.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::idempotency::{self, Claim};

/// Largest single charge.
pub const MAX_CHARGE: i64 = 10_000_000;

/// Current balance.
pub async fn balance(pool: &PgPool, user: Uuid) -> Result<i64> {
    let b: Option<i64> = sqlx::query_scalar("SELECT balance FROM users WHERE id = $1")
        .bind(user)
        .fetch_optional(pool)
        .await?;
    b.ok_or(Error::Unauthorized)
}

/// A change of a balance, as the ledger names it.
#[derive(Debug, Clone, Copy)]
pub enum Movement {
    /// Points bought (credit).
    Charge,
    /// Points spent on a payment (debit; refused rather than going below zero).
    Use,
    /// Points given back by a refund (credit).
    Refund,
}

impl Movement {
    /// How the movement changes the balance, as SQL.
    fn sign(self) -> &'static str {
        match self {
            Movement::Use => "-",
            Movement::Charge | Movement::Refund => "+",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Movement::Charge => "CHARGE",
            Movement::Use => "USE",
            Movement::Refund => "REFUND",
        }
    }
}

/// Moves `amount` points of `user` and writes the ledger line with the balance after it, in one
/// statement inside the caller's transaction (one round trip: on the payment path they are what
/// a spike costs). Returns the new balance, or `None` for a `Use` the balance cannot cover
/// (nothing written then). A zero amount moves nothing and writes no line (the ledger's CHECK
/// wants a positive amount: a free seat).
pub async fn apply(tx: &mut sqlx::PgConnection, user: Uuid, movement: Movement, amount: i64) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(&format!("WITH {} SELECT balance FROM u", apply_sql(movement, "$1", "$2")))
        .bind(user)
        .bind(amount)
        .fetch_optional(&mut *tx)
        .await
}

/// The statement of [`apply`] as two data-modifying CTEs, `u` (the new balance, no row when a
/// `Use` is not covered) and `l` (the ledger line), for a statement that does more in the same
/// round trip (a payment). `user` and `amount` are its parameters (`$n`, a uuid and a bigint).
pub fn apply_sql(movement: Movement, user: &str, amount: &str) -> String {
    let sign = movement.sign();
    let kind = movement.kind();
    format!(
        "u AS (UPDATE users SET balance = balance {sign} {amount}::bigint
               WHERE id = {user} AND balance {sign} {amount}::bigint >= 0 RETURNING balance),
         l AS (INSERT INTO point_ledger (user_id, kind, amount, balance_after)
               SELECT {user}, '{kind}', {amount}::bigint, balance FROM u WHERE {amount}::bigint > 0)"
    )
}

/// [`apply_sql`] for many users in one statement: `from` names a relation with a `user_id` and
/// an `amount` column, at most one row per user (an UPDATE changes a row once per statement).
/// Defines `lu`, `u` (every column of `from` and the `balance` after, for each row the balance
/// covered) and `l`. The users' rows are locked in id order before any is changed (`lu`, read
/// once as an array), so two such statements, or one and a single payment, never wait on each
/// other in a cycle.
pub fn apply_each_sql(movement: Movement, from: &str) -> String {
    let sign = movement.sign();
    let kind = movement.kind();
    format!(
        "lu AS MATERIALIZED (SELECT users.id FROM users JOIN {from} f ON users.id = f.user_id ORDER BY users.id FOR UPDATE OF users),
         u AS (UPDATE users SET balance = users.balance {sign} f.amount::bigint FROM {from} f
               WHERE users.id = f.user_id AND users.balance {sign} f.amount::bigint >= 0 AND f.user_id = ANY(ARRAY(SELECT id FROM lu))
               RETURNING f.*, users.balance),
         l AS (INSERT INTO point_ledger (user_id, kind, amount, balance_after)
               SELECT u.user_id, '{kind}', u.amount::bigint, u.balance FROM u WHERE u.amount::bigint > 0)"
    )
}

/// Credits `amount` once per `key`; the same key replays the first answer.
pub async fn charge(pool: &PgPool, user: Uuid, key: &str, amount: i64) -> Result<(u16, Value)> {
    if !(1..=MAX_CHARGE).contains(&amount) {
        return Err(Error::invalid("amount", format!("must be between 1 and {MAX_CHARGE}")));
    }
    let fp = idempotency::fingerprint(&[b"charge", &amount.to_be_bytes()]);
    let mut tx = crate::db::begin(pool).await?;
    if let Claim::Replay { status, body } = idempotency::claim(&mut tx, user, "charge", key, &fp).await? {
        return Ok((status, body));
    }
    let balance = apply(&mut tx, user, Movement::Charge, amount).await?.expect("a credit always applies");
    let body = json!({ "balance": balance });
    idempotency::complete(&mut tx, user, "charge", key, 200, &body).await?;
    tx.commit().await?;
    metrics::counter!("points_charged_total").increment(amount as u64);
    Ok((200, body))
}

/// One ledger line.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct LedgerItem {
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub created_at: DateTime<Utc>,
}

/// The latest 100 ledger lines, newest first.
pub async fn history(pool: &PgPool, user: Uuid) -> Result<Vec<LedgerItem>> {
    Ok(sqlx::query_as(
        "SELECT kind, amount, balance_after, created_at FROM point_ledger
         WHERE user_id = $1 ORDER BY id DESC LIMIT 100",
    )
    .bind(user)
    .fetch_all(pool)
    .await?)
}
