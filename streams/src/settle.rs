//! Settling one record for good: apply it, retrying transient failures with
//! [`Backoff`], or dead-letter it when it is poison (retrying the
//! dead-letter write too). What every consumer of events does with a record,
//! written once.

use std::future::Future;

use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::backoff::Backoff;
use crate::dead_letter::DeadLetters;
use crate::ApplyError;

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled<T> {
    Applied(T),
    DeadLettered { class: &'static str, reason: String },
}

/// Tries `attempt` until it applies `record` or finds it poison; `None` when
/// `stop` came first (the record is not settled).
pub async fn settle_record<T, F, Fut>(
    dead_letters: &DeadLetters,
    record: &impl Message,
    stop: &CancellationToken,
    mut attempt: F,
) -> Option<Settled<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApplyError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Ok(applied) => return Some(Settled::Applied(applied)),
            // Boxed: rare, and inline its future would grow every record's.
            Err(ApplyError::Poison { class, reason }) => {
                match Box::pin(dead_letters.send(record, class, &reason)).await {
                    Ok(()) => return Some(Settled::DeadLettered { class, reason }),
                    Err(e) => {
                        warn!(error = %e, topic = record.topic(), offset = record.offset(), "cannot dead-letter a poison record yet")
                    }
                }
            }
            Err(ApplyError::Transient(reason)) => {
                warn!(%reason, topic = record.topic(), offset = record.offset(), "record not applied yet; retrying");
            }
        }
        if !backoff.wait(stop).await {
            return None;
        }
    }
}
