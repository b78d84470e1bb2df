//! Durable timers in the CQL store (`process_timer_buckets`, with
//! `process_timer_index` and `process_timer_cursor`; schemas/cql/tables.cql).
//! A row exists from the moment the decision that set it is in the process's
//! stream until the timer was handled or cancelled, so timers survive
//! restarts.
//!
//! Rows live in time buckets ([`BUCKET_MS`]). A poller reads only buckets
//! that can hold due rows ([`BucketScan`]): a bucket that ended more than
//! [`SETTLE_MS`] ago can gain no row (a timer is put in the bucket of its
//! due time or of the moment it is set, whichever is later), so once it is
//! read empty it is never read again, and the tombstones fired timers leave
//! are not scanned poll after poll. Stuck rows (leased by an instance that
//! keeps failing) are skipped, not counted against the poll's limit.
//!
//! Any instance may see a due row; it claims it with a lightweight
//! transaction on `claimed_until` (a lease, never null: a missing row —
//! cancelled or already handled — never matches), so one instance fires it;
//! should that instance die, the lease runs out and another one takes over.
//! The stream still decides: a firing already recorded is not applied twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, Row};

use super::Timer;

/// Width of a timer bucket.
pub const BUCKET_MS: i64 = 10_000;

/// How long after its end a bucket may still gain a row (a set in flight,
/// clocks of instances apart by less than this): only then is an empty
/// bucket passed for good.
pub const SETTLE_MS: i64 = 30_000;

/// Settled buckets read for the first time in one poll at most (a tenant
/// coming back after a long pause catches up over a few polls).
const NEW_BUCKETS_PER_POLL: i64 = 1_000;

/// The bucket holding time `ms`.
pub fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS)
}

/// The bucket a timer due at `due_at_ms` is put in when set at `now_ms`.
pub fn bucket_for(due_at_ms: i64, now_ms: i64) -> i64 {
    bucket_of(due_at_ms.max(now_ms))
}

/// The last bucket that can gain no more rows at `now_ms`.
fn settled_to(now_ms: i64) -> i64 {
    bucket_of(now_ms - SETTLE_MS) - 1
}

/// What one poller knows of one tenant's buckets: which to read next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketScan {
    /// The first bucket that may still hold a row.
    cursor: i64,
    /// The last settled bucket read (every one before it was read too).
    scanned_to: i64,
    /// Settled buckets read with rows left in them.
    open: BTreeSet<i64>,
}

impl BucketScan {
    pub fn new(cursor: i64) -> Self {
        Self { cursor, scanned_to: cursor - 1, open: BTreeSet::new() }
    }

    /// The buckets to read at `now_ms`, oldest first: settled ones with rows
    /// left, settled ones not read yet, and those not settled.
    pub fn plan(&self, now_ms: i64) -> Vec<i64> {
        let from = (self.scanned_to + 1).max(self.cursor);
        let to = bucket_of(now_ms).min(from + NEW_BUCKETS_PER_POLL - 1);
        self.open.iter().copied().chain(from..=to).collect()
    }

    /// What reading `bucket` at `now_ms` found.
    pub fn read(&mut self, bucket: i64, has_rows: bool, now_ms: i64) {
        if bucket > settled_to(now_ms) {
            return; // read again at every poll until it settles
        }
        self.scanned_to = self.scanned_to.max(bucket);
        if has_rows {
            self.open.insert(bucket);
        } else {
            self.open.remove(&bucket);
        }
        self.cursor = self.open.first().copied().unwrap_or(self.scanned_to + 1).max(self.cursor);
    }

    pub fn cursor(&self) -> i64 {
        self.cursor
    }
}

/// One timer of one process instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRef {
    pub tenant: String,
    pub process: String,
    pub correlation: String,
    pub timer: Timer,
}

/// A due timer as read, with its bucket and the lease it had.
#[derive(Debug, Clone)]
pub struct DueTimer {
    pub timer: TimerRef,
    pub bucket: i64,
    pub claimed_until_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("timer store: {0}")]
pub struct TimerError(pub String);

fn timer_err(e: impl std::fmt::Display) -> TimerError {
    TimerError(e.to_string())
}

pub trait TimerStore: Send + Sync {
    /// Creates or re-creates a timer (idempotent), set at `now_ms`.
    fn set(&self, timer: &TimerRef, now_ms: i64) -> impl Future<Output = Result<(), TimerError>> + Send;
    /// Removes a timer wherever it was put (idempotent).
    fn cancel(&self, timer: &TimerRef) -> impl Future<Output = Result<(), TimerError>> + Send;
    /// Timers of `tenant` due at `now_ms` whose lease ran out (none claimed
    /// them, or their claimer let them go), oldest first, at most `limit`.
    fn due(
        &self,
        tenant: &str,
        now_ms: i64,
        limit: usize,
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
    index: PreparedStatement,
    find: PreparedStatement,
    delete: PreparedStatement,
    unindex: PreparedStatement,
    select_due: PreparedStatement,
    claim: PreparedStatement,
    stage: PreparedStatement,
    create_cursor: PreparedStatement,
    read_cursor: PreparedStatement,
    move_cursor: PreparedStatement,
    /// Tenants whose cursor row is known to exist.
    cursors: Mutex<HashSet<String>>,
    /// This instance's view of each tenant's buckets.
    scans: tokio::sync::Mutex<HashMap<String, BucketScan>>,
}

impl CqlTimers {
    pub async fn new(session: Arc<Session>) -> Result<Self, TimerError> {
        let prepare = |cql: &'static str| {
            let session = session.clone();
            async move { session.prepare(cql).await.map_err(timer_err) }
        };
        Ok(Self {
            insert: prepare(
                "INSERT INTO process_timer_buckets (tenant, bucket, due_at, process, correlation, timer_id, claimed_by, claimed_until) \
                 VALUES (?, ?, ?, ?, ?, ?, '', ?)",
            )
            .await?,
            index: prepare(
                "INSERT INTO process_timer_index (tenant, process, correlation, timer_id, due_at, bucket) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .await?,
            find: prepare(
                "SELECT bucket FROM process_timer_index WHERE tenant = ? AND process = ? AND correlation = ? AND timer_id = ? AND due_at = ?",
            )
            .await?,
            delete: prepare(
                "DELETE FROM process_timer_buckets WHERE tenant = ? AND bucket = ? AND due_at = ? AND process = ? AND correlation = ? AND timer_id = ?",
            )
            .await?,
            unindex: prepare(
                "DELETE FROM process_timer_index WHERE tenant = ? AND process = ? AND correlation = ? AND timer_id = ? AND due_at = ?",
            )
            .await?,
            select_due: prepare(
                "SELECT due_at, process, correlation, timer_id, claimed_until FROM process_timer_buckets \
                 WHERE tenant = ? AND bucket = ? AND due_at <= ?",
            )
            .await?,
            claim: prepare(
                "UPDATE process_timer_buckets SET claimed_by = ?, claimed_until = ? \
                 WHERE tenant = ? AND bucket = ? AND due_at = ? AND process = ? AND correlation = ? AND timer_id = ? IF claimed_until = ?",
            )
            .await?,
            stage: prepare(
                "INSERT INTO process_instances (tenant, process, correlation, stage, updated_at) VALUES (?, ?, ?, ?, ?)",
            )
            .await?,
            create_cursor: prepare("INSERT INTO process_timer_cursor (tenant, bucket) VALUES (?, ?) IF NOT EXISTS").await?,
            read_cursor: prepare("SELECT bucket FROM process_timer_cursor WHERE tenant = ?").await?,
            move_cursor: prepare("UPDATE process_timer_cursor SET bucket = ? WHERE tenant = ?").await?,
            cursors: Mutex::new(HashSet::new()),
            scans: tokio::sync::Mutex::new(HashMap::new()),
            session,
        })
    }

    /// Makes sure the tenant has a cursor, at or before any bucket a timer
    /// set from now on can be put in.
    async fn ensure_cursor(&self, tenant: &str, now_ms: i64) -> Result<(), TimerError> {
        if self.cursors.lock().unwrap_or_else(|e| e.into_inner()).contains(tenant) {
            return Ok(());
        }
        let first = bucket_of(now_ms - SETTLE_MS);
        self.session.execute_unpaged(&self.create_cursor, (tenant, first)).await.map_err(timer_err)?;
        self.cursors.lock().unwrap_or_else(|e| e.into_inner()).insert(tenant.to_owned());
        Ok(())
    }

    async fn stored_cursor(&self, tenant: &str) -> Result<Option<i64>, TimerError> {
        let result = self.session.execute_unpaged(&self.read_cursor, (tenant,)).await.map_err(timer_err)?;
        let rows = result.into_rows_result().map_err(timer_err)?;
        Ok(rows.maybe_first_row::<(Option<i64>,)>().map_err(timer_err)?.and_then(|(b,)| b))
    }

    /// The rows of one bucket due at `now_ms`.
    async fn read_bucket(&self, tenant: &str, bucket: i64, now_ms: i64) -> Result<Vec<DueTimer>, TimerError> {
        let pager = self
            .session
            .execute_iter(self.select_due.clone(), (tenant, bucket, CqlTimestamp(now_ms)))
            .await
            .map_err(timer_err)?;
        let mut rows =
            pager.rows_stream::<(CqlTimestamp, String, String, String, Option<CqlTimestamp>)>().map_err(timer_err)?;
        let mut out = Vec::new();
        while let Some((due_at, process, correlation, timer_id, claimed_until)) =
            rows.try_next().await.map_err(timer_err)?
        {
            out.push(DueTimer {
                timer: TimerRef {
                    tenant: tenant.to_owned(),
                    process,
                    correlation,
                    timer: Timer { id: timer_id, due_at_ms: due_at.0 },
                },
                bucket,
                claimed_until_ms: claimed_until.map_or(0, |t| t.0),
            });
        }
        Ok(out)
    }
}

impl TimerStore for CqlTimers {
    async fn set(&self, t: &TimerRef, now_ms: i64) -> Result<(), TimerError> {
        self.ensure_cursor(&t.tenant, now_ms).await?;
        let due = CqlTimestamp(t.timer.due_at_ms);
        let bucket = bucket_for(t.timer.due_at_ms, now_ms);
        // The index first: a row a cancel could not find would fire anyway.
        let index = (&t.tenant, &t.process, &t.correlation, &t.timer.id, due, bucket);
        self.session.execute_unpaged(&self.index, index).await.map_err(timer_err)?;
        let row = (&t.tenant, bucket, due, &t.process, &t.correlation, &t.timer.id, CqlTimestamp(0));
        self.session.execute_unpaged(&self.insert, row).await.map_err(timer_err)?;
        Ok(())
    }

    async fn cancel(&self, t: &TimerRef) -> Result<(), TimerError> {
        let due = CqlTimestamp(t.timer.due_at_ms);
        let key = (&t.tenant, &t.process, &t.correlation, &t.timer.id, due);
        let result = self.session.execute_unpaged(&self.find, key).await.map_err(timer_err)?;
        let rows = result.into_rows_result().map_err(timer_err)?;
        // More than one bucket when setting it was redone at another time.
        let buckets: Vec<i64> = rows
            .rows::<(i64,)>()
            .map_err(timer_err)?
            .map(|r| r.map(|(b,)| b))
            .collect::<Result<_, _>>()
            .map_err(timer_err)?;
        for bucket in buckets {
            let row = (&t.tenant, bucket, due, &t.process, &t.correlation, &t.timer.id);
            self.session.execute_unpaged(&self.delete, row).await.map_err(timer_err)?;
        }
        self.session.execute_unpaged(&self.unindex, key).await.map_err(timer_err)?;
        Ok(())
    }

    async fn due(&self, tenant: &str, now_ms: i64, limit: usize) -> Result<Vec<DueTimer>, TimerError> {
        let mut scans = self.scans.lock().await;
        let scan = match scans.get_mut(tenant) {
            Some(scan) => scan,
            None => {
                // No cursor: no timer was ever set for the tenant.
                let Some(cursor) = self.stored_cursor(tenant).await? else { return Ok(Vec::new()) };
                scans.entry(tenant.to_owned()).or_insert_with(|| BucketScan::new(cursor))
            }
        };
        let before = scan.cursor();
        let mut due = Vec::new();
        for bucket in scan.plan(now_ms) {
            let rows = self.read_bucket(tenant, bucket, now_ms).await?;
            scan.read(bucket, !rows.is_empty(), now_ms);
            due.extend(rows.into_iter().filter(|r| r.claimed_until_ms <= now_ms));
            if due.len() >= limit {
                break;
            }
        }
        due.truncate(limit);
        if scan.cursor() > before {
            self.session.execute_unpaged(&self.move_cursor, (scan.cursor(), tenant)).await.map_err(timer_err)?;
        }
        Ok(due)
    }

    async fn claim(&self, due: &DueTimer, instance: &str, until_ms: i64) -> Result<bool, TimerError> {
        let t = &due.timer;
        let values = (
            instance,
            CqlTimestamp(until_ms),
            &t.tenant,
            due.bucket,
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
    /// Timers due within [`PENDING_HORIZON_MS`].
    pub timers_pending: i64,
    /// Due time of the oldest due timer, ms since the epoch.
    pub oldest_due_ms: Option<i64>,
}

/// How far ahead `sluice status` counts pending timers (an hour: the
/// buckets up to then, not the whole future).
pub const PENDING_HORIZON_MS: i64 = 3_600_000;

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
    let cursor = session
        .query_unpaged("SELECT bucket FROM process_timer_cursor WHERE tenant = ?", (tenant,))
        .await
        .map_err(timer_err)?
        .into_rows_result()
        .map_err(timer_err)?
        .maybe_first_row::<(Option<i64>,)>()
        .map_err(timer_err)?
        .and_then(|(b,)| b);
    let Some(cursor) = cursor else { return Ok(out) };
    let buckets: Vec<i64> = (cursor..=bucket_of(now_ms + PENDING_HORIZON_MS)).collect();
    for chunk in buckets.chunks(100) {
        let rows = session
            .query_unpaged(
                "SELECT due_at, process FROM process_timer_buckets WHERE tenant = ? AND bucket IN ?",
                (tenant, chunk.to_vec()),
            )
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
            } else if due_at.0 <= now_ms + PENDING_HORIZON_MS {
                out.timers_pending += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = BUCKET_MS;

    #[test]
    fn a_timer_decided_late_goes_to_the_bucket_of_the_moment_it_is_set() {
        assert_eq!(bucket_for(5 * W + 1, 2 * W), 5, "due later: its due time's bucket");
        assert_eq!(bucket_for(2 * W, 7 * W + 3), 7, "due already: the bucket being read now");
        assert_eq!(bucket_of(-1), -1);
    }

    #[test]
    fn a_settled_bucket_read_empty_is_never_read_again_and_one_with_rows_is() {
        let mut scan = BucketScan::new(100);
        let now = 110 * W + SETTLE_MS + 5; // buckets up to 109 have settled
        assert_eq!(scan.plan(now), (100..=113).collect::<Vec<_>>());
        for b in 100..=113 {
            scan.read(b, b == 103 || b == 112, now);
        }
        assert_eq!(scan.cursor(), 103, "empty settled buckets before the first with rows are passed");
        assert_eq!(scan.plan(now + W), [103, 110, 111, 112, 113, 114], "103 holds rows; 110 onwards new or unsettled");
        scan.read(103, false, now + W);
        for b in 110..=114 {
            scan.read(b, false, now + W);
        }
        assert_eq!(scan.cursor(), 111, "110 settled and read empty");
        assert_eq!(scan.plan(now + W), [111, 112, 113, 114]);
    }

    #[test]
    fn a_long_pause_is_caught_up_a_thousand_buckets_a_poll() {
        let scan = BucketScan::new(0);
        let plan = scan.plan(5_000 * W);
        assert_eq!(plan.len(), 1_000);
        assert_eq!(plan.first(), Some(&0));
    }
}
