//! Users and their bearer tokens. A token is 256 random bits shown once at sign-up; only its
//! SHA-256 is stored, so a database leak does not leak credentials.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The answer to `POST /v1/users`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    pub user_id: Uuid,
    pub token: String,
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// 256 bits from the operating system's generator (through UUID v4), hex encoded.
pub fn random_token() -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    hex::encode(bytes)
}

/// Registers a user.
pub async fn create(pool: &PgPool, name: &str) -> Result<NewUser> {
    let name = Error::display_text("name", name, 100)?;
    let user_id = Uuid::new_v4();
    let token = random_token();
    sqlx::query("INSERT INTO users (id, name, token_hash) VALUES ($1, $2, $3)")
        .bind(user_id)
        .bind(name)
        .bind(hash_token(&token))
        .execute(pool)
        .await?;
    metrics::counter!("users_created_total").increment(1);
    Ok(NewUser { user_id, token })
}

/// Tokens this process has already resolved (issue 11: the lookup was one PostgreSQL round trip
/// on every authenticated request, the most frequent statement of the spike). A token never
/// changes owner and no user is ever deleted, so a resolved token stays right for the process's
/// life; unknown tokens are never remembered. Bounded: past [`SESSIONS_CAP`] it starts over.
#[derive(Clone, Default)]
pub struct Sessions {
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<[u8; 32], Uuid>>>,
}

/// Most tokens one api process remembers (about 100 bytes each).
pub const SESSIONS_CAP: usize = 500_000;

impl Sessions {
    /// [`authenticate`], answered from memory when this process has seen the token before.
    pub async fn authenticate(&self, pool: &PgPool, authorization: Option<&str>) -> Result<Uuid> {
        let token = bearer(authorization).ok_or(Error::Unauthorized)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(id) = self.known.lock().expect("sessions lock").get(&hash) {
            return Ok(*id);
        }
        let id = authenticate(pool, authorization).await?;
        self.remember(hash, id);
        Ok(id)
    }

    /// Remembers the token of a user just created.
    pub fn remember_token(&self, token: &str, user: Uuid) {
        self.remember(Sha256::digest(token.as_bytes()).into(), user);
    }

    fn remember(&self, hash: [u8; 32], user: Uuid) {
        let mut known = self.known.lock().expect("sessions lock");
        if known.len() >= SESSIONS_CAP {
            known.clear();
        }
        known.insert(hash, user);
    }
}

/// Resolves `Authorization: Bearer <token>` to a user id.
pub async fn authenticate(pool: &PgPool, authorization: Option<&str>) -> Result<Uuid> {
    let token = bearer(authorization).ok_or(Error::Unauthorized)?;
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE token_hash = $1")
        .bind(hash_token(token))
        .fetch_optional(pool)
        .await?;
    id.ok_or(Error::Unauthorized)
}

/// The token of a `Bearer` authorization header, if well formed.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= 256).then_some(token)
}
