//! The one error type of the domain and the one place it is mapped to HTTP.
//!
//! Domain modules return [`Error`]; [`Error::status_code`] and [`Error::code`] decide what a
//! client sees. Infrastructure causes (database, Redis) are logged with their detail and shown to
//! the client only as a generic 500/503, never with internals.

use warp::http::StatusCode;

/// Everything that can go wrong in a request, named for what the user did or met.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    InvalidInput { field: Option<String>, message: String },
    #[error("request body is larger than 64 KiB")]
    PayloadTooLarge,
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("this seat is already held or sold")]
    SeatUnavailable,
    #[error("you already hold or own the most seats one user may have for this schedule")]
    SeatLimitReached,
    #[error("the reservation is not held")]
    NotHeld,
    #[error("the hold has expired")]
    ReservationExpired,
    #[error("not enough points")]
    InsufficientPoints,
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("the queue token is not active")]
    QueueTokenNotActive,
    #[error("the queue token is for another schedule or user")]
    QueueTokenMismatch,
    #[error("too many open streams for this user; close one first")]
    TooManyStreams,
    #[error("this server has as many open streams as it can take; try again shortly")]
    StreamsAtCapacity,
    #[error("the reservation is not paid")]
    NotConfirmed,
    #[error("refunds are closed this close to the show")]
    RefundWindowClosed,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A 400 naming the offending field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::InvalidInput { field: Some(field.to_string()), message: message.into() }
    }

    /// A human-readable text field (a user's name, a concert's title): trimmed, 1 to `max`
    /// characters, and no control characters. The last rule is not cosmetic: PostgreSQL's text
    /// type cannot store a NUL byte, so letting one through would turn bad input into a 500.
    pub fn display_text<'a>(field: &str, raw: &'a str, max: usize) -> Result<&'a str, Error> {
        let text = raw.trim();
        if text.is_empty() || text.chars().count() > max {
            return Err(Error::invalid(field, format!("must be 1 to {max} characters")));
        }
        if text.chars().any(char::is_control) {
            return Err(Error::invalid(field, "must not contain control characters"));
        }
        Ok(text)
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::SeatUnavailable
            | Error::SeatLimitReached
            | Error::NotHeld
            | Error::ReservationExpired
            | Error::InsufficientPoints
            | Error::NotConfirmed
            | Error::RefundWindowClosed => StatusCode::CONFLICT,
            Error::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Error::QueueTokenNotActive | Error::QueueTokenMismatch => StatusCode::FORBIDDEN,
            Error::TooManyStreams => StatusCode::TOO_MANY_REQUESTS,
            Error::StreamsAtCapacity => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(e) if is_unavailable(e) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Redis(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code in `{"error":{"code":…}}`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "INVALID_INPUT",
            Error::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Error::Unauthorized => "UNAUTHORIZED",
            Error::NotFound(_) => "NOT_FOUND",
            Error::SeatUnavailable => "SEAT_UNAVAILABLE",
            Error::SeatLimitReached => "SEAT_LIMIT_REACHED",
            Error::NotHeld => "NOT_HELD",
            Error::ReservationExpired => "RESERVATION_EXPIRED",
            Error::InsufficientPoints => "INSUFFICIENT_POINTS",
            Error::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Error::QueueTokenNotActive => "QUEUE_TOKEN_NOT_ACTIVE",
            Error::QueueTokenMismatch => "QUEUE_TOKEN_MISMATCH",
            Error::TooManyStreams => "TOO_MANY_STREAMS",
            Error::StreamsAtCapacity => "STREAMS_AT_CAPACITY",
            Error::NotConfirmed => "NOT_CONFIRMED",
            Error::RefundWindowClosed => "REFUND_WINDOW_CLOSED",
            Error::Database(e) if is_unavailable(e) => "UNAVAILABLE",
            Error::Redis(_) => "UNAVAILABLE",
            Error::Database(_) | Error::Internal(_) => "INTERNAL",
        }
    }

    /// The message shown to the client: the domain text, or a generic one for infrastructure.
    pub fn public_message(&self) -> String {
        match self {
            Error::Database(_) | Error::Redis(_) | Error::Internal(_) => {
                if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
                    "a dependency is unavailable, try again shortly".into()
                } else {
                    "internal error".into()
                }
            }
            Error::InvalidInput { field: Some(f), message } => format!("{f}: {message}"),
            other => other.to_string(),
        }
    }

    /// `{"error":{"code","message"[,"field"]}}` with the status; infrastructure causes are logged.
    pub fn to_response(&self) -> warp::reply::Response {
        use warp::Reply;
        let status = self.status_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut err = serde_json::json!({"code": self.code(), "message": self.public_message()});
        if let Error::InvalidInput { field: Some(f), .. } = self {
            err["field"] = serde_json::Value::String(f.clone());
        }
        warp::reply::with_status(warp::reply::json(&serde_json::json!({ "error": err })), status)
            .into_response()
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
}

/// True when `e` is a violation of the unique constraint or index named `constraint`.
pub fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23505") && db.constraint() == Some(constraint)
        }
        _ => false,
    }
}
