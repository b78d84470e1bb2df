//! Durable timers in the CQL store (table `process_timers`). A row exists
//! from the moment the decision that set it is in the process's stream until
//! the timer was handled or cancelled, so timers survive restarts. Any
//! instance may see a due row; it claims it with a lightweight transaction
//! on `claimed_until` (a lease, never null: a missing row — cancelled or
//! already handled — never matches), so one instance fires it; should that
//! instance die, the lease runs out and another one takes over. The stream
//! still decides: a firing already recorded is not applied twice.

use std::future::Future;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, Row};

use super::Timer;

/// One timer of one process instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRef {
    pub tenant: String,
    pub process: String,
    pub correlation: String,
    pub timer: Timer,
}

/// A due timer as read, with the lease it had.
#[derive(Debug, Clone)]
pub struct DueTimer {
    pub timer: TimerRef,
    pub claimed_until_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("timer store: {0}")]
pub struct TimerError(pub String);

fn timer_err(e: impl std::fmt::Display) -> TimerError {
    TimerError(e.to_string())
}

pub trait TimerStore: Send + Sync {
    /// Creates or re-creates a timer (idempotent).
    fn set(&self, timer: &TimerRef) -> impl Future<Output = Result<(), TimerError>> + Send;
    fn cancel(&self, timer: &TimerRef) -> impl Future<Output = Result<(), TimerError>> + Send;
    /// Timers of `tenant` due at `now_ms`, oldest first, at most `limit`.
    fn due(
        &self,
        tenant: &str,
        now_ms: i64,
        limit: i32,
    ) -> impl Future<Output = Result<Vec<DueTimer>, TimerError>> + Send;
    /// Takes the lease of a due timer whose lease ran out; false when another
    /// instance was first or the timer is gone.
    fn claim(
        &self,
        due: &DueTimer,
        instance: &str,
        until_ms: i64,
    ) -> impl Future<Output = Result<bool, TimerError>> + Send;
    /// Notes the stage a process instance is in, in the index ops read
    /// (`process_instances`; the stream stays the truth). Kept beside the
    /// timers: both are the process runtime's bookkeeping in the CQL store.
    fn record_stage(
        &self,
        tenant: &str,
        process: &str,
        correlation: &str,
        stage: &str,
    ) -> impl Future<Output = Result<(), TimerError>> + Send;
}

pub struct CqlTimers {
    session: Arc<Session>,
    insert: PreparedStatement,
    delete: PreparedStatement,
    select_due: PreparedStatement,
    claim: PreparedStatement,
    stage: PreparedStatement,
}

impl CqlTimers {
    pub async fn new(session: Arc<Session>) -> Result<Self, TimerError> {
        let insert = session
            .prepare(
                "INSERT INTO process_timers (tenant, due_at, process, correlation, timer_id, claimed_by, claimed_until) \
                 VALUES (?, ?, ?, ?, ?, '', ?)",
            )
            .await
            .map_err(timer_err)?;
        let delete = session
            .prepare("DELETE FROM process_timers WHERE tenant = ? AND due_at = ? AND process = ? AND correlation = ? AND timer_id = ?")
            .await
            .map_err(timer_err)?;
        let select_due = session
            .prepare(
                "SELECT due_at, process, correlation, timer_id, claimed_until FROM process_timers \
                 WHERE tenant = ? AND due_at <= ? LIMIT ?",
            )
            .await
            .map_err(timer_err)?;
        let claim = session
            .prepare(
                "UPDATE process_timers SET claimed_by = ?, claimed_until = ? \
                 WHERE tenant = ? AND due_at = ? AND process = ? AND correlation = ? AND timer_id = ? IF claimed_until = ?",
            )
            .await
            .map_err(timer_err)?;
        let stage = session
            .prepare("INSERT INTO process_instances (tenant, process, correlation, stage, updated_at) VALUES (?, ?, ?, ?, ?)")
            .await
            .map_err(timer_err)?;
        Ok(Self { session, insert, delete, select_due, claim, stage })
    }
}

impl TimerStore for CqlTimers {
    async fn set(&self, t: &TimerRef) -> Result<(), TimerError> {
        let due = CqlTimestamp(t.timer.due_at_ms);
        self.session
            .execute_unpaged(&self.insert, (&t.tenant, due, &t.process, &t.correlation, &t.timer.id, CqlTimestamp(0)))
            .await
            .map_err(timer_err)?;
        Ok(())
    }

    async fn cancel(&self, t: &TimerRef) -> Result<(), TimerError> {
        let due = CqlTimestamp(t.timer.due_at_ms);
        self.session
            .execute_unpaged(&self.delete, (&t.tenant, due, &t.process, &t.correlation, &t.timer.id))
            .await
            .map_err(timer_err)?;
        Ok(())
    }

    async fn due(&self, tenant: &str, now_ms: i64, limit: i32) -> Result<Vec<DueTimer>, TimerError> {
        let result = self
            .session
            .execute_unpaged(&self.select_due, (tenant, CqlTimestamp(now_ms), limit))
            .await
            .map_err(timer_err)?;
        let rows = result.into_rows_result().map_err(timer_err)?;
        rows.rows::<(CqlTimestamp, String, String, String, Option<CqlTimestamp>)>()
            .map_err(timer_err)?
            .map(|row| {
                let (due_at, process, correlation, timer_id, claimed_until) = row.map_err(timer_err)?;
                Ok(DueTimer {
                    timer: TimerRef {
                        tenant: tenant.to_owned(),
                        process,
                        correlation,
                        timer: Timer { id: timer_id, due_at_ms: due_at.0 },
                    },
                    claimed_until_ms: claimed_until.map_or(0, |t| t.0),
                })
            })
            .collect()
    }

    async fn claim(&self, due: &DueTimer, instance: &str, until_ms: i64) -> Result<bool, TimerError> {
        let t = &due.timer;
        let values = (
            instance,
            CqlTimestamp(until_ms),
            &t.tenant,
            CqlTimestamp(t.timer.due_at_ms),
            &t.process,
            &t.correlation,
            &t.timer.id,
            CqlTimestamp(due.claimed_until_ms),
        );
        let result = self.session.execute_unpaged(&self.claim, values).await.map_err(timer_err)?;
        let rows = result.into_rows_result().map_err(timer_err)?;
        let first = rows.rows::<Row>().map_err(timer_err)?.next().transpose().map_err(timer_err)?;
        Ok(matches!(first.and_then(|row| row.columns.into_iter().next().flatten()), Some(CqlValue::Boolean(true))))
    }

    async fn record_stage(
        &self,
        tenant: &str,
        process: &str,
        correlation: &str,
        stage: &str,
    ) -> Result<(), TimerError> {
        let now = CqlTimestamp(chrono::Utc::now().timestamp_millis());
        self.session
            .execute_unpaged(&self.stage, (tenant, process, correlation, stage, now))
            .await
            .map_err(timer_err)?;
        Ok(())
    }
}

/// What `sluice status` shows of one process of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessSummary {
    pub process: String,
    /// Instances per stage (`awaiting_assessment`, `completed`, …).
    pub by_stage: std::collections::BTreeMap<String, i64>,
    /// Timers whose time has come (a few at any moment is normal; many, or
    /// old ones, mean no processor is firing them).
    pub timers_due: i64,
    pub timers_pending: i64,
    /// Due time of the oldest due timer, ms since the epoch.
    pub oldest_due_ms: Option<i64>,
}

/// Processes by stage and timers due, for one tenant and process.
pub async fn summary(
    session: &Session,
    tenant: &str,
    process: &str,
    now_ms: i64,
) -> Result<ProcessSummary, TimerError> {
    let mut out = ProcessSummary { process: process.to_owned(), ..Default::default() };
    let rows = session
        .query_unpaged("SELECT stage FROM process_instances WHERE tenant = ? AND process = ?", (tenant, process))
        .await
        .map_err(timer_err)?
        .into_rows_result()
        .map_err(timer_err)?;
    for row in rows.rows::<(Option<String>,)>().map_err(timer_err)? {
        *out.by_stage.entry(row.map_err(timer_err)?.0.unwrap_or_default()).or_default() += 1;
    }
    let rows = session
        .query_unpaged("SELECT due_at, process FROM process_timers WHERE tenant = ?", (tenant,))
        .await
        .map_err(timer_err)?
        .into_rows_result()
        .map_err(timer_err)?;
    for row in rows.rows::<(CqlTimestamp, String)>().map_err(timer_err)? {
        let (due_at, of) = row.map_err(timer_err)?;
        if of != process {
            continue;
        }
        if due_at.0 <= now_ms {
            out.timers_due += 1;
            out.oldest_due_ms = Some(out.oldest_due_ms.map_or(due_at.0, |o: i64| o.min(due_at.0)));
        } else {
            out.timers_pending += 1;
        }
    }
    Ok(out)
}
