//! The read-model tables of one projection version: created on first use,
//! statements prepared once, writes with the stream version as timestamp.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlDate, CqlTimestamp};
use sluice_schemas::cql;

use super::{rm_err, ReadModelError};
use crate::orders::{OrderSnapshot, Write};

/// CQL `date`: days since the epoch, offset by 2^31.
pub fn cql_date(ms: i64) -> CqlDate {
    let days = ms.div_euclid(86_400_000);
    CqlDate((days + (1i64 << 31)) as u32)
}

pub struct Tables {
    pub version: i32,
    pub(crate) session: Arc<Session>,
    insert_order: PreparedStatement,
    update_order: PreparedStatement,
    insert_customer_order: PreparedStatement,
    update_customer_order: PreparedStatement,
    insert_sale: PreparedStatement,
    pub(super) select_order: PreparedStatement,
    select_snapshot: PreparedStatement,
    pub(super) select_customer_orders: PreparedStatement,
    pub(super) select_sales_day: PreparedStatement,
}

impl Tables {
    /// Creates (if missing) and prepares the tables of `version`.
    pub async fn open(session: Arc<Session>, projection: &str, version: i32) -> Result<Self, ReadModelError> {
        for statement in cql::create_read_model_tables(projection, version) {
            session.query_unpaged(statement, ()).await.map_err(rm_err)?;
        }
        let (p, v) = (projection, version);
        let prepare = |text: String| {
            let session = session.clone();
            async move { session.prepare(text).await.map_err(rm_err) }
        };
        Ok(Self {
            version,
            insert_order: prepare(format!(
                "INSERT INTO {p}_by_id_v{v} (tenant, order_id, customer_id, status, currency, lines, total_cents, \
                 version, submitted_at, updated_at) VALUES (?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            update_order: prepare(format!(
                "UPDATE {p}_by_id_v{v} USING TIMESTAMP ? SET status = ?, version = ?, updated_at = ?, \
                 cancel_reason = ?, carrier = ?, tracking_number = ? WHERE tenant = ? AND order_id = ?"
            ))
            .await?,
            insert_customer_order: prepare(format!(
                "INSERT INTO {p}_by_customer_v{v} (tenant, customer_id, submitted_at, order_id, status, currency, \
                 total_cents, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            update_customer_order: prepare(format!(
                "UPDATE {p}_by_customer_v{v} USING TIMESTAMP ? SET status = ?, version = ? \
                 WHERE tenant = ? AND customer_id = ? AND submitted_at = ? AND order_id = ?"
            ))
            .await?,
            insert_sale: prepare(format!(
                "INSERT INTO {p}_daily_sales_v{v} (tenant, day, order_id, movement, orders, total_cents) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_order: prepare(format!(
                "SELECT order_id, customer_id, status, currency, lines, total_cents, version, submitted_at, \
                 updated_at, carrier, tracking_number, cancel_reason FROM {p}_by_id_v{v} WHERE tenant = ? AND order_id = ?"
            ))
            .await?,
            select_snapshot: prepare(format!(
                "SELECT customer_id, submitted_at, total_cents FROM {p}_by_id_v{v} WHERE tenant = ? AND order_id = ?"
            ))
            .await?,
            select_customer_orders: prepare(format!(
                "SELECT order_id, status, currency, total_cents, submitted_at, version FROM {p}_by_customer_v{v} \
                 WHERE tenant = ? AND customer_id = ?"
            ))
            .await?,
            select_sales_day: prepare(format!(
                "SELECT orders, total_cents FROM {p}_daily_sales_v{v} WHERE tenant = ? AND day = ?"
            ))
            .await?,
            session,
        })
    }

    /// The order as submitted, if this version has it.
    pub async fn snapshot(&self, tenant: &str, order_id: &str) -> Result<Option<OrderSnapshot>, ReadModelError> {
        let rows = self
            .session
            .execute_unpaged(&self.select_snapshot, (tenant, order_id))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let row = rows.maybe_first_row::<(Option<String>, Option<CqlTimestamp>, Option<i64>)>().map_err(rm_err)?;
        Ok(match row {
            Some((Some(customer_id), Some(submitted_at), Some(total_cents))) => {
                Some(OrderSnapshot { customer_id, submitted_at_ms: submitted_at.0, total_cents })
            }
            _ => None,
        })
    }

    /// Applies writes of one event. Each uses the event's stream version as
    /// its write timestamp, so repeating it changes nothing.
    pub async fn write(&self, tenant: &str, write: &Write) -> Result<(), ReadModelError> {
        let ts = write.version();
        let result = match write {
            Write::OrderSubmitted { order_id, customer_id, currency, lines, total_cents, at_ms, version } => {
                let lines = serde_json::to_string(lines).map_err(rm_err)?;
                let at = CqlTimestamp(*at_ms);
                self.session
                    .execute_unpaged(
                        &self.insert_order,
                        (tenant, order_id, customer_id, currency, lines, total_cents, version, at, at, ts),
                    )
                    .await
            }
            Write::OrderStatus { order_id, status, at_ms, version, cancel_reason, shipment } => {
                let (carrier, tracking) = match shipment {
                    Some((c, t)) => (Some(c.as_str()), Some(t.as_str())),
                    None => (None, None),
                };
                self.session
                    .execute_unpaged(
                        &self.update_order,
                        (
                            ts,
                            *status,
                            version,
                            CqlTimestamp(*at_ms),
                            cancel_reason,
                            carrier,
                            tracking,
                            tenant,
                            order_id,
                        ),
                    )
                    .await
            }
            Write::CustomerOrder { customer_id, submitted_at_ms, order_id, status, currency_and_total, version } => {
                let submitted_at = CqlTimestamp(*submitted_at_ms);
                match currency_and_total {
                    Some((currency, total)) => {
                        self.session
                            .execute_unpaged(
                                &self.insert_customer_order,
                                (tenant, customer_id, submitted_at, order_id, *status, currency, total, version, ts),
                            )
                            .await
                    }
                    None => {
                        self.session
                            .execute_unpaged(
                                &self.update_customer_order,
                                (ts, *status, version, tenant, customer_id, submitted_at, order_id),
                            )
                            .await
                    }
                }
            }
            Write::Sale { day_ms, order_id, movement, orders, total_cents, .. } => {
                self.session
                    .execute_unpaged(
                        &self.insert_sale,
                        (tenant, cql_date(*day_ms), order_id, *movement, orders, total_cents, ts),
                    )
                    .await
            }
        };
        result.map(drop).map_err(rm_err)
    }
}
