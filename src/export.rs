//! Data-platform export of `payment.completed` (filled in with the worker).
