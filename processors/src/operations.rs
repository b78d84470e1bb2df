//! Operation records: what became of each command the edge accepted. The edge
//! reads them (`GET /operations/{id}`); only processors write them.
//!
//! A record is settled for good: every write carries a CQL write timestamp
//! ranked by its status ([`write_timestamp`]), so whatever order writes
//! arrive in (a late `processing` of a slow delivery, dead-letter
//! bookkeeping of a copy that did succeed), `succeeded` and `rejected`
//! outrank everything. Terminal answers come from the command journal, so a
//! command has one verdict; among its terminal writes the one of the newest
//! partition owner wins (its [`Order`]), so a fenced owner's late write
//! never shows.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::batch::BatchType;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde::Serialize;
use sluice_streams::group_commit::GroupCommit;
use sluice_streams::prepared::prepare_read;
use sluice_streams::replicas;

/// Where a produced event landed in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventPosition {
    #[serde(rename = "type")]
    pub event_type: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Processing { attempt: u32 },
    Succeeded(Vec<EventPosition>),
    Rejected(String),
    DeadLettered(String),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Processing { .. } => "processing",
            Status::Succeeded(_) => "succeeded",
            Status::Rejected(_) => "rejected",
            Status::DeadLettered(_) => "dead_lettered",
        }
    }

    /// Terminal answers, which a redelivered command must not change: its
    /// effect happened, or it never will under this operation. A command
    /// the processors will re-drive by themselves is not dead-lettered yet
    /// (its operation says `processing` meanwhile); one that ops send back
    /// is a new attempt with an operation of its own (`retried_as`).
    pub fn is_settled(name: &str) -> bool {
        matches!(name, "succeeded" | "rejected" | "dead_lettered")
    }
}

/// The command an operation is about.
#[derive(Debug, Clone, Copy)]
pub struct OperationRef<'a> {
    pub tenant: &'a str,
    pub operation_id: &'a str,
    pub command_type: &'a str,
    pub source: &'a str,
    pub command_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("operation store: {0}")]
pub struct OperationError(pub String);

/// Ranks terminal writes of one operation: the partition's ownership epoch,
/// then the owner's relay attempt (a retried transaction's positions win
/// over an aborted one's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    pub epoch: i64,
    pub attempt: u32,
}

impl Order {
    fn rank(self) -> i64 {
        (self.epoch.clamp(0, (1 << 19) - 1) << 32) + i64::from(self.attempt)
    }
}

pub trait OperationStore: Send + Sync {
    /// The recorded status name, if any.
    fn status(
        &self,
        tenant: &str,
        operation_id: &str,
    ) -> impl Future<Output = Result<Option<String>, OperationError>> + Send;
    /// The recorded status names of those of `operation_ids` that have a
    /// record (one read for them all).
    fn statuses(
        &self,
        tenant: &str,
        operation_ids: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, String>, OperationError>> + Send;
    /// Writes the record; `order` ranks terminal statuses (ignored for others).
    fn record(
        &self,
        op: OperationRef<'_>,
        status: &Status,
        order: Order,
    ) -> impl Future<Output = Result<(), OperationError>> + Send;
    /// Writes several records, each as [`OperationStore::record`] does, in
    /// as few requests as the store allows (the CQL store: with the other
    /// writes that come while one is in flight, [`GroupCommit`]).
    fn record_all(
        &self,
        records: &[(OperationRef<'_>, Status)],
        order: Order,
    ) -> impl Future<Output = Result<(), OperationError>> + Send {
        async move {
            futures::future::try_join_all(records.iter().map(|(op, status)| self.record(*op, status, order))).await?;
            Ok(())
        }
    }
}

/// Records in one write of several.
const RECORDS_PER_WRITE: usize = 32;

/// The values of one upsert of a record, owned: a group commit holds them.
type RecordValues = (
    String,
    String,
    &'static str,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    CqlTimestamp,
    Option<i32>,
    String,
    i64,
);

/// Microseconds in one rank of [`write_timestamp`] (2^52 µs ≈ 142 years:
/// wall-clock microseconds stay below it until 2112).
const RANK: i64 = 1 << 52;

/// The CQL write timestamp of a record written at `now_micros`: a status of
/// a higher rank always wins over a lower one, whatever the clocks say.
/// `processing` (rank 0) and `dead_lettered` (rank 1) take the latest
/// write; `succeeded` and `rejected` (rank 2) the highest `order`: the
/// newest owner's. (Once `dead_lettered`, an operation gets no verdict: the
/// owner answers its redeliveries as settled.)
pub fn write_timestamp(status: &Status, now_micros: i64, order: Order) -> i64 {
    let now = now_micros.clamp(0, RANK - 1);
    match status {
        Status::Processing { .. } => now,
        Status::DeadLettered(_) => RANK + now,
        Status::Succeeded(_) | Status::Rejected(_) => 2 * RANK + order.rank(),
    }
}

pub struct CqlOperationStore {
    session: Arc<Session>,
    /// Which processor instance wrote a record (`handled_by`), for ops.
    instance: String,
    select: PreparedStatement,
    upsert: PreparedStatement,
    /// [`OperationStore::record_all`]'s records: the rounds of a
    /// processor's partitions that come together share the requests.
    grouped: GroupCommit<RecordValues>,
    /// [`OperationStore::statuses`]: the rounds that come together share
    /// the reads.
    reads: GroupCommit<OperationKey, Arc<Statuses>>,
}

/// An operation by (tenant, operation id).
type OperationKey = (String, String);
/// What a group of status reads found (an operation without a record or a
/// status is absent).
type Statuses = HashMap<OperationKey, String>;

/// Operation ids per multi-partition read.
const IDS_PER_READ: usize = 64;

fn op_err(e: impl std::fmt::Display) -> OperationError {
    OperationError(e.to_string())
}

impl CqlOperationStore {
    pub async fn new(session: Arc<Session>, instance: &str) -> Result<Self, OperationError> {
        let select = prepare_read(&session, "SELECT status FROM operations WHERE tenant = ? AND operation_id = ?")
            .await
            .map_err(op_err)?;
        let select_many = prepare_read(
            &session,
            "SELECT operation_id, status FROM operations WHERE tenant = ? AND operation_id IN ?",
        )
        .await
        .map_err(op_err)?;
        let upsert = session
            .prepare(
                "INSERT INTO operations (tenant, operation_id, status, command_type, source, command_id, \
                 events, error, updated_at, attempts, handled_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 USING TIMESTAMP ?",
            )
            .await
            .map_err(op_err)?;
        let grouped = {
            let (session, upsert) = (session.clone(), upsert.clone());
            GroupCommit::new("operations", move |records| write_records(session.clone(), upsert.clone(), records))
        };
        let reads = {
            let (session, select_many) = (session.clone(), select_many.clone());
            GroupCommit::new("operation_reads", move |keys| read_statuses(session.clone(), select_many.clone(), keys))
        };
        Ok(Self { session, instance: instance.to_owned(), select, upsert, grouped, reads })
    }
}

/// Reads statuses: a tenant's operations share reads (one partition key
/// list, `IN`); each operation is read once, however often it is asked for.
async fn read_statuses(
    session: Arc<Session>,
    select_many: PreparedStatement,
    keys: Vec<OperationKey>,
) -> Result<Arc<Statuses>, String> {
    let mut by_tenant: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (tenant, id) in keys {
        if seen.insert((tenant.clone(), id.clone())) {
            by_tenant.entry(tenant).or_default().push(id);
        }
    }
    let (session, select_many) = (&session, &select_many);
    let reads = by_tenant.iter().flat_map(|(tenant, ids)| {
        ids.chunks(IDS_PER_READ).map(move |ids| async move {
            let result = session.execute_unpaged(select_many, (tenant, ids)).await.map_err(op_err)?;
            let rows = result.into_rows_result().map_err(op_err)?;
            let found = rows.rows::<(String, Option<String>)>().map_err(op_err)?;
            let found = found.map(|row| row.map_err(op_err)).collect::<Result<Vec<_>, _>>()?;
            Ok::<_, OperationError>((tenant, found))
        })
    });
    let mut statuses = Statuses::new();
    for (tenant, rows) in futures::future::try_join_all(reads).await.map_err(|e| e.to_string())? {
        statuses.extend(rows.into_iter().filter_map(|(id, status)| Some(((tenant.clone(), id), status?))));
    }
    Ok(Arc::new(statuses))
}

/// Writes records: those on the same replicas share a batch.
async fn write_records(
    session: Arc<Session>,
    upsert: PreparedStatement,
    records: Vec<RecordValues>,
) -> Result<(), String> {
    let cluster = session.get_cluster_state();
    let units = records.into_iter().map(|record| vec![record]);
    let batches = replicas::batches(units, RECORDS_PER_WRITE, |record| replicas::of(&cluster, &upsert, record));
    let writes = batches.into_iter().map(|values| {
        let (session, upsert) = (&session, &upsert);
        async move {
            if let [one] = values.as_slice() {
                return session.execute_unpaged(upsert, one).await.map(drop);
            }
            let batch = replicas::batch_of(BatchType::Unlogged, upsert, values.len());
            session.batch(&batch, values).await.map(drop)
        }
    });
    futures::future::try_join_all(writes).await.map_err(|e| e.to_string())?;
    Ok(())
}

impl OperationStore for CqlOperationStore {
    async fn status(&self, tenant: &str, operation_id: &str) -> Result<Option<String>, OperationError> {
        let result = self.session.execute_unpaged(&self.select, (tenant, operation_id)).await.map_err(op_err)?;
        let rows = result.into_rows_result().map_err(op_err)?;
        let row = rows.maybe_first_row::<(Option<String>,)>().map_err(op_err)?;
        Ok(row.and_then(|(status,)| status))
    }

    async fn statuses(&self, tenant: &str, operation_ids: &[&str]) -> Result<HashMap<String, String>, OperationError> {
        let keys = operation_ids.iter().map(|id| (tenant.to_owned(), (*id).to_owned())).collect();
        let Some(found) = self.reads.send(keys).await.map_err(op_err)? else { return Ok(HashMap::new()) };
        Ok(operation_ids
            .iter()
            .filter_map(|id| {
                let status = found.get(&(tenant.to_owned(), (*id).to_owned()))?;
                Some(((*id).to_owned(), status.clone()))
            })
            .collect())
    }

    async fn record(&self, op: OperationRef<'_>, status: &Status, order: Order) -> Result<(), OperationError> {
        self.session.execute_unpaged(&self.upsert, self.values(op, status, order)?).await.map_err(op_err)?;
        Ok(())
    }

    async fn record_all(&self, records: &[(OperationRef<'_>, Status)], order: Order) -> Result<(), OperationError> {
        let values =
            records.iter().map(|(op, status)| self.values(*op, status, order)).collect::<Result<Vec<_>, _>>()?;
        self.grouped.send(values).await.map(drop).map_err(op_err)
    }
}

impl CqlOperationStore {
    fn values(&self, op: OperationRef<'_>, status: &Status, order: Order) -> Result<RecordValues, OperationError> {
        let attempts = match status {
            Status::Processing { attempt } => Some(i32::try_from(*attempt).unwrap_or(i32::MAX)),
            _ => None,
        };
        let (events, error) = match status {
            Status::Processing { .. } => (None, None),
            Status::Succeeded(positions) => (Some(serde_json::to_string(positions).map_err(op_err)?), None),
            Status::Rejected(reason) | Status::DeadLettered(reason) => (None, Some(reason.clone())),
        };
        let now_micros = chrono::Utc::now().timestamp_micros();
        let now = CqlTimestamp(now_micros / 1_000);
        Ok((
            op.tenant.to_owned(),
            op.operation_id.to_owned(),
            status.name(),
            op.command_type.to_owned(),
            op.source.to_owned(),
            op.command_id.to_owned(),
            events,
            error,
            now,
            attempts,
            self.instance.clone(),
            write_timestamp(status, now_micros, order),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_answers_outrank_everything_and_the_newest_owner_wins() {
        let (early, late) = (1_764_000_000_000_000, 1_764_000_000_500_000);
        let ok = Status::Succeeded(vec![]);
        let dead = Status::DeadLettered("gave up".into());
        let busy = Status::Processing { attempt: 2 };
        let (first, retried, next_owner) =
            (Order { epoch: 3, attempt: 0 }, Order { epoch: 3, attempt: 1 }, Order { epoch: 4, attempt: 0 });
        let never = Order::default();
        assert!(write_timestamp(&ok, early, first) > write_timestamp(&busy, late, never), "a late processing loses");
        assert!(write_timestamp(&ok, early, first) > write_timestamp(&dead, late, never), "late bookkeeping loses");
        assert!(write_timestamp(&dead, early, never) > write_timestamp(&busy, late, never));
        assert!(
            write_timestamp(&ok, early, Order::default()) > write_timestamp(&dead, late, never),
            "a re-driven command may succeed"
        );
        assert!(
            write_timestamp(&ok, early, retried) > write_timestamp(&ok, late, first),
            "a retried relay's positions win"
        );
        assert!(
            write_timestamp(&ok, early, next_owner) > write_timestamp(&ok, late, retried),
            "a fenced owner's late write loses"
        );
        assert!(write_timestamp(&busy, late, never) > write_timestamp(&busy, early, never));
        assert!(write_timestamp(&dead, late, never) > write_timestamp(&dead, early, never));
    }
}
