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
    let without_comments: String = TABLES
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_statements() {
        let statements = super::create_tables();
        assert!(statements.len() >= 3);
        assert!(statements.iter().all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
    }
}
