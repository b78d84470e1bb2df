//! The `sluice` binary's library: configuration and the roles it runs, kept
//! out of `main.rs` so end-to-end tests can start the roles in-process.
//!
//! - [`settings`]: layered configuration (file, then `SLUICE_*`).
//! - [`ops`]: what `sluice dlq` and `sluice status` do, callable by tests.
//! - [`serve`]: connecting to the servers and running the roles.
//! - [`bench`]: `sluice bench`, the pipeline against its servers' ceilings.
#![forbid(unsafe_code)]

pub mod bench;
pub mod ops;
pub mod serve;
pub mod settings;
