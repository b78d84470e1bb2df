//! The tables of one version of a projection, and the CQL of its writes:
//! tables created from the projection's [`Table`]s on first use, statements
//! prepared once per shape, rows of one partition sent in unlogged batches
//! (partitions concurrently), the event's stream version as write timestamp,
//! running totals counted once per record. A row's values are serialized
//! once, when it is made, checked against its statement's bind markers.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::cluster::ClusterState;
use scylla::frame::response::result::{ColumnSpec, ColumnType};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::{CellWriter, RowWriter, WrittenCellProof};
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlDate, CqlTimestamp, CqlValue};
use sluice_streams::prepared::prepare_read;
use sluice_streams::replicas;

use super::{rm_err, ReadModelError};
use crate::projection::{create_statements, table_name, Cell, MemoRead, Table, Write};

/// CQL `date` of the UTC day of a moment (milliseconds since the epoch):
/// days since the epoch, offset by 2^31.
pub fn cql_date(ms: i64) -> CqlDate {
    day_date(ms.div_euclid(86_400_000))
}

fn day_date(days: i64) -> CqlDate {
    CqlDate((days + (1i64 << 31)) as u32)
}

fn cql(cell: &Cell) -> Option<CqlValue> {
    match cell {
        Cell::Text(s) => Some(CqlValue::Text(s.clone())),
        Cell::BigInt(n) => Some(CqlValue::BigInt(*n)),
        Cell::Int(n) => Some(CqlValue::Int(*n)),
        Cell::Timestamp(ms) => Some(CqlValue::Timestamp(CqlTimestamp(*ms))),
        Cell::Date(days) => Some(CqlValue::Date(day_date(*days))),
        Cell::Null => None,
    }
}

/// A cell as the value of a bind marker, checked against its CQL type.
impl SerializeValue for Cell {
    fn serialize<'b>(
        &self,
        typ: &ColumnType,
        writer: CellWriter<'b>,
    ) -> Result<WrittenCellProof<'b>, SerializationError> {
        match self {
            Cell::Text(s) => s.as_str().serialize(typ, writer),
            Cell::BigInt(n) => n.serialize(typ, writer),
            Cell::Int(n) => n.serialize(typ, writer),
            Cell::Timestamp(ms) => CqlTimestamp(*ms).serialize(typ, writer),
            Cell::Date(days) => day_date(*days).serialize(typ, writer),
            Cell::Null => Ok(writer.set_null()),
        }
    }
}

fn cell(value: Option<CqlValue>) -> Cell {
    match value {
        Some(CqlValue::Text(s) | CqlValue::Ascii(s)) => Cell::Text(s),
        Some(CqlValue::BigInt(n)) => Cell::BigInt(n),
        Some(CqlValue::Int(n)) => Cell::Int(n),
        Some(CqlValue::Timestamp(t)) => Cell::Timestamp(t.0),
        Some(CqlValue::Date(d)) => Cell::Date(i64::from(d.0) - (1i64 << 31)),
        _ => Cell::Null,
    }
}

/// Creates the tables of one version of a projection, if missing.
pub async fn create(session: &Session, projection: &str, version: i32, tables: &[Table]) -> Result<(), ReadModelError> {
    for statement in create_statements(projection, version, tables) {
        session.query_unpaged(statement, ()).await.map_err(rm_err)?;
    }
    Ok(())
}

/// The tables of one version of a projection, as its writer uses them.
pub struct Tables {
    pub projection: String,
    pub version: i32,
    pub(crate) session: Arc<Session>,
    specs: &'static [Table],
    /// Statements by their text, prepared on first use.
    prepared: Mutex<HashMap<String, PreparedStatement>>,
    /// The insert statements by their shape (table and columns): a row's
    /// statement is found without spelling out its text (a rebuild makes
    /// tens of thousands of rows a second, of a few shapes).
    inserts: Mutex<Vec<Arc<InsertShape>>>,
}

/// An insert statement of [`Tables::inserts`].
struct InsertShape {
    table: &'static str,
    columns: Vec<&'static str>,
    statement: PreparedStatement,
}

/// Whether two names are the same; the names of a shape are the
/// projection's literals, so mostly the very same string.
fn same_name(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl Tables {
    /// Creates (if missing) the tables of `version` of `projection`.
    pub async fn open(
        session: Arc<Session>,
        projection: &str,
        version: i32,
        specs: &'static [Table],
    ) -> Result<Self, ReadModelError> {
        create(&session, projection, version, specs).await?;
        Ok(Self {
            projection: projection.to_owned(),
            version,
            session,
            specs,
            prepared: Mutex::new(HashMap::new()),
            inserts: Mutex::new(Vec::new()),
        })
    }

    fn spec(&self, table: &str) -> Result<&'static Table, ReadModelError> {
        self.specs
            .iter()
            .find(|t| t.name() == table)
            .ok_or_else(|| ReadModelError(format!("projection {} has no table {table}", self.projection)))
    }

    fn full_name(&self, table: &str) -> String {
        table_name(&self.projection, table, self.version)
    }

    async fn prepare(&self, text: String) -> Result<PreparedStatement, ReadModelError> {
        if let Some(statement) = self.prepared.lock().unwrap_or_else(|e| e.into_inner()).get(&text) {
            return Ok(statement.clone());
        }
        // Reads (memos, running totals) are answered without their columns
        // described again ([`prepare_read`]).
        let statement = if text.starts_with("SELECT ") {
            prepare_read(&self.session, text.clone()).await
        } else {
            self.session.prepare(text.clone()).await
        };
        let statement = statement.map_err(rm_err)?;
        self.prepared.lock().unwrap_or_else(|e| e.into_inner()).insert(text, statement.clone());
        Ok(statement)
    }

    /// The statement that sets `cells` (after `tenant`) of a row of
    /// `table`, with the write timestamp bound last.
    async fn insert(
        &self,
        table: &'static str,
        cells: &[(&'static str, Cell)],
    ) -> Result<Arc<InsertShape>, ReadModelError> {
        let same = |shape: &&Arc<InsertShape>| {
            same_name(shape.table, table)
                && shape.columns.len() == cells.len()
                && shape.columns.iter().zip(cells).all(|(column, (name, _))| same_name(column, name))
        };
        if let Some(shape) = self.inserts.lock().unwrap_or_else(|e| e.into_inner()).iter().find(same) {
            return Ok(shape.clone());
        }
        let columns: Vec<&'static str> = cells.iter().map(|(name, _)| *name).collect();
        // Boxed: once per shape, and inline the driver's prepare would grow
        // the future of every row made.
        let statement = Box::pin(self.prepare(format!(
            "INSERT INTO {} (tenant, {}) VALUES (?{}) USING TIMESTAMP ?",
            self.full_name(table),
            columns.join(", "),
            ", ?".repeat(columns.len())
        )))
        .await?;
        let shape = Arc::new(InsertShape { table, columns, statement });
        self.inserts.lock().unwrap_or_else(|e| e.into_inner()).push(shape.clone());
        Ok(shape)
    }

    /// The cells a [`MemoRead`] names, if the row exists.
    pub async fn read_memo(&self, tenant: &str, read: &MemoRead) -> Result<Option<Vec<Cell>>, ReadModelError> {
        let key = self.spec(read.table)?.primary_key();
        let condition: String = key.iter().take(read.key.len()).map(|c| format!(" AND {c} = ?")).collect();
        let text = format!(
            "SELECT {} FROM {} WHERE tenant = ?{condition}",
            read.columns.join(", "),
            self.full_name(read.table)
        );
        let statement = self.prepare(text).await?;
        let values: Vec<Option<CqlValue>> =
            std::iter::once(Some(CqlValue::Text(tenant.to_owned()))).chain(read.key.iter().map(cql)).collect();
        let rows = self
            .session
            .execute_unpaged(&statement, values)
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let row = rows.maybe_first_row::<scylla::value::Row>().map_err(rm_err)?;
        Ok(row.map(|r| r.columns.into_iter().map(cell).collect()))
    }

    /// The statement and values of a [`Write::Row`], or of a [`Write::Add`]
    /// applied out of its partition's order (a parked key's record replayed):
    /// a slot of its own, named by its id and stamped with the stream version.
    pub async fn row(&self, tenant: &str, write: Write) -> Result<Row, ReadModelError> {
        let (table, cells, timestamp) = match write {
            Write::Row { table, cells, version } => (table, cells, version),
            Write::Add { table, mut key, id, sums, version } => {
                key.push(("slot", Cell::Text(id)));
                key.extend(sums.into_iter().map(|(name, n)| (name, Cell::BigInt(n))));
                (table, key, version)
            }
        };
        self.row_of(tenant, table, cells, timestamp).await
    }

    async fn row_of(
        &self,
        tenant: &str,
        table: &'static str,
        cells: Vec<(&'static str, Cell)>,
        timestamp: i64,
    ) -> Result<Row, ReadModelError> {
        let partition = partition_of(self.spec(table)?, tenant, &cells)?;
        let shape = self.insert(table, &cells).await?;
        let values = Values::of(shape.statement.get_variable_col_specs().as_slice(), tenant, &cells, timestamp)?;
        Ok(Row { shape, partition, values })
    }

    /// The rows that count additions into their running totals, each events
    /// partition's records in offset order: per (table, key, events
    /// partition) the running total is read, the additions of records past
    /// its `counted_to` are added, and it is written back stamped with the
    /// last one's offset (also its write timestamp). A batch applied again
    /// finds its records counted and adds nothing (it writes back the total
    /// it read: that total may come from a write that failed after reaching
    /// only some replicas, and must stand at the write consistency before
    /// later batches build on it); of two writers of one slot (a replay
    /// beside the live projector, an owner that lost its partition), each
    /// writes the total up to its own stamp, and the one further along wins.
    pub async fn tally(&self, additions: &[Addition]) -> Result<Vec<Row>, ReadModelError> {
        let mut slots: HashMap<Slot<'_>, Vec<&Addition>> = HashMap::new();
        for add in additions {
            let Write::Add { table, key, .. } = &add.write else { continue };
            slots.entry((add.tenant.as_str(), *table, key.as_slice(), add.partition)).or_default().push(add);
        }
        // Boxed with their lifetime named, as in `write_rows`.
        let counted: Vec<BoxFuture<'_, Result<Row, ReadModelError>>> =
            slots.into_values().map(|adds| -> BoxFuture<'_, _> { Box::pin(self.count_slot(adds)) }).collect();
        futures::stream::iter(counted).buffer_unordered(PARTITIONS_IN_FLIGHT).try_collect().await
    }

    /// The row that counts `adds` (one table, key and events partition) into
    /// their running total (the total as read when they are counted already).
    async fn count_slot(&self, adds: Vec<&Addition>) -> Result<Row, ReadModelError> {
        let first = adds[0];
        let Write::Add { table, key, sums, .. } = &first.write else {
            return Err(ReadModelError("only additions are counted".into()));
        };
        let slot = format!("partition {}", first.partition);
        let sum_names: Vec<&'static str> = sums.iter().map(|(name, _)| *name).collect();
        let condition: String = key.iter().map(|(c, _)| format!(" AND {c} = ?")).collect();
        let select = self
            .prepare(format!(
                "SELECT {}, counted_to FROM {} WHERE tenant = ?{condition} AND slot = ?",
                sum_names.join(", "),
                self.full_name(table)
            ))
            .await?;
        let values: Vec<Option<CqlValue>> = std::iter::once(Some(CqlValue::Text(first.tenant.clone())))
            .chain(key.iter().map(|(_, c)| cql(c)))
            .chain([Some(CqlValue::Text(slot.clone()))])
            .collect();
        let rows =
            self.session.execute_unpaged(&select, values).await.map_err(rm_err)?.into_rows_result().map_err(rm_err)?;
        let (mut totals, counted_to) = match rows.maybe_first_row::<scylla::value::Row>().map_err(rm_err)? {
            Some(row) => {
                let cells: Vec<Cell> = row.columns.into_iter().map(cell).collect();
                let totals = cells[..sum_names.len()].iter().map(|c| c.as_i64().unwrap_or(0)).collect();
                (totals, cells[sum_names.len()].as_i64().unwrap_or(-1))
            }
            None => (vec![0; sum_names.len()], -1),
        };
        let mut last = counted_to;
        for add in adds.into_iter().filter(|a| a.offset > counted_to) {
            let Write::Add { sums, .. } = &add.write else { continue };
            for (total, (_, n)) in totals.iter_mut().zip(sums) {
                *total += n;
            }
            last = last.max(add.offset);
        }
        let mut cells = key.clone();
        cells.push(("slot", Cell::Text(slot)));
        cells.extend(sum_names.iter().zip(&totals).map(|(name, n)| (*name, Cell::BigInt(*n))));
        cells.push(("counted_to", Cell::BigInt(last)));
        self.row_of(&first.tenant, table, cells, last).await
    }

    /// Writes rows: those of one partition together, in unlogged batches of
    /// at most [`ROWS_PER_BATCH`] (one round trip, one mutation of the
    /// partition), partitions concurrently. Each row keeps its own write
    /// timestamp, so a batch applied twice changes nothing.
    pub async fn write_rows(&self, rows: &[Row]) -> Result<(), ReadModelError> {
        // Rows go in batches of the same replicas: each batch's coordinator
        // holds every row of it, so one request carries many partitions'
        // rows with no fan-out (bulk loaders group writes this way). A row
        // whose replicas the driver cannot tell goes with its partition's.
        let cluster = self.session.get_cluster_state();
        let batches =
            replicas::batches(rows.iter().map(|row| vec![row]), ROWS_PER_BATCH, |row| replicas_of(&cluster, row));
        let chunks: Vec<&[&Row]> = batches.iter().map(Vec::as_slice).collect();
        // Boxed with their lifetime named: a caller's Send future cannot
        // state it for closure futures in stream combinators.
        let writes: Vec<BoxFuture<'_, Result<(), ReadModelError>>> =
            chunks.into_iter().map(|chunk| -> BoxFuture<'_, _> { Box::pin(self.write_chunk(chunk)) }).collect();
        futures::stream::iter(writes).buffer_unordered(PARTITIONS_IN_FLIGHT).try_collect::<Vec<()>>().await.map(drop)
    }

    async fn write_chunk(&self, chunk: &[&Row]) -> Result<(), ReadModelError> {
        if let [row] = chunk {
            return self.session.execute_unpaged(&row.shape.statement, &row.values).await.map(drop).map_err(rm_err);
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for row in chunk {
            batch.append_statement(row.shape.statement.clone());
        }
        let values: Vec<&Values> = chunk.iter().map(|r| &r.values).collect();
        self.session.batch(&batch, values).await.map(drop).map_err(rm_err)
    }
}

/// The nodes that hold a row, or its partition where the driver cannot
/// tell (no token: the statement's partition key unknown to it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Replicas {
    Nodes(Vec<u128>),
    Partition(u64),
}

fn replicas_of(cluster: &ClusterState, row: &Row) -> Replicas {
    match replicas::of(cluster, &row.shape.statement, &row.values) {
        Some(nodes) => Replicas::Nodes(nodes),
        None => Replicas::Partition(row.partition),
    }
}

/// Which partition a row lands in, as a hash of its table, tenant and
/// partition key, or why the write lacks its partition key. Only rows whose
/// replicas the driver cannot tell are grouped by it: two partitions that
/// share a hash would merely share a batch.
fn partition_of(spec: &Table, tenant: &str, cells: &[(&str, Cell)]) -> Result<u64, ReadModelError> {
    let mut partition = PARTITION_HASH.build_hasher();
    (spec.name(), tenant).hash(&mut partition);
    for column in spec.partition_key() {
        let (_, value) = cells
            .iter()
            .find(|(name, _)| *name == column)
            .ok_or_else(|| ReadModelError(format!("a write to {} lacks its key column {column}", spec.name())))?;
        value.hash(&mut partition);
    }
    Ok(partition.finish())
}

/// The hasher of [`partition_of`].
const PARTITION_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5_1ce);

/// One running total: tenant, table, key and events partition.
type Slot<'a> = (&'a str, &'a str, &'a [(&'a str, Cell)], i32);

/// Rows sent in one batch at most (of one partition, or of partitions on
/// the same replicas).
pub const ROWS_PER_BATCH: usize = 32;

/// Partitions written at once.
const PARTITIONS_IN_FLIGHT: usize = 96;

/// A [`Write::Add`] of a record applied in its partition's order, to be
/// counted in that partition's running total, and where the record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addition {
    pub tenant: String,
    pub partition: i32,
    pub offset: i64,
    pub write: Write,
}

/// One write ready to send: its statement, the partition it lands in, and
/// its values (the write timestamp last).
pub struct Row {
    shape: Arc<InsertShape>,
    partition: u64,
    values: Values,
}

/// A row's values as the protocol sends them, serialized once when the row
/// is made (a rebuild makes tens of thousands a second): each a `[value]`
/// (its length, -1 for null, then its bytes), checked then against the
/// types of the statement's bind markers.
#[derive(Debug)]
struct Values {
    bytes: Vec<u8>,
    count: usize,
}

impl Values {
    /// `tenant`, the cells, then the write timestamp, for a statement whose
    /// bind markers are `specs`.
    fn of(
        specs: &[ColumnSpec<'_>],
        tenant: &str,
        cells: &[(&str, Cell)],
        timestamp: i64,
    ) -> Result<Self, ReadModelError> {
        if specs.len() != cells.len() + 2 {
            return Err(ReadModelError(format!("{} values for {} bind markers", cells.len() + 2, specs.len())));
        }
        let text = |cell: &Cell| match cell {
            Cell::Text(s) => s.len(),
            _ => 0,
        };
        let size = 4 * (cells.len() + 2)
            + tenant.len()
            + 8 * (cells.len() + 1)
            + cells.iter().map(|(_, c)| text(c)).sum::<usize>();
        let mut bytes = Vec::with_capacity(size);
        let mut put = |value: &dyn SerializeValue, at: usize| {
            let spec = &specs[at];
            value
                .serialize(spec.typ(), CellWriter::new(&mut bytes))
                .map(drop)
                .map_err(|e| ReadModelError(format!("{} of {}: {e}", spec.name(), spec.table_spec().table_name())))
        };
        put(&tenant, 0)?;
        for (at, (_, cell)) in cells.iter().enumerate() {
            put(cell, at + 1)?;
        }
        put(&timestamp, cells.len() + 1)?;
        Ok(Self { bytes, count: cells.len() + 2 })
    }
}

impl SerializeRow for Values {
    fn serialize(&self, ctx: &RowSerializationContext<'_>, writer: &mut RowWriter) -> Result<(), SerializationError> {
        if ctx.columns().len() != self.count {
            return Err(SerializationError::new(ReadModelError(format!(
                "{} values for {} bind markers",
                self.count,
                ctx.columns().len()
            ))));
        }
        let mut rest = self.bytes.as_slice();
        while let Some((length, after)) = rest.split_first_chunk::<4>() {
            let cell = writer.make_cell_writer();
            let Ok(length) = usize::try_from(i32::from_be_bytes(*length)) else {
                cell.set_null();
                rest = after;
                continue;
            };
            let (value, after) = after.split_at(length);
            cell.set_value(value).map_err(SerializationError::new)?;
            rest = after;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use scylla::frame::response::result::{NativeType, TableSpec};

    use super::*;

    fn spec(name: &'static str, typ: NativeType) -> ColumnSpec<'static> {
        ColumnSpec::borrowed(name, ColumnType::Native(typ), TableSpec::borrowed("sluice", "t"))
    }

    fn serialized(specs: &[ColumnSpec<'_>], row: &impl SerializeRow) -> Result<Vec<u8>, SerializationError> {
        let mut bytes = Vec::new();
        row.serialize(&RowSerializationContext::from_specs(specs), &mut RowWriter::new(&mut bytes))?;
        Ok(bytes)
    }

    #[test]
    fn a_rows_values_serialized_once_are_what_the_driver_sends_for_them() {
        let specs = [
            spec("tenant", NativeType::Text),
            spec("order_id", NativeType::Text),
            spec("total_cents", NativeType::BigInt),
            spec("lines", NativeType::Int),
            spec("submitted_at", NativeType::Timestamp),
            spec("day", NativeType::Date),
            spec("carrier", NativeType::Text),
            spec("[timestamp]", NativeType::BigInt),
        ];
        let cells = [
            ("order_id", Cell::text("o-1")),
            ("total_cents", Cell::BigInt(-2_100)),
            ("lines", Cell::Int(3)),
            ("submitted_at", Cell::Timestamp(1_700_000_000_123)),
            ("day", Cell::day_of(1_700_000_000_123)),
            ("carrier", Cell::Null),
        ];
        let values = Values::of(&specs, "acme", &cells, 7).expect("the cells fit their columns");
        let driver: Vec<Option<CqlValue>> = std::iter::once(Some(CqlValue::Text("acme".into())))
            .chain(cells.iter().map(|(_, c)| cql(c)))
            .chain([Some(CqlValue::BigInt(7))])
            .collect();
        assert_eq!(serialized(&specs, &values).unwrap(), serialized(&specs, &driver).unwrap());
        assert!(serialized(&specs[..7], &values).is_err(), "a statement with another number of markers is refused");
    }

    #[test]
    fn a_cell_that_does_not_fit_its_column_names_the_column() {
        let specs = [
            spec("tenant", NativeType::Text),
            spec("total_cents", NativeType::BigInt),
            spec("[timestamp]", NativeType::BigInt),
        ];
        let err = Values::of(&specs, "acme", &[("total_cents", Cell::text("12"))], 1).unwrap_err();
        assert!(err.0.contains("total_cents of t"), "{err}");
        assert!(Values::of(&specs, "acme", &[], 1).is_err(), "too few values for the markers");
    }
}
