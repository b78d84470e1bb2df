//! What the ops verbs (`sluice dlq …`, `sluice status`) do, as library
//! functions: the clap verbs in `cmd/` only parse arguments and print, and the
//! end-to-end tests call these directly against the real servers.
//!
//! - [`walk`]: reading a quorum queue without consuming it (take every
//!   message unacked, then give them all back) — the one primitive every DLQ
//!   verb is built on, with what it costs.
//! - [`dead_letter`]: one dead letter as people and scripts see it: its
//!   `x-sluice-*` headers, death history and payload; filters and groups.
//! - [`dlq`]: list, show, shovel, purge and delete.
//! - [`dlt`]: the Kafka consumers' dead-letter topics and parked keys: list,
//!   show, replay after a fix, unpark.
//! - [`audit`]: the `dlq_audit` table: who removed which dead letters, and why.
//! - [`management`]: the RabbitMQ management API (queue arguments and
//!   policies, dynamic shovels, queue counters).
//! - [`status`]: the health of every tenant's queues, topics, projection and
//!   schemas, with the rules that make it unhealthy.

pub mod audit;
pub mod dead_letter;
pub mod dlq;
pub mod dlt;
pub mod management;
pub mod status;
pub mod walk;

/// The `x-sluice-*` header names, as the processors write them.
pub use sluice_processors::amqp::headers;

/// Why an ops verb failed. The binary prints it and exits non-zero; none of
/// these leaves a message half-moved (see each operation for what a failure
/// midway means).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// RabbitMQ refused or dropped the AMQP connection.
    #[error("RabbitMQ: {0}")]
    Amqp(String),
    /// The management API did not answer as expected.
    #[error("RabbitMQ management API: {0}")]
    Management(String),
    /// The CQL store (audit log, projection versions).
    #[error("CQL store: {0}")]
    Cql(String),
    /// The verb would break a guarantee on this queue and does nothing.
    #[error("refused: {0}")]
    Refused(String),
    /// No dead letter has this message id (in the queues looked at).
    #[error("no dead letter with message id {0:?} in {1}")]
    NotFound(String, String),
    /// The consumer has not parked this key (for this tenant).
    #[error("{consumer} has no parked key {key:?} for tenant {tenant} (`sluice dlt list` shows the parked keys)")]
    NotParked { consumer: String, tenant: String, key: String },
    /// Arguments that cannot work together or name nothing.
    #[error("{0}")]
    Usage(String),
}

pub(crate) fn amqp_err(e: impl std::fmt::Display) -> OpsError {
    OpsError::Amqp(e.to_string())
}

pub(crate) fn cql_err(e: impl std::fmt::Display) -> OpsError {
    OpsError::Cql(e.to_string())
}

/// Parses a duration such as `90s`, `15m`, `2h`, `3d` or `1h30m`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut seconds: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(format!("{text:?}: unknown unit {c:?} (use s, m, h or d)")),
        };
        let n: u64 = number.parse().map_err(|_| format!("{text:?}: a number must come before {c:?}"))?;
        seconds = seconds.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!("{text:?}: give a unit after {number} (s, m, h or d)"));
    }
    Ok(std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(super::parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(super::parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(super::parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(super::parse_duration("10").is_err());
        assert!(super::parse_duration("5w").is_err());
        assert!(super::parse_duration("").is_err());
    }
}
