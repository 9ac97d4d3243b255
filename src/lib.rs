//! Concert booking backend that survives a ticket-sale spike.
//!
//! The library holds every rule of the product; the binaries in `bin/` only parse flags, set up
//! telemetry and shutdown, and call the entry points here with ready resources (listeners, pools,
//! Redis connections, Kafka clients, key prefixes, cancellation tokens) so tests can isolate them.
//!
//! Where to find a rule of the brief (§5):
//! - seat holds and "a hold past its expiry can never be paid": [`reservation`]
//! - payment in one transaction: [`payment`]; refunds: [`refund`]
//! - waiting queue, its fairness rules and admission: [`queue`]; operators steering it: [`admin`]
//! - the seat limit per user: [`reservation`]
//! - the delay scheduler (§6): [`scheduler`]; the expirer and its sweeper: [`expiry`]
//! - outbox to Kafka: [`outbox`]; topics, envelope, consumer runner: [`kafka`]
//! - live streams (seat map, notifications) and their commit-ordered ids: [`seat_map`], [`sequencer`]
//! - notifications: [`notification`]; ranking: [`ranking`]; data-platform export: [`export`]
//! - what operators see and do (`bookingctl`): [`ops`]

pub mod admin;
pub mod app;
pub mod catalog;
pub mod config;
pub mod db;
pub mod error;
pub mod expiry;
pub mod export;
pub mod floor;
pub mod group_commit;
pub mod health;
pub mod hold_gate;
pub mod http;
pub mod idempotency;
pub mod kafka;
pub mod keys;
pub mod notification;
pub mod ops;
pub mod outbox;
pub mod payment;
pub mod points;
pub mod queue;
pub mod ranking;
pub mod redis_conn;
pub mod refund;
pub mod reservation;
pub mod retention;
pub mod scheduler;
pub mod seat_map;
pub mod sequencer;
pub mod shutdown;
pub mod telemetry;
pub mod user;
pub mod vacuum;
pub mod webhook;
pub mod worker;
