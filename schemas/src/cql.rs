//! The CQL schema, as statements. Kept here as data so every role creates the
//! same tables without depending on a database driver.

const TABLES: &str = include_str!("../cql/tables.cql");

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
    ("command_journal", "to_fence", "set<text> static"),
];

/// The `ALTER TABLE` adding one of [`ADDED_COLUMNS`].
pub fn add_column(table: &str, column: &str, cql_type: &str) -> String {
    format!("ALTER TABLE {table} ADD {column} {cql_type}")
}

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
    }
}
