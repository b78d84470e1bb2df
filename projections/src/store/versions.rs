//! Which version of a projection's tables serves reads (`active`) and which
//! one a rebuild is filling (`building`), kept in `projection_versions`.
//! The switch is one conditional update, so every reader sees either the old
//! version or the new one.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::value::CqlTimestamp;

use super::{rm_err, ReadModelError};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VersionState {
    pub active: i32,
    pub building: Option<i32>,
    /// Where the active version's rebuild started, when not at the start
    /// of the log: it lacks the events before it.
    pub active_partial_from: Option<String>,
}

pub struct Versions {
    session: Arc<Session>,
}

impl Versions {
    pub fn new(session: Arc<Session>) -> Self {
        Self { session }
    }

    /// The state, creating version 1 as active on first use (a conditional
    /// insert only then: readers ask often).
    pub async fn get(&self, projection: &str) -> Result<VersionState, ReadModelError> {
        if let Some(state) = self.read(projection).await? {
            return Ok(state);
        }
        self.session
            .query_unpaged(
                "INSERT INTO projection_versions (projection, active) VALUES (?, 1) IF NOT EXISTS",
                (projection,),
            )
            .await
            .map_err(rm_err)?;
        self.read(projection).await?.ok_or_else(|| ReadModelError(format!("no version row for {projection}")))
    }

    async fn read(&self, projection: &str) -> Result<Option<VersionState>, ReadModelError> {
        let rows = self
            .session
            .query_unpaged(
                "SELECT active, building, active_from FROM projection_versions WHERE projection = ?",
                (projection,),
            )
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let row = rows.maybe_first_row::<(Option<i32>, Option<i32>, Option<String>)>().map_err(rm_err)?;
        Ok(row.map(|(active, building, active_partial_from)| VersionState {
            active: active.unwrap_or(1),
            building,
            active_partial_from,
        }))
    }

    /// Marks `version` as being built (resumable: a crashed rebuild finds it).
    pub async fn start_building(&self, projection: &str, version: i32) -> Result<(), ReadModelError> {
        self.session
            .query_unpaged("UPDATE projection_versions SET building = ? WHERE projection = ?", (version, projection))
            .await
            .map_err(rm_err)?;
        Ok(())
    }

    /// Makes `to` the active version if `from` still is; returns whether it
    /// did. `partial_from`: where `to`'s rebuild started, if not at the start.
    pub async fn switch(
        &self,
        projection: &str,
        from: i32,
        to: i32,
        partial_from: Option<&str>,
    ) -> Result<bool, ReadModelError> {
        let now = CqlTimestamp(chrono::Utc::now().timestamp_millis());
        let rows = self
            .session
            .query_unpaged(
                "UPDATE projection_versions SET active = ?, building = null, switched_at = ?, active_from = ? \
                 WHERE projection = ? IF active = ?",
                (to, now, partial_from, projection, from),
            )
            .await
            .map_err(rm_err)?
            .into_rows_result()
            .map_err(rm_err)?;
        let first = rows.rows::<scylla::value::Row>().map_err(rm_err)?.next().transpose().map_err(rm_err)?;
        Ok(matches!(
            first.and_then(|r| r.columns.into_iter().next().flatten()),
            Some(scylla::value::CqlValue::Boolean(true))
        ))
    }
}
