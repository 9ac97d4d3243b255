//! The message envelope of the design document §4-2, JSON in camelCase:
//! `{"eventId","eventType","eventTime","payload"}`.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

/// Event types carried in `eventType`; a consumer dead-letters any type it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    ReservationCreated,
    ReservationExpiration,
    ReservationCancelled,
    PaymentCompleted,
    PaymentRefunded,
    NotificationRequest,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ReservationCreated => "reservation.created",
            EventType::ReservationExpiration => "reservation.expiration",
            EventType::ReservationCancelled => "reservation.cancelled",
            EventType::PaymentCompleted => "payment.completed",
            EventType::PaymentRefunded => "payment.refunded",
            EventType::NotificationRequest => "notification.request",
        }
    }
}

/// One event on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<T> {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_time: DateTime<Utc>,
    pub payload: T,
}

impl<T: Serialize + DeserializeOwned> Envelope<T> {
    /// A new event with a fresh id, stamped now.
    pub fn new(event_type: EventType, payload: T) -> Self {
        Self::with_id(Uuid::new_v4(), event_type, payload)
    }

    /// An event whose id is chosen by the caller (derived ids make replays collapse into one).
    pub fn with_id(event_id: Uuid, event_type: EventType, payload: T) -> Self {
        Self { event_id, event_type: event_type.as_str().to_string(), event_time: Utc::now(), payload }
    }

    /// Parses an envelope and checks its type; the error text is the dead-letter reason.
    pub fn parse(bytes: &[u8], expected: EventType) -> Result<Self, String> {
        let env: Envelope<T> =
            serde_json::from_slice(bytes).map_err(|e| format!("malformed envelope: {e}"))?;
        if env.event_type != expected.as_str() {
            return Err(format!("unknown event type {:?}, expected {:?}", env.event_type, expected.as_str()));
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_camel_case_and_round_trips() {
        let env = Envelope::new(EventType::PaymentCompleted, serde_json::json!({"amount": 5}));
        let text = serde_json::to_string(&env).unwrap();
        assert!(text.contains("\"eventId\"") && text.contains("\"eventType\":\"payment.completed\""));
        assert!(text.contains("\"eventTime\""));
        let back: Envelope<serde_json::Value> =
            Envelope::parse(text.as_bytes(), EventType::PaymentCompleted).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn wrong_type_or_bad_json_is_rejected_with_a_reason() {
        let env = Envelope::new(EventType::PaymentCompleted, serde_json::json!({}));
        let text = serde_json::to_vec(&env).unwrap();
        let err = Envelope::<serde_json::Value>::parse(&text, EventType::ReservationCreated).unwrap_err();
        assert!(err.contains("unknown event type"));
        assert!(Envelope::<serde_json::Value>::parse(b"{nope", EventType::ReservationCreated)
            .unwrap_err()
            .contains("malformed"));
    }
}
