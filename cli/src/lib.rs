//! The `sluice` binary's library: configuration and the roles it runs, kept
//! out of `main.rs` so end-to-end tests can start the roles in-process.
//!
//! - [`settings`]: layered configuration (file, then `SLUICE_*`).
//! - [`serve`]: connecting to the servers and running the roles.
#![forbid(unsafe_code)]

pub mod serve;
pub mod settings;
