//! What a read-model author writes: a [`Projection`] says which tables it has
//! and, for each event, the rows the event writes, in pure code (no CQL, no
//! I/O). The runtime does the rest for every projection alike: one set of
//! tables per version (`<projection>_<table>_v<version>`), statements, rows
//! of one partition in unlogged batches sent concurrently, the event's
//! stream version as write timestamp, running totals counted once per
//! record, live consumer group, replays, blue/green rebuilds and dead
//! letters ([`crate::store::tables`], [`crate::apply`], [`crate::runner`],
//! [`crate::replay`]).

use sluice_schemas::codec::{Decoded, EventError};

/// A read model fed by one bounded context's events.
pub trait Projection: Send + Sync + 'static {
    /// The decoded event of the context.
    type Event: Send + Sync;
    /// What an event needs from its key's earlier events (orders: the order
    /// as submitted), read back from the read model when the batch holds no
    /// earlier event of the key; `()` when events need nothing.
    type Memo: Clone + Send + Sync;

    /// Its name: version row, table prefix, consumer group, dead-letter topics
    /// (letters, digits, underscores).
    fn name(&self) -> &str;

    /// The context whose events topics (`<tenant>.<context>.events`) it reads.
    fn context(&self) -> &'static str;

    /// Its tables (each also keyed by `tenant`, first).
    fn tables(&self) -> &'static [Table];

    /// Tables an earlier release of it had, dropped with a version.
    fn former_tables(&self) -> &'static [&'static str] {
        &[]
    }

    /// The event of a decoded record, or why it is none of the context's.
    fn decode(&self, decoded: Decoded<'_>) -> Result<Self::Event, EventError>;

    /// Where the memo of `event`'s key is read when the batch has none, or
    /// `None` when the event needs no memo.
    fn memo_read(&self, event: &Self::Event) -> Option<MemoRead> {
        let _ = event;
        None
    }

    /// The memo in the cells [`MemoRead::columns`] named, if they hold one.
    fn memo_of(&self, cells: &[Cell]) -> Option<Self::Memo> {
        let _ = cells;
        None
    }

    /// The memo a later event of the key needs, after `event` (whose own
    /// memo was `before`). The runtime keeps the answer for the key's next
    /// events, in the batch and in later ones, instead of reading the store:
    /// an event that reads no memo gets `None` as `before` and must answer
    /// the key's whole memo after it.
    fn memo_after(&self, event: &Self::Event, before: Option<Self::Memo>) -> Option<Self::Memo> {
        let _ = event;
        before
    }

    /// The writes `event` makes, given its key's memo.
    fn writes(&self, event: &Self::Event, memo: Option<&Self::Memo>) -> Vec<Write>;
}

/// One table of a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Rows set by [`Write::Row`].
    Rows {
        name: &'static str,
        /// Every column but `tenant`: (name, CQL type).
        columns: &'static [(&'static str, &'static str)],
        /// The partition key after `tenant`.
        partition: &'static [&'static str],
        /// The clustering key.
        clustering: &'static [&'static str],
        /// `CLUSTERING ORDER BY` (e.g. `submitted_at DESC, order_id ASC`).
        order: Option<&'static str>,
    },
    /// Running totals added to by [`Write::Add`]: per key, one row (slot) per
    /// events partition stamped with the offset of the last record it counts
    /// (`counted_to`, also its write timestamp), so a record applied twice
    /// counts once and of two writers of a slot the one further along wins;
    /// a record applied out of its partition's order (a parked key's record
    /// replayed) gets a slot of its own. A key's total is the sum of its slots.
    Totals {
        name: &'static str,
        /// The key after `tenant`: (name, CQL type); it is the partition key.
        key: &'static [(&'static str, &'static str)],
        /// The summed columns (`bigint`).
        sums: &'static [&'static str],
    },
}

impl Table {
    pub fn name(&self) -> &'static str {
        match self {
            Table::Rows { name, .. } | Table::Totals { name, .. } => name,
        }
    }

    /// The partition key after `tenant`.
    pub fn partition_key(&self) -> impl Iterator<Item = &'static str> {
        let (rows, totals): (&[&str], &[(&str, &str)]) = match self {
            Table::Rows { partition, .. } => (partition, &[]),
            Table::Totals { key, .. } => (&[], key),
        };
        rows.iter().copied().chain(totals.iter().map(|(name, _)| *name))
    }

    /// The primary key after `tenant` (partition, then clustering).
    pub fn primary_key(&self) -> Vec<&'static str> {
        match self {
            Table::Rows { partition, clustering, .. } => partition.iter().chain(clustering.iter()).copied().collect(),
            Table::Totals { key, .. } => key.iter().map(|(name, _)| *name).chain(["slot"]).collect(),
        }
    }

    /// `CREATE TABLE IF NOT EXISTS` of this table as `full_name`.
    pub fn create(&self, full_name: &str) -> String {
        let list = |names: &[&str]| names.join(", ");
        match self {
            Table::Rows { columns, partition, clustering, order, .. } => {
                let columns: Vec<String> = columns.iter().map(|(name, ty)| format!("{name} {ty}")).collect();
                let partition = list(&[&["tenant"], &partition[..]].concat());
                let key = if clustering.is_empty() {
                    format!("({partition})")
                } else {
                    format!("({partition}), {}", list(clustering))
                };
                let order = order.map(|o| format!(" WITH CLUSTERING ORDER BY ({o})")).unwrap_or_default();
                format!(
                    "CREATE TABLE IF NOT EXISTS {full_name} (tenant text, {}, PRIMARY KEY ({key})){order}",
                    columns.join(", ")
                )
            }
            Table::Totals { key, sums, .. } => {
                let key_columns: Vec<String> = key.iter().map(|(name, ty)| format!("{name} {ty}")).collect();
                let sums: Vec<String> = sums.iter().map(|name| format!("{name} bigint")).collect();
                let partition: Vec<&str> = ["tenant"].into_iter().chain(key.iter().map(|(name, _)| *name)).collect();
                format!(
                    "CREATE TABLE IF NOT EXISTS {full_name} (tenant text, {}, slot text, {}, counted_to bigint, \
                     PRIMARY KEY (({}), slot))",
                    key_columns.join(", "),
                    sums.join(", "),
                    list(&partition)
                )
            }
        }
    }
}

/// The full name of a projection's table in one version.
pub fn table_name(projection: &str, table: &str, version: i32) -> String {
    format!("{projection}_{table}_v{version}")
}

/// The `CREATE TABLE IF NOT EXISTS` statements of one version of a
/// projection named `name` with `tables`.
pub fn create_statements(name: &str, version: i32, tables: &[Table]) -> Vec<String> {
    tables.iter().map(|t| t.create(&table_name(name, t.name(), version))).collect()
}

/// The names of the tables of one version of a projection.
pub fn table_names(name: &str, version: i32, tables: &[Table]) -> Vec<String> {
    tables.iter().map(|t| table_name(name, t.name(), version)).collect()
}

/// One value of a cell, as projections write it (the runtime maps it to CQL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cell {
    Text(String),
    BigInt(i64),
    Int(i32),
    /// Milliseconds since the epoch.
    Timestamp(i64),
    /// A UTC day, in days since the epoch ([`Cell::day_of`] a moment).
    Date(i64),
    /// No value (the cell is cleared).
    Null,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Self {
        Cell::Text(s.into())
    }

    /// The UTC day of a moment given in milliseconds since the epoch.
    pub fn day_of(ms: i64) -> Self {
        Cell::Date(ms.div_euclid(86_400_000))
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Cell::BigInt(n) | Cell::Timestamp(n) => Some(*n),
            Cell::Int(n) => Some(i64::from(*n)),
            _ => None,
        }
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(value: Option<T>) -> Self {
        value.map_or(Cell::Null, Into::into)
    }
}

impl From<String> for Cell {
    fn from(value: String) -> Self {
        Cell::Text(value)
    }
}

/// One write of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Sets cells of one row of a [`Table::Rows`] (its key among them),
    /// stamped with the event's stream version.
    Row { table: &'static str, cells: Vec<(&'static str, Cell)>, version: i64 },
    /// Adds to the running totals of one key of a [`Table::Totals`]. `id`
    /// names the movement (unique per event and movement): the slot it gets
    /// when its record is applied out of order.
    Add {
        table: &'static str,
        key: Vec<(&'static str, Cell)>,
        id: String,
        sums: Vec<(&'static str, i64)>,
        version: i64,
    },
}

impl Write {
    pub fn version(&self) -> i64 {
        match self {
            Write::Row { version, .. } | Write::Add { version, .. } => *version,
        }
    }
}

/// Where a key's memo is read: one row of a table, by its primary key
/// after `tenant`, and the columns that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoRead {
    pub table: &'static str,
    pub key: Vec<Cell>,
    pub columns: &'static [&'static str],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_created_with_tenant_first_in_the_partition_key() {
        let rows = Table::Rows {
            name: "by_customer",
            columns: &[("customer_id", "text"), ("submitted_at", "timestamp"), ("order_id", "text")],
            partition: &["customer_id"],
            clustering: &["submitted_at", "order_id"],
            order: Some("submitted_at DESC, order_id ASC"),
        };
        assert_eq!(
            rows.create("orders_by_customer_v2"),
            "CREATE TABLE IF NOT EXISTS orders_by_customer_v2 (tenant text, customer_id text, submitted_at timestamp, \
             order_id text, PRIMARY KEY ((tenant, customer_id), submitted_at, order_id)) \
             WITH CLUSTERING ORDER BY (submitted_at DESC, order_id ASC)"
        );
        let totals = Table::Totals { name: "sales_by_day", key: &[("day", "date")], sums: &["orders", "total_cents"] };
        assert_eq!(
            totals.create("orders_sales_by_day_v1"),
            "CREATE TABLE IF NOT EXISTS orders_sales_by_day_v1 (tenant text, day date, slot text, orders bigint, \
             total_cents bigint, counted_to bigint, PRIMARY KEY ((tenant, day), slot))"
        );
        assert_eq!(totals.primary_key(), ["day", "slot"]);
    }
}
