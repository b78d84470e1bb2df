//! The CQL schema, as statements. Kept here as data so every role creates the
//! same tables without depending on a database driver.

const TABLES: &str = include_str!("../cql/tables.cql");
const READ_MODELS: &str = include_str!("../cql/read_models.cql");

/// `CREATE KEYSPACE IF NOT EXISTS` with SimpleStrategy; production clusters
/// create the keyspace themselves with NetworkTopologyStrategy.
pub fn create_keyspace(keyspace: &str, replication_factor: u32) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}"
    )
}

/// The `CREATE TABLE IF NOT EXISTS` statements, comments stripped.
pub fn create_tables() -> Vec<String> {
    statements(TABLES)
}

/// The names of the tables [`create_tables`] creates.
pub fn table_names() -> Vec<String> {
    create_tables()
        .iter()
        .filter_map(|s| s.strip_prefix("CREATE TABLE IF NOT EXISTS ")?.split(['(', ' ']).next().map(str::to_owned))
        .collect()
}

/// Columns added to a table after it was first released: a store created
/// before has the table without them (`CREATE TABLE IF NOT EXISTS` leaves it
/// as it is), so they are added where missing (table, column, CQL type).
pub const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("command_journal", "first_seqs", "map<bigint, bigint> static"),
    ("command_journal", "written_by", "bigint"),
    ("projection_versions", "active_from", "text"),
    ("operations", "retried_as", "text"),
];

/// The `ALTER TABLE` adding one of [`ADDED_COLUMNS`].
pub fn add_column(table: &str, column: &str, cql_type: &str) -> String {
    format!("ALTER TABLE {table} ADD {column} {cql_type}")
}

/// The read-model tables of one version of projection `projection` (a CQL
/// identifier: letters, digits, underscores).
pub fn create_read_model_tables(projection: &str, version: i32) -> Vec<String> {
    statements(&READ_MODELS.replace("{p}", projection).replace("{v}", &version.to_string()))
}

/// Names of the read-model tables of one version, to drop it after a switch.
pub fn read_model_tables(projection: &str, version: i32) -> Vec<String> {
    ["by_id", "by_customer", "sales_by_day"].iter().map(|t| format!("{projection}_{t}_v{version}")).collect()
}

/// Names of tables a version created by an earlier release may also have,
/// dropped with it.
pub fn former_read_model_tables(projection: &str, version: i32) -> Vec<String> {
    FORMER_READ_MODEL_TABLES.iter().map(|t| format!("{projection}_{t}_v{version}")).collect()
}

/// Read-model tables earlier releases created: `daily_sales` held one row
/// per order and movement, summed on read (replaced by `sales_by_day`; a
/// version created before it gets its sales by `sluice replay --rebuild`).
const FORMER_READ_MODEL_TABLES: &[&str] = &["daily_sales"];

fn statements(text: &str) -> Vec<String> {
    let without_comments: String =
        text.lines().filter(|line| !line.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    without_comments.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_statements() {
        let statements = super::create_tables();
        assert!(statements.len() >= 3);
        assert!(statements.iter().all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
        assert_eq!(super::table_names().len(), statements.len());
        assert!(super::table_names().contains(&"command_journal".to_owned()));
        let versioned = super::create_read_model_tables("orders", 7);
        assert_eq!(versioned.len(), 3);
        assert!(versioned[0].contains("orders_by_id_v7"));
        assert_eq!(super::read_model_tables("orders", 7)[2], "orders_sales_by_day_v7");
    }
}
