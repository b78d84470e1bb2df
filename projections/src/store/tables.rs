//! The read-model tables of one projection version: created on first use,
//! statements prepared once, writes with the stream version as timestamp.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlDate, CqlTimestamp, CqlValue};
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
    write_sales_slot: PreparedStatement,
    select_sales_slot: PreparedStatement,
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
            write_sales_slot: prepare(format!(
                "INSERT INTO {p}_sales_by_day_v{v} (tenant, day, slot, orders, total_cents, counted_to) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_sales_slot: prepare(format!(
                "SELECT orders, total_cents, counted_to FROM {p}_sales_by_day_v{v} \
                 WHERE tenant = ? AND day = ? AND slot = ?"
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
                "SELECT orders, total_cents FROM {p}_sales_by_day_v{v} WHERE tenant = ? AND day = ?"
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

    /// Applies one write. It uses the event's stream version as its write
    /// timestamp, so repeating it changes nothing.
    pub async fn write(&self, tenant: &str, write: &Write) -> Result<(), ReadModelError> {
        self.write_rows(&[self.row(tenant, write)?]).await
    }

    /// The statement and values of one write. A sale written this way is a
    /// slot of its own (`order <id> <movement>`), for a record applied out of
    /// its partition's order; in order, a batch counts its sales into their
    /// partition's running total instead ([`Tables::tally`]).
    pub fn row<'t>(&'t self, tenant: &str, write: &Write) -> Result<Row<'t>, ReadModelError> {
        let text = |s: &str| Some(CqlValue::Text(s.to_owned()));
        let big = |n: i64| Some(CqlValue::BigInt(n));
        let time = |ms: i64| Some(CqlValue::Timestamp(CqlTimestamp(ms)));
        let ts = big(write.version());
        let (statement, table, partition, values) = match write {
            Write::OrderSubmitted { order_id, customer_id, currency, lines, total_cents, at_ms, version } => {
                let lines = serde_json::to_string(lines).map_err(rm_err)?;
                let values = vec![
                    text(tenant),
                    text(order_id),
                    text(customer_id),
                    text(currency),
                    Some(CqlValue::Text(lines)),
                    big(*total_cents),
                    big(*version),
                    time(*at_ms),
                    time(*at_ms),
                    ts,
                ];
                (&self.insert_order, Table::ById, order_id.clone(), values)
            }
            Write::OrderStatus { order_id, status, at_ms, version, cancel_reason, shipment } => {
                let (carrier, tracking) = match shipment {
                    Some((c, t)) => (text(c), text(t)),
                    None => (None, None),
                };
                let values = vec![
                    ts,
                    text(status),
                    big(*version),
                    time(*at_ms),
                    cancel_reason.as_deref().and_then(text),
                    carrier,
                    tracking,
                    text(tenant),
                    text(order_id),
                ];
                (&self.update_order, Table::ById, order_id.clone(), values)
            }
            Write::CustomerOrder { customer_id, submitted_at_ms, order_id, status, currency_and_total, version } => {
                match currency_and_total {
                    Some((currency, total)) => {
                        let values = vec![
                            text(tenant),
                            text(customer_id),
                            time(*submitted_at_ms),
                            text(order_id),
                            text(status),
                            text(currency),
                            big(*total),
                            big(*version),
                            ts,
                        ];
                        (&self.insert_customer_order, Table::ByCustomer, customer_id.clone(), values)
                    }
                    None => {
                        let values = vec![
                            ts,
                            text(status),
                            big(*version),
                            text(tenant),
                            text(customer_id),
                            time(*submitted_at_ms),
                            text(order_id),
                        ];
                        (&self.update_customer_order, Table::ByCustomer, customer_id.clone(), values)
                    }
                }
            }
            Write::Sale { day_ms, order_id, movement, orders, total_cents, .. } => {
                let day = cql_date(*day_ms);
                let values = vec![
                    text(tenant),
                    Some(CqlValue::Date(day)),
                    text(&format!("order {order_id} {movement}")),
                    big(i64::from(*orders)),
                    big(*total_cents),
                    None,
                    ts,
                ];
                (&self.write_sales_slot, Table::SalesByDay, day.0.to_string(), values)
            }
        };
        Ok(Row { statement, partition: (table, tenant.to_owned(), partition), values })
    }

    /// The rows that count a batch's sales, each partition's records in
    /// offset order: per (tenant, day, events partition) the running total
    /// is read, the sales of records past its `counted_to` are added, and it
    /// is written back stamped with the last one's offset (also its write
    /// timestamp). A batch applied again finds its records counted and adds
    /// nothing (it writes back the total it read: that total may come from a
    /// write that failed after reaching only some replicas, and must stand at
    /// the write consistency before later batches build on it); of two
    /// writers of one slot (a replay beside the live projector, an owner
    /// that lost its partition), each writes the total up to its own stamp,
    /// and the one further along wins.
    pub async fn tally(&self, sales: &[Sale]) -> Result<Vec<Row<'_>>, ReadModelError> {
        let mut slots: HashMap<(&str, u32, i32), Vec<&Sale>> = HashMap::new();
        for sale in sales {
            slots.entry((sale.tenant.as_str(), sale.day.0, sale.partition)).or_default().push(sale);
        }
        // Boxed with their lifetime named, as in `write_rows`.
        let counted: Vec<BoxFuture<'_, Result<Row<'_>, ReadModelError>>> = slots
            .into_iter()
            .map(|((tenant, day, partition), sales)| -> BoxFuture<'_, _> {
                Box::pin(self.count_slot(tenant, CqlDate(day), partition, sales))
            })
            .collect();
        futures::stream::iter(counted).buffer_unordered(PARTITIONS_IN_FLIGHT).try_collect().await
    }

    /// The row that counts `sales` into the running total of `partition`
    /// on `day` (the total as read when they are all counted already).
    async fn count_slot(
        &self,
        tenant: &str,
        day: CqlDate,
        partition: i32,
        sales: Vec<&Sale>,
    ) -> Result<Row<'_>, ReadModelError> {
        let slot = format!("partition {partition}");
        let rows = self
            .session
            .execute_unpaged(&self.select_sales_slot, (tenant, day, &slot))
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let (mut orders, mut total, counted_to) = match rows
            .maybe_first_row::<(Option<i64>, Option<i64>, Option<i64>)>()
            .map_err(rm_err)?
        {
            Some((orders, total, counted_to)) => (orders.unwrap_or(0), total.unwrap_or(0), counted_to.unwrap_or(-1)),
            None => (0, 0, -1),
        };
        let mut last = counted_to;
        for sale in sales.into_iter().filter(|s| s.offset > counted_to) {
            orders += sale.orders;
            total += sale.total_cents;
            last = last.max(sale.offset);
        }
        let values = vec![
            Some(CqlValue::Text(tenant.to_owned())),
            Some(CqlValue::Date(day)),
            Some(CqlValue::Text(slot)),
            Some(CqlValue::BigInt(orders)),
            Some(CqlValue::BigInt(total)),
            Some(CqlValue::BigInt(last)),
            Some(CqlValue::BigInt(last)),
        ];
        let partition = (Table::SalesByDay, tenant.to_owned(), day.0.to_string());
        Ok(Row { statement: &self.write_sales_slot, partition, values })
    }

    /// Writes rows: those of one partition together, in unlogged batches of
    /// at most [`ROWS_PER_BATCH`] (one round trip, one mutation of the
    /// partition), partitions concurrently. Each row keeps its own write
    /// timestamp, so a batch applied twice changes nothing.
    pub async fn write_rows(&self, rows: &[Row<'_>]) -> Result<(), ReadModelError> {
        let mut by_partition: HashMap<&(Table, String, String), Vec<&Row<'_>>> = HashMap::new();
        for row in rows {
            by_partition.entry(&row.partition).or_default().push(row);
        }
        let chunks: Vec<&[&Row<'_>]> = by_partition.values().flat_map(|rows| rows.chunks(ROWS_PER_BATCH)).collect();
        // Boxed with their lifetime named: a caller's Send future cannot
        // state it for closure futures in stream combinators.
        let writes: Vec<BoxFuture<'_, Result<(), ReadModelError>>> =
            chunks.into_iter().map(|chunk| -> BoxFuture<'_, _> { Box::pin(self.write_chunk(chunk)) }).collect();
        futures::stream::iter(writes).buffer_unordered(PARTITIONS_IN_FLIGHT).try_collect::<Vec<()>>().await.map(drop)
    }

    async fn write_chunk(&self, chunk: &[&Row<'_>]) -> Result<(), ReadModelError> {
        if let [row] = chunk {
            return self.session.execute_unpaged(row.statement, &row.values).await.map(drop).map_err(rm_err);
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for row in chunk {
            batch.append_statement(row.statement.clone());
        }
        let values: Vec<&Vec<Option<CqlValue>>> = chunk.iter().map(|r| &r.values).collect();
        self.session.batch(&batch, values).await.map(drop).map_err(rm_err)
    }
}

/// Rows of one partition sent in one batch at most.
pub const ROWS_PER_BATCH: usize = 32;

/// Partitions written at once.
const PARTITIONS_IN_FLIGHT: usize = 32;

/// The tables of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    ById,
    ByCustomer,
    SalesByDay,
}

/// A sale a record makes, to be counted in its partition's running total,
/// and where the record is in its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub tenant: String,
    pub day: CqlDate,
    pub partition: i32,
    pub offset: i64,
    pub orders: i64,
    pub total_cents: i64,
}

impl Sale {
    /// The sale of `write`, if it is one ([`Write::Sale`]), made by the
    /// record at `offset` of `partition`.
    pub fn of(tenant: &str, partition: i32, offset: i64, write: &Write) -> Option<Self> {
        match write {
            Write::Sale { day_ms, orders, total_cents, .. } => Some(Self {
                tenant: tenant.to_owned(),
                day: cql_date(*day_ms),
                partition,
                offset,
                orders: i64::from(*orders),
                total_cents: *total_cents,
            }),
            _ => None,
        }
    }
}

/// One write ready to send: its statement, the partition it lands in
/// (table, tenant, key), and its values (the write timestamp last or first,
/// as the statement has it).
#[derive(Debug)]
pub struct Row<'t> {
    statement: &'t PreparedStatement,
    partition: (Table, String, String),
    values: Vec<Option<CqlValue>>,
}
