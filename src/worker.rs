//! The worker's consumers (filled in with the notifications issue).
