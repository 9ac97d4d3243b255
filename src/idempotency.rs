//! `Idempotency-Key` handling. The key is claimed by inserting its row *inside* the transaction
//! that does the work: a concurrent request with the same key blocks on the primary key until the
//! first one commits, then replays its stored answer. If the first one fails, its transaction (key
//! included) rolls back and the retry runs afresh, so nothing is ever half-written.
//!
//! A payment is one statement and writes its key once, with its answer (`payment::pay` says why
//! that is as safe); it reads a used key's answer with [`answered`].

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{Error, Result};

/// What claiming a key found.
pub enum Claim {
    /// First use: do the work, then call [`complete`].
    Fresh,
    /// Already done with the same request: answer this again.
    Replay { status: u16, body: Value },
}

/// Validates the header value: 1 to 200 visible ASCII characters.
pub fn validate_key(key: Option<&str>) -> Result<String> {
    let key = key.ok_or_else(|| Error::invalid("Idempotency-Key", "header is required"))?;
    if key.is_empty() || key.len() > 200 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid("Idempotency-Key", "must be 1 to 200 visible ASCII characters"));
    }
    Ok(key.to_string())
}

/// A fingerprint of the request the key was used for.
pub fn fingerprint(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().to_vec()
}

/// Claims `key` for this request (see the module comment for the concurrency argument).
pub async fn claim(
    tx: &mut PgConnection,
    user: Uuid,
    scope: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<Claim> {
    let inserted = sqlx::query(&claim_sql("$1", "$2", "$3", "$4", "(VALUES (1)) AS one"))
        .bind(user)
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Fresh);
    }
    let (status, body) = stored(tx, user, scope, key, request_hash).await?;
    Ok(Claim::Replay { status, body })
}

/// The answer stored for a key someone else claimed: `IDEMPOTENCY_KEY_REUSED` if it was claimed
/// for another request.
async fn stored(tx: &mut PgConnection, user: Uuid, scope: &str, key: &str, request_hash: &[u8]) -> Result<(u16, Value)> {
    // The claim conflicted, so the other request committed its row (with its answer) first.
    read(&mut *tx, user, scope, key, request_hash).await?.ok_or_else(|| Error::Database(sqlx::Error::RowNotFound))
}

/// The answer already stored for `key`, read outside any transaction: `None` when the key is
/// unknown or its first request has not committed yet (a claimed key becomes visible only with
/// its answer), `IDEMPOTENCY_KEY_REUSED` when it was used for another request. For a retry that
/// must get its answer even when the preconditions of the first request no longer hold (a hold
/// retried after its queue place lapsed: nothing is held again, so the queue has nothing to say).
pub async fn answered(pool: &sqlx::PgPool, user: Uuid, scope: &str, key: &str, request_hash: &[u8]) -> Result<Option<(u16, Value)>> {
    read(pool, user, scope, key, request_hash).await
}

async fn read<'e>(db: impl sqlx::PgExecutor<'e>, user: Uuid, scope: &str, key: &str, request_hash: &[u8]) -> Result<Option<(u16, Value)>> {
    let row: Option<(Vec<u8>, i32, Value)> =
        sqlx::query_as("SELECT request_hash, status_code, response FROM idempotency_keys WHERE user_id = $1 AND scope = $2 AND key = $3")
            .bind(user)
            .bind(scope)
            .bind(key)
            .fetch_optional(db)
            .await?;
    match row {
        None => Ok(None),
        Some((hash, _, _)) if hash != request_hash => Err(Error::IdempotencyKeyReused),
        Some((_, status, body)) => Ok(Some((status as u16, body))),
    }
}

/// Stores the answer given for a claimed key (same transaction as the work).
pub async fn complete(
    tx: &mut PgConnection,
    user: Uuid,
    scope: &str,
    key: &str,
    status: u16,
    body: &Value,
) -> Result<()> {
    sqlx::query(&complete_sql("$1", "$2", "$3", "$4", "$5", "(VALUES (1)) AS one"))
    .bind(user)
    .bind(scope)
    .bind(key)
    .bind(status as i32)
    .bind(body)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A key stored with its answer, as SQL: an `INSERT` of one row per row of `from` (none when
/// `from` has none). The arguments are SQL expressions (`$n`, literals, columns of `from`). A
/// key already stored, or being stored by a transaction still open, makes it wait for that one
/// and then fail with the violation [`is_taken`] recognises, for a statement that must do all of
/// its work or none (a payment).
pub fn store_sql(user: &str, scope: &str, key: &str, request_hash: &str, status: &str, response: &str, from: &str) -> String {
    format!(
        "INSERT INTO idempotency_keys (user_id, scope, key, request_hash, status_code, response)
         SELECT {user}, {scope}, {key}, {request_hash}, {status}, {response} FROM {from}"
    )
}

/// The error of a [`store_sql`] whose key was already taken.
pub fn is_taken(e: &sqlx::Error) -> bool {
    crate::error::is_unique_violation(e, "idempotency_keys_pkey")
}

/// The claim of [`claim`] as SQL: [`store_sql`] without an answer yet, returning a row only for a
/// fresh key.
fn claim_sql(user: &str, scope: &str, key: &str, request_hash: &str, from: &str) -> String {
    format!("{} ON CONFLICT DO NOTHING RETURNING 1", store_sql(user, scope, key, request_hash, "0", "'null'", from))
}

/// The update of [`complete`] as SQL; `response` may use the columns of `from`, and nothing is
/// stored when `from` has no row.
fn complete_sql(user: &str, scope: &str, key: &str, status: &str, response: &str, from: &str) -> String {
    format!(
        "UPDATE idempotency_keys k SET status_code = {status}, response = {response} FROM {from}
         WHERE k.user_id = {user} AND k.scope = {scope} AND k.key = {key}"
    )
}
