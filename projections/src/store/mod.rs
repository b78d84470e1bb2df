//! Read models in the CQL store: the queries the edge serves and the tables
//! projections write. Reads touch only the CQL store, so they keep answering
//! while RabbitMQ, Kafka and the processors are down.
//!
//! - [`versions`]: which table version serves reads; the atomic switch.
//! - [`tables`]: one version's tables of any projection: creation and the
//!   CQL of its writes.

pub mod tables;
pub mod versions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde::Serialize;
use serde_json::Value;
use sluice_streams::prepared::prepare_read;
use tokio::sync::Mutex;

use self::tables::cql_date;
use self::versions::Versions;
use crate::orders::Orders;
use crate::patients::{self, OnboardingView, Patients, Step};
use crate::projection::{table_name, Projection};

/// The next offset to apply, per (topic, partition).
pub type Offsets = HashMap<(String, i32), i64>;

#[derive(Debug, thiserror::Error)]
#[error("read model store: {0}")]
pub struct ReadModelError(pub String);

pub(crate) fn rm_err(e: impl std::fmt::Display) -> ReadModelError {
    ReadModelError(e.to_string())
}

impl From<sluice_streams::StreamsError> for ReadModelError {
    fn from(e: sluice_streams::StreamsError) -> Self {
        ReadModelError(e.0)
    }
}

/// How long readers trust their idea of the active version.
const ACTIVE_VERSION_TTL: Duration = Duration::from_millis(500);

/// Days of one `/sales/daily` request read at once.
const DAYS_IN_FLIGHT: usize = 16;

/// An order as clients read it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderView {
    pub order_id: String,
    pub customer_id: Option<String>,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub lines: Value,
    pub total_cents: Option<i64>,
    pub version: Option<i64>,
    pub submitted_at: Option<String>,
    pub updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

/// One order in a customer's list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerOrderView {
    pub order_id: String,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub total_cents: Option<i64>,
    pub submitted_at: Option<String>,
    pub version: Option<i64>,
}

/// A page of a list, with the cursor of the next page if there is one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Sales of one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaySales {
    pub day: String,
    pub orders: i64,
    pub total_cents: i64,
}

/// An operation as clients read it (the row the processors wrote).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationRow {
    pub status: String,
    pub command_type: Option<String>,
    pub source: Option<String>,
    pub command_id: Option<String>,
    pub events: Option<Value>,
    pub error: Option<String>,
    pub updated_at: Option<String>,
    /// Processing attempts so far, while `processing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// The processor instance that wrote the record.
    pub handled_by: Option<String>,
    /// A dead-lettered command that ops sent back is a new attempt with an
    /// operation of its own (this one keeps its answer): its URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried_as: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("bad cursor")]
    BadCursor,
    #[error(transparent)]
    Store(#[from] ReadModelError),
}

fn rfc3339(ts: Option<CqlTimestamp>) -> Option<String> {
    ts.and_then(|t| chrono::DateTime::from_timestamp_millis(t.0)).map(|t| t.to_rfc3339())
}

type OrderRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<String>,
    Option<String>,
);

type OpRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

/// The queries of one version of the orders projection.
struct OrderReads {
    select_order: PreparedStatement,
    select_customer_orders: PreparedStatement,
    select_sales_day: PreparedStatement,
}

impl OrderReads {
    async fn open(session: &Session, orders: &Orders, version: i32) -> Result<Self, ReadModelError> {
        tables::create(session, orders.name(), version, orders.tables()).await?;
        let table = |t: &str| table_name(orders.name(), t, version);
        let (by_id, by_customer, sales) = (table("by_id"), table("by_customer"), table("sales_by_day"));
        Ok(Self {
            select_order: prepare_read(
                session,
                format!(
                    "SELECT order_id, customer_id, status, currency, lines, total_cents, version, submitted_at, \
                     updated_at, carrier, tracking_number, cancel_reason FROM {by_id} WHERE tenant = ? AND order_id = ?"
                ),
            )
            .await
            .map_err(rm_err)?,
            select_customer_orders: prepare_read(
                session,
                format!(
                    "SELECT order_id, status, currency, total_cents, submitted_at, version FROM {by_customer} \
                     WHERE tenant = ? AND customer_id = ?"
                ),
            )
            .await
            .map_err(rm_err)?,
            select_sales_day: prepare_read(
                session,
                format!("SELECT orders, total_cents FROM {sales} WHERE tenant = ? AND day = ?"),
            )
            .await
            .map_err(rm_err)?,
        })
    }
}

pub struct ReadModels {
    session: Arc<Session>,
    /// The orders projection (its name: key of its version row, prefix of
    /// its tables).
    orders: Orders,
    patients: Patients,
    versions: Versions,
    order_reads: Mutex<HashMap<i32, Arc<OrderReads>>>,
    /// The patients query of each version.
    patient_reads: Mutex<HashMap<i32, PreparedStatement>>,
    /// The active version of each projection, and when it was read.
    active: Mutex<HashMap<String, (Instant, i32)>>,
    select_operation: PreparedStatement,
    select_offsets: PreparedStatement,
}

impl ReadModels {
    /// The read models of the projections `config` names.
    pub async fn new(session: Arc<Session>, config: &crate::ProjectorConfig) -> Result<Self, ReadModelError> {
        for projection in [&config.name, &config.patients_name] {
            if projection.is_empty() || !projection.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ReadModelError(format!(
                    "projection name {projection:?} must be letters, digits and underscores"
                )));
            }
        }
        if config.name == config.patients_name {
            return Err(ReadModelError(format!(
                "the orders and patients projections are both named {:?}",
                config.name
            )));
        }
        let select_operation = prepare_read(
            &session,
            "SELECT status, command_type, source, command_id, events, error, updated_at, attempts, handled_by, \
                 retried_as FROM operations WHERE tenant = ? AND operation_id = ?",
        )
        .await
        .map_err(rm_err)?;
        let select_offsets = prepare_read(
            &session,
            "SELECT topic, partition, next_offset FROM projection_offsets WHERE projection = ? AND version = ?",
        )
        .await
        .map_err(rm_err)?;
        Ok(Self {
            versions: Versions::new(session.clone()),
            orders: Orders { name: config.name.clone() },
            patients: Patients { name: config.patients_name.clone() },
            session,
            order_reads: Mutex::new(HashMap::new()),
            patient_reads: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            select_operation,
            select_offsets,
        })
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The orders projection.
    pub fn orders(&self) -> &Orders {
        &self.orders
    }

    /// The patients projection.
    pub fn patients(&self) -> &Patients {
        &self.patients
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// The orders projection's version serving reads.
    pub async fn active_version(&self) -> Result<i32, ReadModelError> {
        self.active_version_of(self.orders.name()).await
    }

    /// A projection's version serving reads, re-read at most every half second.
    pub async fn active_version_of(&self, projection: &str) -> Result<i32, ReadModelError> {
        if let Some((at, version)) = self.active.lock().await.get(projection) {
            if at.elapsed() < ACTIVE_VERSION_TTL {
                return Ok(*version);
            }
        }
        let version = self.versions.get(projection).await?.active;
        self.active.lock().await.insert(projection.to_owned(), (Instant::now(), version));
        Ok(version)
    }

    /// The queries of the active orders version (its tables created and the
    /// queries prepared on first use).
    async fn active_order_reads(&self) -> Result<Arc<OrderReads>, ReadModelError> {
        let version = self.active_version().await?;
        let mut reads = self.order_reads.lock().await;
        if let Some(r) = reads.get(&version) {
            return Ok(r.clone());
        }
        let r = Arc::new(OrderReads::open(&self.session, &self.orders, version).await?);
        reads.insert(version, r.clone());
        Ok(r)
    }

    pub async fn order(&self, tenant: &str, order_id: &str) -> Result<Option<OrderView>, ReadModelError> {
        let t = self.active_order_reads().await?;
        let rows = self
            .session
            .execute_unpaged(&t.select_order, (tenant, order_id))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let Some(row) = rows.maybe_first_row::<OrderRow>().map_err(rm_err)? else {
            return Ok(None);
        };
        let (
            order_id,
            customer_id,
            status,
            currency,
            lines,
            total_cents,
            version,
            submitted_at,
            updated_at,
            carrier,
            tracking_number,
            cancel_reason,
        ) = row;
        // A status written before its submission (a rebuild that started
        // after it) leaves a row without customer: not an order to show.
        if customer_id.is_none() {
            return Ok(None);
        }
        Ok(Some(OrderView {
            order_id,
            customer_id,
            status,
            currency,
            lines: lines.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or(Value::Null),
            total_cents,
            version,
            submitted_at: rfc3339(submitted_at),
            updated_at: rfc3339(updated_at),
            carrier,
            tracking_number,
            cancel_reason,
        }))
    }

    /// A customer's orders, newest first, `limit` per page.
    pub async fn customer_orders(
        &self,
        tenant: &str,
        customer_id: &str,
        limit: i32,
        cursor: Option<&str>,
    ) -> Result<Page<CustomerOrderView>, QueryError> {
        let t = self.active_order_reads().await?;
        let paging = match cursor {
            Some(c) => {
                let bytes =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).map_err(|_| QueryError::BadCursor)?;
                PagingState::new_from_raw_bytes(bytes)
            }
            None => PagingState::start(),
        };
        let mut statement = t.select_customer_orders.clone();
        statement.set_page_size(limit.clamp(1, 500));
        let (result, next) =
            self.session.execute_single_page(&statement, (tenant, customer_id), paging).await.map_err(rm_err)?;
        let rows = result.into_rows_result().map_err(rm_err)?;
        let items = rows
            .rows::<(String, Option<String>, Option<String>, Option<i64>, Option<CqlTimestamp>, Option<i64>)>()
            .map_err(rm_err)?
            .map(|r| {
                r.map(|(order_id, status, currency, total_cents, submitted_at, version)| CustomerOrderView {
                    order_id,
                    status,
                    currency,
                    total_cents,
                    submitted_at: rfc3339(submitted_at),
                    version,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(rm_err)?;
        let next_cursor = match next {
            PagingStateResponse::HasMorePages { state } => {
                // A full page says "more" even when it was the last: look
                // one row ahead, so the last page carries no cursor.
                let mut probe = t.select_customer_orders.clone();
                probe.set_page_size(1);
                let (ahead, _) = self
                    .session
                    .execute_single_page(&probe, (tenant, customer_id), state.clone())
                    .await
                    .map_err(rm_err)?;
                let more = ahead.into_rows_result().map_err(rm_err)?.rows_num() > 0;
                more.then(|| {
                    state.as_bytes_slice().map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b.as_ref()))
                })
                .flatten()
            }
            PagingStateResponse::NoMorePages => None,
        };
        Ok(Page { items, next_cursor })
    }

    /// Orders and totals per day, `from` to `to` inclusive (UTC days, given as
    /// milliseconds of any moment in the day). A day is a bounded read (its
    /// running totals, one per events partition); days are read concurrently.
    pub async fn daily_sales(&self, tenant: &str, from_ms: i64, to_ms: i64) -> Result<Vec<DaySales>, ReadModelError> {
        let t = self.active_order_reads().await?;
        let (first, last) = (from_ms.div_euclid(86_400_000), to_ms.div_euclid(86_400_000));
        let days: Vec<BoxFuture<'_, Result<DaySales, ReadModelError>>> =
            (first..=last).map(|day| -> BoxFuture<'_, _> { Box::pin(self.day_sales(&t, tenant, day)) }).collect();
        futures::stream::iter(days).buffered(DAYS_IN_FLIGHT).try_collect().await
    }

    /// One day's sales: the sum of its slots.
    async fn day_sales(&self, t: &OrderReads, tenant: &str, day: i64) -> Result<DaySales, ReadModelError> {
        let ms = day * 86_400_000;
        let rows = self
            .session
            .execute_unpaged(&t.select_sales_day, (tenant, cql_date(ms)))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let (mut orders, mut total) = (0i64, 0i64);
        for row in rows.rows::<(Option<i64>, Option<i64>)>().map_err(rm_err)? {
            let (o, c) = row.map_err(rm_err)?;
            orders += o.unwrap_or(0);
            total += c.unwrap_or(0);
        }
        let date = chrono::DateTime::from_timestamp_millis(ms).map(|d| d.date_naive().to_string()).unwrap_or_default();
        Ok(DaySales { day: date, orders, total_cents: total })
    }

    /// A patient's onboarding, from the patients projection's active version.
    pub async fn patient_onboarding(
        &self,
        tenant: &str,
        patient_id: &str,
    ) -> Result<Option<OnboardingView>, ReadModelError> {
        let name = self.patients.name();
        let version = self.active_version_of(name).await?;
        let select = {
            let mut reads = self.patient_reads.lock().await;
            match reads.get(&version) {
                Some(select) => select.clone(),
                None => {
                    tables::create(&self.session, name, version, self.patients.tables()).await?;
                    let table = table_name(name, patients::STEPS, version);
                    let select = prepare_read(
                        &self.session,
                        format!(
                            "SELECT version, event_id, step, detail, occurred_at FROM {table} \
                             WHERE tenant = ? AND patient_id = ?"
                        ),
                    )
                    .await
                    .map_err(rm_err)?;
                    reads.insert(version, select.clone());
                    select
                }
            }
        };
        let rows = self
            .session
            .execute_unpaged(&select, (tenant, patient_id))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let steps = rows
            .rows::<(i64, Option<String>, Option<String>, Option<String>, Option<CqlTimestamp>)>()
            .map_err(rm_err)?
            .map(|r| {
                r.map(|(version, event_id, step, detail, at)| {
                    let ms = at.map_or(0, |t| t.0);
                    Step {
                        version,
                        event_id: event_id.unwrap_or_default(),
                        step: step.unwrap_or_default(),
                        detail: detail.unwrap_or_default(),
                        occurred_at_ms: ms,
                        at: patients::rfc3339(ms),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(rm_err)?;
        Ok(patients::view_of(patient_id, steps))
    }

    pub async fn operation(&self, tenant: &str, operation_id: &str) -> Result<Option<OperationRow>, ReadModelError> {
        let result =
            self.session.execute_unpaged(&self.select_operation, (tenant, operation_id)).await.map_err(rm_err)?;
        let rows = result.into_rows_result().map_err(rm_err)?;
        let Some(row) = rows.maybe_first_row::<OpRow>().map_err(rm_err)? else {
            return Ok(None);
        };
        let (status, command_type, source, command_id, events, error, updated_at, attempts, handled_by, retried_as) =
            row;
        Ok(Some(OperationRow {
            status: status.unwrap_or_else(|| "processing".into()),
            command_type,
            source,
            command_id,
            events: events.and_then(|e| serde_json::from_str(&e).ok()),
            error,
            updated_at: rfc3339(updated_at),
            attempts,
            handled_by,
            retried_as: retried_as.map(|id| format!("/operations/{id}")),
        }))
    }

    /// Next offset to apply per (topic, partition) of the serving read
    /// models: the active versions of the orders and patients projections
    /// (their topics are apart).
    pub async fn applied_offsets(&self) -> Result<Offsets, ReadModelError> {
        let version = self.active_version().await?;
        let mut offsets = self.offsets_of(version).await?;
        let patients = self.patients.name();
        let patients_version = self.active_version_of(patients).await?;
        offsets.extend(self.offsets_of_projection(patients, patients_version).await?);
        Ok(offsets)
    }

    pub async fn offsets_of(&self, version: i32) -> Result<Offsets, ReadModelError> {
        self.offsets_of_projection(self.orders.name(), version).await
    }

    pub async fn offsets_of_projection(&self, projection: &str, version: i32) -> Result<Offsets, ReadModelError> {
        let rows = self
            .session
            .execute_unpaged(&self.select_offsets, (projection, version))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        rows.rows::<(String, i32, i64)>()
            .map_err(rm_err)?
            .map(|r| r.map(|(t, p, o)| ((t, p), o)).map_err(rm_err))
            .collect()
    }
}
