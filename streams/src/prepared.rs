//! Reads prepared once and run many times, answered without their columns
//! described again: the driver keeps the result metadata it got when the
//! statement was prepared, and asks the store to leave it out of every
//! answer. A profile of the CQL store under the bench's load had 7.5 % of
//! its samples encoding that metadata, answer after answer (0.3 % after),
//! and every client decoded it again.
//!
//! Safe only for a read that names its columns: the schema only ever gains
//! columns (`sluice schemas apply`), which changes nothing a named list
//! returns, while `SELECT *` would return the new column that the kept
//! metadata does not describe.

use scylla::client::session::Session;
use scylla::errors::PrepareError;
use scylla::statement::prepared::PreparedStatement;

/// Prepares `cql`, a `SELECT` of named columns, to be answered without its
/// result metadata.
pub async fn prepare_read(session: &Session, cql: impl Into<String>) -> Result<PreparedStatement, PrepareError> {
    let cql = cql.into();
    assert!(names_its_columns(&cql), "a read prepared without result metadata must name its columns: {cql}");
    let mut statement = session.prepare(cql).await?;
    statement.set_use_cached_result_metadata(true);
    Ok(statement)
}

fn names_its_columns(cql: &str) -> bool {
    let words: Vec<String> = cql.split_whitespace().take(2).map(str::to_ascii_uppercase).collect();
    words.first().map(String::as_str) == Some("SELECT") && words.get(1).is_some_and(|w| !w.starts_with('*'))
}

#[cfg(test)]
mod tests {
    use super::names_its_columns;

    #[test]
    fn only_a_select_of_named_columns_goes_without_metadata() {
        assert!(names_its_columns("SELECT status FROM operations WHERE tenant = ?"));
        assert!(names_its_columns("select  stream_id, version FROM events"));
        assert!(!names_its_columns("SELECT * FROM operations"));
        assert!(!names_its_columns("SELECT *, x FROM operations"));
        assert!(!names_its_columns("INSERT INTO operations (a) VALUES (?)"));
    }
}
