//! Operations for administrators (bearer `--admin-token`): steering a schedule's queue admission
//! while the sale runs (issue 12). The rules themselves live in `queue`; this module checks who
//! may call, validates what they ask for, and refuses unknown schedules.

use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::queue::{Admission, AdmissionChange, Queue};

/// Largest `batch` an operator may set (users admitted per tick).
pub const MAX_BATCH: u32 = 1_000_000;
/// Largest `maxActive` an operator may set.
pub const MAX_ACTIVE: u32 = 10_000_000;

/// Accepts `Authorization: Bearer <admin token>`; an empty configured token disables admin routes.
pub fn authorize(admin_token: &str, auth: Option<&str>) -> Result<()> {
    let token = crate::user::bearer(auth).ok_or(Error::Unauthorized)?;
    let (a, b) = (token.as_bytes(), admin_token.as_bytes());
    // Constant time over the token's bytes, so response time does not reveal a matching prefix.
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if admin_token.is_empty() || !same {
        return Err(Error::Unauthorized);
    }
    Ok(())
}

/// Body of `PATCH /v1/admin/schedules/{scheduleId}/queue`: any of the three.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueuePatch {
    #[serde(default, deserialize_with = "given")]
    pub paused: Option<bool>,
    #[serde(default, deserialize_with = "given")]
    pub batch: Option<u32>,
    #[serde(default, deserialize_with = "given")]
    pub max_active: Option<u32>,
}

/// A field that may be left out but, when given, must be a value: `null` is refused (400), as
/// the OpenAPI description says, instead of reading as "unchanged".
fn given<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The admission of a schedule's queue (404 for an unknown schedule).
pub async fn queue_state(pool: &PgPool, queue: &Queue, schedule: Uuid) -> Result<Admission> {
    crate::catalog::schedule_opens_at(pool, schedule).await?;
    queue.admission(schedule).await
}

/// Changes a schedule's admission; applies within one tick on every replica.
pub async fn patch_queue(pool: &PgPool, queue: &Queue, schedule: Uuid, p: QueuePatch) -> Result<Admission> {
    if let Some(b) = p.batch {
        if !(1..=MAX_BATCH).contains(&b) {
            return Err(Error::invalid("batch", format!("must be 1 to {MAX_BATCH}")));
        }
    }
    if let Some(m) = p.max_active {
        if !(1..=MAX_ACTIVE).contains(&m) {
            return Err(Error::invalid("maxActive", format!("must be 1 to {MAX_ACTIVE} (pause to stop admission)")));
        }
    }
    crate::catalog::schedule_opens_at(pool, schedule).await?;
    let change = AdmissionChange { paused: p.paused, batch: p.batch, max_active: p.max_active };
    let state = queue.set_admission(schedule, &change).await?;
    tracing::info!(%schedule, ?change, "queue admission changed by an operator");
    Ok(state)
}
