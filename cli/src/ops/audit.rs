//! The `dlq_audit` table (`schemas/cql/tables.cql`): every dead letter that
//! `sluice dlq purge` or `sluice dlq delete` removes is recorded — who, when,
//! from which queue, which message ids, and the reason they had to give —
//! and archived whole in `dlq_archive` (`sluice dlq archive <audit id>`).
//!
//! The order of writes is what makes the log complete: the row exists before
//! the first message is removed, and each batch of messages is archived and
//! its ids written before those messages are acked. A crash can therefore leave a row that says
//! `started` and names a message that is still in the queue (it was about to
//! go), never a removed message that the log does not name.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use scylla::client::session::Session;
use scylla::value::CqlTimestamp;
use serde::Serialize;

use super::{cql_err, OpsError};

/// Ids kept per row; beyond it only the count grows (`ids_truncated`), so a
/// purge of a huge queue cannot make one CQL cell unbounded.
pub const MAX_IDS_PER_ROW: usize = 10_000;

/// Archived messages per `dlq_archive` partition.
const ARCHIVE_BUCKET: i64 = 1_000;

/// A removed dead letter as the archive keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchivedLetter {
    pub message_id: String,
    /// Headers, properties and payload, as `sluice dlq show --json` has them.
    pub detail: serde_json::Value,
    /// The body byte for byte (in `detail` as JSON or text).
    #[serde(skip)]
    pub body: Vec<u8>,
}

/// What an operator is about to do to one queue.
#[derive(Debug, Clone)]
pub struct AuditAction<'a> {
    pub tenant: &'a str,
    pub context: &'a str,
    pub queue: &'a str,
    /// `purge` or `delete`.
    pub action: &'a str,
    pub actor: &'a str,
    pub reason: &'a str,
    /// The filter or message id that selected the messages.
    pub filter: &'a str,
}

/// An open audit row: where it is, and what it holds so far.
#[derive(Debug, Clone)]
pub struct AuditRow {
    tenant: String,
    at: CqlTimestamp,
    pub id: String,
    pub count: i64,
    recorded_ids: usize,
}

/// One row as `sluice dlq audit` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub tenant: String,
    pub at: DateTime<Utc>,
    pub id: String,
    pub context: Option<String>,
    pub queue: Option<String>,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub host: Option<String>,
    pub reason: Option<String>,
    pub filter: Option<String>,
    pub message_ids: Vec<String>,
    pub count: i64,
    pub ids_truncated: bool,
    pub status: Option<String>,
    pub detail: Option<String>,
}

pub struct AuditLog {
    /// A session with the sluice keyspace selected.
    session: Arc<Session>,
}

/// Who is acting when `--actor` is not given: the OS user (who ran `sudo`,
/// if it was sudo), from the environment or else from the process's uid.
pub fn default_actor() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(user_of_uid)
        .unwrap_or_else(|| "unknown".into())
}

/// The name of this process's real uid in `/etc/passwd` (`uid <n>` if absent).
fn user_of_uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2) == Some(&uid.as_str())).then(|| fields[0].to_owned())
    });
    Some(name.unwrap_or_else(|| format!("uid {uid}")))
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl AuditLog {
    pub fn new(session: Arc<Session>) -> Self {
        Self { session }
    }

    /// Its CQL session (the sluice keyspace).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Writes the row of an action about to start.
    pub async fn begin(&self, what: &AuditAction<'_>) -> Result<AuditRow, OpsError> {
        let row = AuditRow {
            tenant: what.tenant.to_owned(),
            at: CqlTimestamp(Utc::now().timestamp_millis()),
            id: uuid::Uuid::new_v4().to_string(),
            count: 0,
            recorded_ids: 0,
        };
        self.session
            .query_unpaged(
                "INSERT INTO dlq_audit (tenant, at, id, context, queue, action, actor, host, reason, filter, count, ids_truncated, status) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, false, 'started')",
                (&row.tenant, row.at, &row.id, what.context, what.queue, what.action, what.actor, host(), what.reason, what.filter),
            )
            .await
            .map_err(cql_err)?;
        Ok(row)
    }

    /// Archives messages about to be removed and records their ids (call
    /// before acking them).
    pub async fn add(&self, row: &mut AuditRow, letters: &[ArchivedLetter]) -> Result<(), OpsError> {
        let insert = "INSERT INTO dlq_archive (tenant, audit_id, bucket, position, message_id, detail, body) \
                      VALUES (?, ?, ?, ?, ?, ?, ?)";
        for (i, letter) in letters.iter().enumerate() {
            let position = row.count + i as i64;
            let bucket = (position / ARCHIVE_BUCKET) as i32;
            let detail = letter.detail.to_string();
            self.session
                .query_unpaged(
                    insert,
                    (&row.tenant, &row.id, bucket, position, &letter.message_id, detail, &letter.body),
                )
                .await
                .map_err(cql_err)?;
        }
        let ids: Vec<String> = letters.iter().map(|l| l.message_id.clone()).collect();
        self.add_ids(row, &ids).await
    }

    /// Records ids of what an action is about to touch (call before it does).
    pub async fn add_ids(&self, row: &mut AuditRow, ids: &[String]) -> Result<(), OpsError> {
        let room = MAX_IDS_PER_ROW.saturating_sub(row.recorded_ids);
        let kept: Vec<&String> = ids.iter().take(room).collect();
        let count = row.count + ids.len() as i64;
        let truncated = kept.len() < ids.len() || row.recorded_ids >= MAX_IDS_PER_ROW;
        self.session
            .query_unpaged(
                "UPDATE dlq_audit SET message_ids = message_ids + ?, count = ?, ids_truncated = ? WHERE tenant = ? AND at = ? AND id = ?",
                (kept.clone(), count, truncated, &row.tenant, row.at, &row.id),
            )
            .await
            .map_err(cql_err)?;
        row.count = count;
        row.recorded_ids += kept.len();
        Ok(())
    }

    /// Every message the action with audit id `id` removed, in the order it
    /// removed them.
    pub async fn archived(&self, tenant: &str, id: &str) -> Result<Vec<ArchivedLetter>, OpsError> {
        // The tenant's log is small: its rows are read to find the count.
        let rows = self
            .session
            .query_unpaged("SELECT id, count FROM dlq_audit WHERE tenant = ?", (tenant,))
            .await
            .map_err(cql_err)?
            .into_rows_result()
            .map_err(cql_err)?;
        let mut count = None;
        for row in rows.rows::<(String, Option<i64>)>().map_err(cql_err)? {
            let (row_id, row_count) = row.map_err(cql_err)?;
            if row_id == id {
                count = Some(row_count.unwrap_or(0));
            }
        }
        let count = count.ok_or_else(|| OpsError::NotFound(id.to_owned(), format!("the audit log of {tenant}")))?;
        let mut out = Vec::new();
        for bucket in 0..=((count - 1).max(0) / ARCHIVE_BUCKET) {
            let rows = self
                .session
                .query_unpaged(
                    "SELECT message_id, detail, body FROM dlq_archive WHERE tenant = ? AND audit_id = ? AND bucket = ?",
                    (tenant, id, bucket as i32),
                )
                .await
                .map_err(cql_err)?
                .into_rows_result()
                .map_err(cql_err)?;
            for row in rows.rows::<(String, String, Vec<u8>)>().map_err(cql_err)? {
                let (message_id, detail, body) = row.map_err(cql_err)?;
                let detail = serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail));
                out.push(ArchivedLetter { message_id, detail, body });
            }
        }
        Ok(out)
    }

    /// Records that `n` more messages were handled by the broker (which
    /// does not name them).
    pub async fn add_count(&self, row: &mut AuditRow, n: i64) -> Result<(), OpsError> {
        let count = row.count + n;
        self.session
            .query_unpaged(
                "UPDATE dlq_audit SET count = ? WHERE tenant = ? AND at = ? AND id = ?",
                (count, &row.tenant, row.at, &row.id),
            )
            .await
            .map_err(cql_err)?;
        row.count = count;
        Ok(())
    }

    /// Closes the row: `done`, or `failed` with what went wrong.
    pub async fn finish(&self, row: &AuditRow, status: &str, detail: &str) -> Result<(), OpsError> {
        self.session
            .query_unpaged(
                "UPDATE dlq_audit SET status = ?, detail = ? WHERE tenant = ? AND at = ? AND id = ?",
                (status, detail, &row.tenant, row.at, &row.id),
            )
            .await
            .map_err(cql_err)?;
        Ok(())
    }

    /// The newest `limit` rows, of one tenant or of all.
    pub async fn list(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, OpsError> {
        use futures::TryStreamExt;
        let select = "SELECT tenant, at, id, context, queue, action, actor, host, reason, filter, message_ids, count, \
                      ids_truncated, status, detail FROM dlq_audit";
        let pager = match tenant {
            Some(t) => self.session.query_iter(format!("{select} WHERE tenant = ? LIMIT {limit}"), (t,)).await,
            // A scan: fine for a log of ops actions, which stays small.
            None => self.session.query_iter(select, ()).await,
        }
        .map_err(cql_err)?;
        let mut stream = pager.rows_stream::<Row>().map_err(cql_err)?;
        let mut out = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(cql_err)? {
            out.push(entry(row));
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.at));
        out.truncate(limit);
        Ok(out)
    }
}

type Row = (
    String,
    CqlTimestamp,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Vec<String>>,
    Option<i64>,
    Option<bool>,
    Option<String>,
    Option<String>,
);

fn entry(r: Row) -> AuditEntry {
    AuditEntry {
        tenant: r.0,
        at: Utc.timestamp_millis_opt(r.1 .0).single().unwrap_or_default(),
        id: r.2,
        context: r.3,
        queue: r.4,
        action: r.5,
        actor: r.6,
        host: r.7,
        reason: r.8,
        filter: r.9,
        message_ids: r.10.unwrap_or_default(),
        count: r.11.unwrap_or(0),
        ids_truncated: r.12.unwrap_or(false),
        status: r.13,
        detail: r.14,
    }
}
