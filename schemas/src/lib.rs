//! Contracts shared by every sluice role. Imports no other sluice crate.
//!
//! - [`cloudevent`]: the CloudEvents 1.0 envelope and its attribute rules.
//! - [`catalog`]: bounded contexts, their command JSON Schemas (validators
//!   compiled once) and event Avro schemas.
//! - [`orders`]: the demo context's command and event types.
//! - [`patients`]: the patient onboarding context (driven by a process manager).
//! - [`codec`]: events as Avro in Confluent wire format via the registry;
//!   [`avro_body`] reads records written with the compiled-in schemas.
//! - [`names`]: exchange, queue, topic and subject names.
//! - [`operation_id`]: signed operation ids (no write on the hot path).
//! - [`cql`]: the CQL tables, created at startup by every role.
#![forbid(unsafe_code)]

pub mod avro_body;
pub mod catalog;
pub mod cloudevent;
pub mod codec;
pub mod cql;
pub mod names;
pub mod operation_id;
pub mod orders;
pub mod patients;
