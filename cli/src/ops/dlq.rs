//! `sluice dlq`: list, show, shovel, purge and delete dead letters.
//!
//! Every verb reads a DLQ with a [`Walk`] (take the messages unacked, give
//! back the ones left alone — see `ops::walk` for what that costs), and every
//! verb that takes a message out does so with an ack that comes last:
//!
//! - **shovel** acks a dead letter only after the broker confirmed its copy
//!   in the destination queue. A crash between the two leaves the message in
//!   both places: a duplicate, which the processors deduplicate (by the
//!   command's `source` and `id`), never a loss.
//! - **purge** and **delete** ack only after the audit log names the
//!   messages (`ops::audit`).
//!
//! A walk covers the messages present when it started, so producers that
//! keep dead-lettering meanwhile cannot make a verb run forever; what they
//! add is left for the next run.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use sluice_processors::amqp::consumer::publish_confirmed;
use sluice_processors::operations::{CqlOperationStore, OperationRef, OperationStore, Order, Status};
use sluice_schemas::operation_id::OperationIds;
use sluice_schemas::{catalog, names};
use tokio_util::sync::CancellationToken;

use super::audit::{ArchivedLetter, AuditAction, AuditLog, AuditRow};
use super::dead_letter::{self, DeadLetter, DeadLetterDetail, Filter, Group};
use super::management::{encode, Management};
use super::walk::{self, Walk, MAX_HELD};
use super::{amqp_err, cql_err, headers, OpsError};

/// Messages removed per audit write (and per batch of acks).
const REMOVE_BATCH: usize = 500;

/// A broker-side shovel that moves nothing for this long is given up.
const SHOVEL_STALL: Duration = Duration::from_secs(60);

/// The DLQ of one tenant's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqRef {
    pub tenant: String,
    pub context: String,
    pub queue: String,
}

/// Which DLQs a verb looks at: the given tenant (configured or not) or every
/// configured one, and one context or all.
#[derive(Debug, Clone)]
pub struct Scope {
    pub dlqs: Vec<DlqRef>,
}

impl Scope {
    pub fn new(configured_tenants: &[String], tenant: Option<&str>, context: Option<&str>) -> Result<Self, OpsError> {
        let tenants: Vec<String> = match tenant {
            Some(t) if !configured_tenants.is_empty() && !configured_tenants.iter().any(|c| c == t) => {
                return Err(OpsError::Usage(format!(
                    "unknown tenant {t:?} (configured: {})",
                    configured_tenants.join(", ")
                )))
            }
            Some(t) => vec![t.to_owned()],
            None if configured_tenants.is_empty() => {
                return Err(OpsError::Usage(
                    "no tenants: give --tenant, or a config file with [[tenants]] (--config)".into(),
                ))
            }
            None => configured_tenants.to_vec(),
        };
        let contexts: Vec<&str> = match context {
            Some(c) if catalog::context(c).is_some() => vec![c],
            Some(c) => {
                let known: Vec<&str> = catalog::CONTEXTS.iter().map(|c| c.name).collect();
                return Err(OpsError::Usage(format!("unknown context {c:?} (known: {})", known.join(", "))));
            }
            None => catalog::CONTEXTS.iter().map(|c| c.name).collect(),
        };
        let dlqs = tenants
            .iter()
            .flat_map(|t| {
                contexts.iter().map(move |c| DlqRef {
                    tenant: t.clone(),
                    context: (*c).to_owned(),
                    queue: names::dead_letter_queue(t, c),
                })
            })
            .collect();
        Ok(Self { dlqs })
    }
}

/// How far a verb got through one DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSeen {
    pub queue: String,
    pub tenant: String,
    pub context: String,
    pub exists: bool,
    /// Messages ready when the verb started on this queue.
    pub depth: u32,
    /// Messages looked at.
    pub examined: u32,
    /// Whether every message present at the start was looked at (false when
    /// more than 65,535 had to stay in place, or someone else took some).
    pub complete: bool,
}

impl QueueSeen {
    fn missing(dlq: &DlqRef) -> Self {
        Self {
            queue: dlq.queue.clone(),
            tenant: dlq.tenant.clone(),
            context: dlq.context.clone(),
            exists: false,
            depth: 0,
            examined: 0,
            complete: true,
        }
    }

    fn of(dlq: &DlqRef, walk: &Walk) -> Self {
        Self {
            queue: dlq.queue.clone(),
            tenant: dlq.tenant.clone(),
            context: dlq.context.clone(),
            exists: true,
            depth: walk.depth_at_start(),
            examined: walk.seen(),
            complete: walk.complete(),
        }
    }
}

/// `sluice dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub queues: Vec<QueueSeen>,
    /// Dead letters that matched the filter.
    pub matching: u64,
    pub groups: Vec<Group>,
    /// The matching dead letters, in queue order.
    pub messages: Vec<DeadLetter>,
}

/// What `sluice dlq shovel` should do besides the filter.
#[derive(Debug, Clone, Default)]
pub struct ShovelOptions {
    /// Destination for every message; default: each message's original
    /// work queue (`x-sluice-original-queue`).
    pub to: Option<String>,
    /// Move at most this many.
    pub limit: Option<u64>,
    /// Messages per second at most.
    pub rate: Option<f64>,
    /// Select and report, move nothing.
    pub dry_run: bool,
    /// The partition count (`amqp.partitions`): a message goes back to its
    /// stream's partition. `None`: to the queue it came from.
    pub partitions: Option<u16>,
    /// `to` may be a queue of another tenant, or of no tenant (the operator
    /// said so with `--to-foreign`; audited as `shovel-foreign`). Without it
    /// every destination must be one of the dead letter's own tenant's.
    pub foreign: bool,
    /// Cancelled (Ctrl-C): stop after the message in hand; a broker shovel
    /// is deleted, what it had not yet moved stays in the DLQ.
    pub stop: CancellationToken,
    /// Issues the operation of a dead-lettered command sent back home as a
    /// new attempt (the edge's `ingest.operation_secret`).
    pub operation_ids: Option<OperationIds>,
    /// How long a client-side shovel holds messages unacked at most
    /// (default [`SHOVEL_WINDOW`]): then it gives back what it holds and
    /// walks on from the queue's head, so no message is held past the
    /// broker's consumer timeout (30 min by default), however slow the
    /// `--rate`.
    pub window: Option<Duration>,
}

/// The default [`ShovelOptions::window`]: far below any consumer timeout a
/// broker would be given, long enough that walking past the messages a
/// filter leaves in place costs little.
pub const SHOVEL_WINDOW: Duration = Duration::from_secs(60);

/// What one pass of a client-side shovel over a DLQ is to do.
struct PassPlan {
    /// Messages at the queue's head that earlier passes looked at and left.
    skip: u32,
    /// Messages earlier passes looked at.
    examined_before: u32,
    /// When the pass gives back what it holds.
    deadline: tokio::time::Instant,
}

/// How one pass of a client-side shovel over a DLQ ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Every message it was about was looked at (or someone took the rest).
    Done,
    /// `--limit` reached.
    LimitReached,
    /// Its window is over: what it holds goes back, and a new pass starts.
    WindowOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShovelMethod {
    /// Read, publish with confirm, then ack, message by message (filtered
    /// moves, and every move back to a work queue).
    Client,
    /// RabbitMQ's dynamic shovel (whole-queue moves to `--to`).
    BrokerShovel,
}

/// Progress of a shovel, for a progress bar.
#[derive(Debug, Clone, Serialize)]
pub struct ShovelProgress {
    pub queue: String,
    /// Messages looked at in this queue, of `to_examine`.
    pub examined: u64,
    pub to_examine: u64,
    /// Moved so far, all queues.
    pub moved: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShovelReport {
    pub method: ShovelMethod,
    pub dry_run: bool,
    pub queues: Vec<QueueSeen>,
    /// Messages that matched (up to `--limit`).
    pub selected: u64,
    /// Messages moved (0 in a dry run).
    pub moved: u64,
    /// Message ids moved, or that a dry run would move (a broker shovel does
    /// not report them).
    pub ids: Vec<String>,
    /// Moved (or would-be moved) per destination queue.
    pub destinations: BTreeMap<String, u64>,
    /// The audit rows written, one per DLQ something moved from.
    pub audit_ids: Vec<String>,
    /// Stopped before the end (`stop`): `moved` is what had moved by then.
    pub interrupted: bool,
    /// A broker shovel stopped midway: copies in the destination whose
    /// original is back in the DLQ too (shovelling them again is harmless:
    /// the processors answer a command once).
    pub copied_twice: u64,
}

/// Who removes dead letters, and why (both go to the audit log).
#[derive(Debug, Clone)]
pub struct Who {
    pub actor: String,
    pub reason: String,
}

/// What `purge` or `delete` removed from one queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueRemoval {
    #[serde(flatten)]
    pub seen: QueueSeen,
    pub removed: u64,
    /// The `dlq_audit` row of this queue, if anything was to be removed.
    pub audit_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemovalReport {
    pub action: String,
    pub actor: String,
    pub reason: String,
    pub queues: Vec<QueueRemoval>,
    pub removed: u64,
    pub ids: Vec<String>,
}

/// The DLQ verbs, over one AMQP connection and the management API.
pub struct Dlq {
    connection: Connection,
    management: Management,
}

impl Dlq {
    pub async fn connect(amqp_url: &str, management: Management) -> Result<Self, OpsError> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .map_err(|e| OpsError::Amqp(format!("connecting: {e}")))?;
        Ok(Self { connection, management })
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }

    /// Starts a walk over a DLQ after checking that walking it is safe;
    /// `None` if the queue does not exist.
    async fn walk(&self, dlq: &DlqRef) -> Result<Option<Walk>, OpsError> {
        let Some(info) = self.management.queue(&dlq.queue).await? else { return Ok(None) };
        walk::ensure_walkable(&dlq.queue, &info)?;
        Ok(Some(Walk::start(&self.connection, &dlq.queue, MAX_HELD).await?))
    }

    /// Lists the dead letters that match `filter`, grouped by fingerprint.
    /// Consumes nothing; see `ops::walk` for what reading costs.
    pub async fn list(&self, scope: &Scope, filter: &Filter) -> Result<Listing, OpsError> {
        let mut queues = Vec::new();
        let mut messages = Vec::new();
        let now = Utc::now();
        for dlq in &scope.dlqs {
            let Some(mut walk) = self.walk(dlq).await? else {
                queues.push(QueueSeen::missing(dlq));
                continue;
            };
            while let Some(delivery) = walk.next().await? {
                let dl = dead_letter::summarize(&dlq.tenant, &dlq.context, &dlq.queue, &delivery, now);
                if filter.matches(&dl) {
                    messages.push(dl);
                }
            }
            queues.push(QueueSeen::of(dlq, &walk));
            walk.finish(&self.connection).await?;
        }
        Ok(Listing { queues, matching: messages.len() as u64, groups: dead_letter::group(&messages), messages })
    }

    /// Every copy of the dead letter with this message id (normally one; a
    /// duplicate shows as two).
    pub async fn show(&self, scope: &Scope, message_id: &str) -> Result<Vec<DeadLetterDetail>, OpsError> {
        let mut found = Vec::new();
        let now = Utc::now();
        for dlq in &scope.dlqs {
            let Some(mut walk) = self.walk(dlq).await? else { continue };
            while let Some(delivery) = walk.next().await? {
                if message_id_of(&delivery).as_deref() == Some(message_id) {
                    found.push(dead_letter::detail(&dlq.tenant, &dlq.context, &dlq.queue, &delivery, now));
                }
            }
            walk.finish(&self.connection).await?;
        }
        if found.is_empty() {
            return Err(OpsError::NotFound(message_id.to_owned(), describe(scope)));
        }
        Ok(found)
    }

    /// Moves matching dead letters back to their work queue (fresh attempt
    /// count, no DLQ verdict: `headers::for_fresh_attempt`) or to `--to`
    /// (headers kept as they are).
    pub async fn shovel(
        &self,
        audit: &AuditLog,
        who: &Who,
        scope: &Scope,
        filter: &Filter,
        options: &ShovelOptions,
        progress: &mut dyn FnMut(&ShovelProgress),
    ) -> Result<ShovelReport, OpsError> {
        if who.reason.trim().is_empty() {
            return Err(OpsError::Usage("a justification is required (--why): it goes to the audit log".into()));
        }
        if let Some(to) = &options.to {
            for dlq in &scope.dlqs {
                check_destination(&dlq.tenant, to, options.foreign)?;
            }
        }
        let record = ShovelRecord { audit, who, filter, described: filter.describe(), options };
        if let (Some(to), true) =
            (&options.to, filter.is_empty() && options.limit.is_none() && options.rate.is_none() && !options.dry_run)
        {
            return self.broker_shovel(&record, scope, to, progress).await;
        }
        if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err(OpsError::Usage("--rate must be a positive number of messages per second".into()));
        }
        let publisher = self.connection.create_channel().await.map_err(amqp_err)?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp_err)?;
        let mut pace = options.rate.map(|r| {
            let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut report = ShovelReport {
            method: ShovelMethod::Client,
            dry_run: options.dry_run,
            queues: Vec::new(),
            selected: 0,
            moved: 0,
            ids: Vec::new(),
            destinations: BTreeMap::new(),
            audit_ids: Vec::new(),
            interrupted: false,
            copied_twice: 0,
        };
        if options.limit == Some(0) {
            return Ok(report);
        }
        let mut destination_exists: HashMap<String, bool> = HashMap::new();
        let window = options.window.unwrap_or(SHOVEL_WINDOW);
        for dlq in &scope.dlqs {
            let Some(info) = self.management.queue(&dlq.queue).await? else {
                report.queues.push(QueueSeen::missing(dlq));
                continue;
            };
            walk::ensure_walkable(&dlq.queue, &info)?;
            // Written before the first move from this queue, finished after
            // its last (a queue nothing moved from gets no row).
            let mut row = None;
            // Passes, each holding messages for one window at most. A pass
            // after the first looks at what the earlier ones left of the
            // messages the first found (they come back first, in order);
            // dead letters that arrived since are not its business.
            let (mut seen, mut left) = (None::<QueueSeen>, u32::MAX);
            let mut plan = PassPlan { skip: 0, examined_before: 0, deadline: tokio::time::Instant::now() };
            let ended = loop {
                let mut walk = Walk::start_at_most(&self.connection, &dlq.queue, MAX_HELD, left).await?;
                plan.deadline = tokio::time::Instant::now() + window;
                let pass = self
                    .shovel_queue(
                        &record,
                        dlq,
                        &mut walk,
                        &mut row,
                        &mut pace,
                        &publisher,
                        &mut report,
                        &mut destination_exists,
                        &plan,
                        progress,
                    )
                    .await;
                // The message in hand when the window closed was not looked at.
                let in_hand = u32::from(matches!(pass, Ok(Pass::WindowOver)));
                let looked = walk.seen().saturating_sub(plan.skip).saturating_sub(in_hand);
                plan.examined_before += looked;
                // What the passes looked at and left stays at the head, in order.
                plan.skip = (plan.skip + looked).saturating_sub(walk.removed());
                left = walk.depth_at_start() - walk.removed();
                let first = seen.get_or_insert_with(|| QueueSeen::of(dlq, &walk));
                first.examined = plan.examined_before;
                first.complete = walk.complete();
                walk.finish(&self.connection).await?;
                match pass {
                    Ok(Pass::WindowOver) if !options.stop.is_cancelled() && left > 0 => continue,
                    other => break other,
                }
            };
            if let Some(row) = &row {
                let (status, detail) = match &ended {
                    Ok(_) => ("done", format!("moved {}", row.count)),
                    Err(e) => ("failed", format!("after moving {}: {e}", row.count)),
                };
                audit.finish(row, status, &detail).await?;
                report.audit_ids.push(row.id.clone());
            }
            report.queues.extend(seen);
            if ended? == Pass::LimitReached || options.stop.is_cancelled() {
                report.interrupted = options.stop.is_cancelled();
                break;
            }
        }
        let _ = publisher.close(200, "done".into()).await;
        Ok(report)
    }

    /// Moves the selected messages of one pass over a DLQ, until its
    /// `deadline`.
    #[allow(clippy::too_many_arguments)]
    async fn shovel_queue(
        &self,
        record: &ShovelRecord<'_>,
        dlq: &DlqRef,
        walk: &mut Walk,
        row: &mut Option<AuditRow>,
        pace: &mut Option<tokio::time::Interval>,
        publisher: &lapin::Channel,
        report: &mut ShovelReport,
        destination_exists: &mut HashMap<String, bool>,
        plan: &PassPlan,
        progress: &mut dyn FnMut(&ShovelProgress),
    ) -> Result<Pass, OpsError> {
        let options = record.options;
        let now = Utc::now();
        let mut skipped = 0;
        while let Some(delivery) = walk.next().await? {
            if options.stop.is_cancelled() {
                return Ok(Pass::Done); // the rest is given back when the walk ends
            }
            // Once this pass looked at something new (so every pass makes
            // progress), its window ends it: this one goes back too, and
            // the next pass sees it first.
            if walk.seen() > plan.skip + 1 && tokio::time::Instant::now() >= plan.deadline {
                return Ok(Pass::WindowOver);
            }
            if skipped < plan.skip {
                skipped += 1; // looked at by an earlier pass, and left in place
                continue;
            }
            progress(&ShovelProgress {
                queue: dlq.queue.clone(),
                examined: u64::from(plan.examined_before + walk.seen() - plan.skip),
                to_examine: u64::from(plan.examined_before + walk.depth_at_start() - plan.skip),
                moved: report.moved,
            });
            let dl = dead_letter::summarize(&dlq.tenant, &dlq.context, &dlq.queue, &delivery, now);
            if !record.filter.matches(&dl) {
                continue; // stays where it is: given back when the walk ends
            }
            let home = dead_letter::return_queue(&dl, &delivery.data, options.partitions);
            let destination = options.to.clone().unwrap_or_else(|| home.clone());
            // Its own header names its way home: it is checked like --to.
            check_destination(&dlq.tenant, &destination, options.foreign)?;
            if !destination_exists.contains_key(&destination) {
                let exists = walk::queue_counts(&self.connection, &destination).await?.is_some();
                destination_exists.insert(destination.clone(), exists);
            }
            if !destination_exists[&destination] {
                return Err(OpsError::Usage(format!(
                    "destination queue {destination} (for {}) does not exist",
                    dlq.queue
                )));
            }
            report.selected += 1;
            let id = dl.message_id.clone().unwrap_or_else(|| "-".into());
            if !options.dry_run {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                if row.is_none() {
                    *row = Some(record.begin(dlq, &destination).await?);
                }
                record.audit.add_ids(row.as_mut().expect("row just written"), std::slice::from_ref(&id)).await?;
                let headers = headers::headers_of(&delivery);
                // Back home it is a fresh try; elsewhere (a parking queue)
                // it keeps its verdict.
                let mut headers = if destination == home { headers::for_fresh_attempt(&headers) } else { headers };
                let mut properties = delivery.properties.clone();
                // A command whose operation has its final answer comes back
                // as a new attempt, under an operation of its own.
                let attempt = if destination == home { new_attempt(record, &dl).await? } else { None };
                if let Some(new) = &attempt {
                    // A new attempt: the processors' own re-drives start over.
                    let mut inner = headers.inner().clone();
                    inner.remove(headers::REDRIVES);
                    headers = inner.into();
                    properties = properties.with_message_id(new.id.as_str().into());
                }
                let properties = properties.with_headers(headers);
                publish_confirmed(publisher, &destination, &delivery.data, properties).await.map_err(OpsError::Amqp)?;
                if let Some(new) = &attempt {
                    new.link(record.audit).await?;
                }
                // Only now, with the copy confirmed, may the original go.
                walk.remove(&delivery).await?;
                report.moved += 1;
            }
            report.ids.push(id);
            *report.destinations.entry(destination).or_default() += 1;
            if options.limit.is_some_and(|limit| report.selected >= limit) {
                return Ok(Pass::LimitReached);
            }
        }
        Ok(Pass::Done)
    }

    /// Whole-queue moves to `to` with RabbitMQ's dynamic shovel: it moves
    /// the queue's length at its start, acking each message after the
    /// destination confirmed it, then deletes itself. Headers stay as they
    /// are (a broker shovel cannot rewrite them), which is why moves back to
    /// a work queue never take this path.
    async fn broker_shovel(
        &self,
        record: &ShovelRecord<'_>,
        scope: &Scope,
        to: &str,
        progress: &mut dyn FnMut(&ShovelProgress),
    ) -> Result<ShovelReport, OpsError> {
        if walk::queue_counts(&self.connection, to).await?.is_none() {
            return Err(OpsError::Usage(format!("destination queue {to} does not exist")));
        }
        let uri = match self.management.vhost() {
            "/" => "amqp://".to_owned(),
            vhost => format!("amqp:///{}", encode(vhost)),
        };
        let mut report = ShovelReport {
            method: ShovelMethod::BrokerShovel,
            dry_run: false,
            queues: Vec::new(),
            selected: 0,
            moved: 0,
            ids: Vec::new(),
            destinations: BTreeMap::new(),
            audit_ids: Vec::new(),
            interrupted: false,
            copied_twice: 0,
        };
        for dlq in &scope.dlqs {
            let Some((depth, _)) = walk::queue_counts(&self.connection, &dlq.queue).await? else {
                report.queues.push(QueueSeen::missing(dlq));
                continue;
            };
            if depth > 0 {
                let name = format!("sluice-dlq-{}-{}", dlq.queue, &uuid::Uuid::new_v4().simple().to_string()[..8]);
                let definition = serde_json::json!({
                    "src-protocol": "amqp091",
                    "src-uri": uri,
                    "src-queue": dlq.queue,
                    "src-delete-after": "queue-length",
                    "dest-protocol": "amqp091",
                    "dest-uri": uri,
                    "dest-queue": to,
                    "ack-mode": "on-confirm",
                });
                let mut row = record.begin(dlq, to).await?;
                let before = ShovelStart {
                    at_destination: walk::queue_counts(&self.connection, to).await?.map_or(0, |(ready, _)| ready),
                    dlq_consumers: walk::queue_counts(&self.connection, &dlq.queue).await?.map_or(0, |(_, c)| c),
                };
                report.audit_ids.push(row.id.clone());
                self.management.put_shovel(&name, &definition).await?;
                let moved_before = report.moved;
                let mut report_progress = |moved| {
                    progress(&ShovelProgress {
                        queue: dlq.queue.clone(),
                        examined: moved,
                        to_examine: u64::from(depth),
                        moved: moved_before + moved,
                    })
                };
                let moved = match self.await_shovel(&name, dlq, depth, &record.options.stop, &mut report_progress).await
                {
                    Ok(Shovelled::All) => u64::from(depth),
                    Ok(Shovelled::Stopped) => {
                        report.interrupted = true;
                        let stopped = self.stop_shovel(&name, dlq, depth, to, &before).await?;
                        report.copied_twice += stopped.copied_twice;
                        stopped.moved
                    }
                    Err(e) => {
                        let moved =
                            self.stop_shovel(&name, dlq, depth, to, &before).await.map_or(0, |stopped| stopped.moved);
                        record.audit.add_count(&mut row, moved as i64).await?;
                        record.audit.finish(&row, "failed", &format!("after moving {moved}: {e}")).await?;
                        return Err(e);
                    }
                };
                record.audit.add_count(&mut row, moved as i64).await?;
                let (status, detail) = if report.interrupted {
                    let twice = report.copied_twice;
                    ("interrupted", format!("moved {moved} of {depth} by RabbitMQ's shovel, then stopped; {twice} also still in the DLQ"))
                } else {
                    ("done", format!("moved {moved} by RabbitMQ's shovel"))
                };
                record.audit.finish(&row, status, &detail).await?;
                report.moved += moved;
                report.selected += moved;
                *report.destinations.entry(to.to_owned()).or_default() += moved;
            }
            report.queues.push(QueueSeen {
                queue: dlq.queue.clone(),
                tenant: dlq.tenant.clone(),
                context: dlq.context.clone(),
                exists: true,
                depth,
                examined: depth,
                complete: true,
            });
        }
        Ok(report)
    }

    async fn await_shovel(
        &self,
        name: &str,
        dlq: &DlqRef,
        depth: u32,
        stop: &CancellationToken,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Shovelled, OpsError> {
        let mut last_moved = 0;
        let mut last_change = std::time::Instant::now();
        loop {
            if !self.management.shovel_defined(name).await? {
                progress(u64::from(depth));
                return Ok(Shovelled::All);
            }
            if stop.is_cancelled() {
                return Ok(Shovelled::Stopped);
            }
            if let Some(status) = self.management.shovel_status(name).await? {
                if status["state"] == "terminated" {
                    return Err(OpsError::Management(format!("shovel {name} stopped: {}", status["reason"])));
                }
            }
            let left = walk::ready_messages(&self.connection, &dlq.queue).await?;
            let moved = u64::from(depth.saturating_sub(left));
            progress(moved);
            if moved != last_moved {
                (last_moved, last_change) = (moved, std::time::Instant::now());
            } else if last_change.elapsed() > SHOVEL_STALL {
                return Err(OpsError::Management(format!(
                    "shovel {name} moved nothing for {}s",
                    SHOVEL_STALL.as_secs()
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// Deletes a broker shovel that has not finished. RabbitMQ's shovel acks
    /// its source in batches after the destination confirmed: deleted
    /// midway, the copies it made are in the destination and what it had
    /// not acked yet is back in the DLQ, some of it twice. Counted from both
    /// queues once the shovel is gone (dead letters arriving meanwhile
    /// make `copied_twice` an overcount, never a loss).
    async fn stop_shovel(
        &self,
        name: &str,
        dlq: &DlqRef,
        depth: u32,
        to: &str,
        before: &ShovelStart,
    ) -> Result<Stopped, OpsError> {
        self.management.delete_shovel(name).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // The destination's count, and how many looks in a row found it so.
        let mut settled = (u32::MAX, 0);
        loop {
            // Once the shovel's own consumer is gone (its status first, then
            // the DLQ's consumers back to those it had before the shovel: a
            // processor's re-drive may be one), what it held unacked is
            // ready again. Its copies still on their way to the destination
            // (seen: a thousand arriving after its consumer had left) are
            // waited for: its connections gone, and the destination's count
            // the same at three looks in a row.
            let (ready, consumers) = walk::queue_counts(&self.connection, &dlq.queue).await?.unwrap_or((0, 0));
            let copies = walk::queue_counts(&self.connection, to).await?.map_or(0, |(ready, _)| ready);
            settled = if settled.0 == copies { (copies, settled.1 + 1) } else { (copies, 1) };
            let gone = consumers <= before.dlq_consumers
                && self.management.shovel_status(name).await?.is_none()
                && self.management.shovel_connections(name).await? == 0;
            if (gone && settled.1 >= 3) || std::time::Instant::now() > deadline {
                let moved = u64::from(copies.saturating_sub(before.at_destination));
                let left = u64::from(ready);
                return Ok(Stopped { moved, copied_twice: (moved + left).saturating_sub(u64::from(depth)) });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the dead letters that match `filter` (all of them when it is
    /// empty) and were there when the purge started, recording each in the
    /// audit log first (one row per queue something was removed from).
    pub async fn purge(
        &self,
        audit: &AuditLog,
        scope: &Scope,
        filter: &Filter,
        who: &Who,
    ) -> Result<RemovalReport, OpsError> {
        let description = filter.describe();
        self.remove(audit, scope, "purge", who, &description, &|dl| filter.matches(dl)).await
    }

    /// Removes the dead letter with this message id (every copy of it).
    pub async fn delete(
        &self,
        audit: &AuditLog,
        scope: &Scope,
        message_id: &str,
        who: &Who,
    ) -> Result<RemovalReport, OpsError> {
        let description = format!("message_id={message_id}");
        let report = self
            .remove(audit, scope, "delete", who, &description, &|dl| dl.message_id.as_deref() == Some(message_id))
            .await?;
        if report.removed == 0 {
            return Err(OpsError::NotFound(message_id.to_owned(), describe(scope)));
        }
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    async fn remove(
        &self,
        audit: &AuditLog,
        scope: &Scope,
        action: &str,
        who: &Who,
        selection: &str,
        selects: &(dyn Fn(&DeadLetter) -> bool + Sync),
    ) -> Result<RemovalReport, OpsError> {
        if who.reason.trim().is_empty() {
            return Err(OpsError::Usage("a justification is required (--why): it goes to the audit log".into()));
        }
        let mut report = RemovalReport {
            action: action.to_owned(),
            actor: who.actor.clone(),
            reason: who.reason.clone(),
            queues: Vec::new(),
            removed: 0,
            ids: Vec::new(),
        };
        for dlq in &scope.dlqs {
            let Some(walk) = self.walk(dlq).await? else {
                report.queues.push(QueueRemoval { seen: QueueSeen::missing(dlq), removed: 0, audit_id: None });
                continue;
            };
            let what = AuditAction {
                tenant: &dlq.tenant,
                context: &dlq.context,
                queue: &dlq.queue,
                action,
                actor: &who.actor,
                reason: &who.reason,
                filter: selection,
            };
            // Written just before the first removal: a queue where nothing
            // was selected gets no row.
            let mut row = None;
            let mut removal = Removal { walk, ids: Vec::new() };
            let outcome = self.remove_from(audit, &what, &mut row, &mut removal, dlq, selects).await;
            let seen = QueueSeen::of(dlq, &removal.walk);
            let removed = removal.ids.len() as u64;
            if let Some(row) = &row {
                let (status, detail) = match &outcome {
                    Ok(()) if seen.complete => {
                        ("done".to_owned(), format!("removed {removed} of {} examined", seen.examined))
                    }
                    Ok(()) => (
                        "done".to_owned(),
                        format!(
                            "removed {removed}; {} of {} examined (run again for the rest)",
                            seen.examined, seen.depth
                        ),
                    ),
                    Err(e) => ("failed".to_owned(), format!("after removing {removed}: {e}")),
                };
                audit.finish(row, &status, &detail).await?;
            }
            removal.walk.finish(&self.connection).await?;
            outcome?;
            report.removed += removed;
            report.ids.extend(removal.ids);
            report.queues.push(QueueRemoval { seen, removed, audit_id: row.map(|r| r.id) });
        }
        Ok(report)
    }

    /// Walks one queue, removing the selected messages batch by batch: ids
    /// into the audit row first, then the acks.
    async fn remove_from(
        &self,
        audit: &AuditLog,
        what: &AuditAction<'_>,
        row: &mut Option<AuditRow>,
        removal: &mut Removal,
        dlq: &DlqRef,
        selects: &(dyn Fn(&DeadLetter) -> bool + Sync),
    ) -> Result<(), OpsError> {
        let now = Utc::now();
        let operations = CqlOperationStore::new(audit.session().clone(), "sluice-cli").await.map_err(cql_err)?;
        let mut batch: Vec<(Delivery, ArchivedLetter, DeadLetter)> = Vec::new();
        loop {
            let next = removal.walk.next().await?;
            // `None`: the walk is over, or its window is full until this
            // batch is acked.
            let paused = next.is_none();
            if let Some(delivery) = next {
                let dl = dead_letter::summarize(&dlq.tenant, &dlq.context, &dlq.queue, &delivery, now);
                if selects(&dl) {
                    let detail = dead_letter::detail(&dlq.tenant, &dlq.context, &dlq.queue, &delivery, now);
                    let archived = ArchivedLetter {
                        message_id: dead_letter::id_or_dash(&dl).to_owned(),
                        detail: serde_json::to_value(&detail).unwrap_or_default(),
                        body: delivery.data.clone(),
                    };
                    batch.push((delivery, archived, dl));
                }
                if batch.len() < REMOVE_BATCH {
                    continue;
                }
            }
            if batch.is_empty() {
                if paused {
                    return Ok(());
                }
                continue;
            }
            let letters: Vec<ArchivedLetter> = batch.iter().map(|(_, letter, _)| letter.clone()).collect();
            if row.is_none() {
                *row = Some(audit.begin(what).await?);
            }
            audit.add(row.as_mut().expect("row just written"), &letters).await?;
            for (delivery, letter, dl) in batch.drain(..) {
                final_answer(&operations, &dl, what).await?;
                removal.walk.remove(&delivery).await?;
                removal.ids.push(letter.message_id);
            }
        }
    }
}

/// A removed dead letter's operation gets its final answer, `dead_lettered`,
/// if it had none yet (the processors would have re-driven it): every
/// accepted command ends in exactly one terminal state.
async fn final_answer(operations: &CqlOperationStore, dl: &DeadLetter, what: &AuditAction<'_>) -> Result<(), OpsError> {
    let (Some(op), Some(source), Some(command_id)) = (&dl.message_id, &dl.source, &dl.command_id) else {
        return Ok(());
    };
    let status = operations.status(&dl.tenant, op).await.map_err(cql_err)?;
    if status.as_deref().is_some_and(Status::is_settled) {
        return Ok(());
    }
    let reason = format!(
        "{}; removed from the dead-letter queue ({} by {}: {})",
        dl.reason.as_deref().unwrap_or(&dl.error_class),
        what.action,
        what.actor,
        what.reason
    );
    let op_ref =
        OperationRef { tenant: &dl.tenant, operation_id: op, command_type: &dl.command_type, source, command_id };
    operations.record(op_ref, &Status::DeadLettered(reason), Order::default()).await.map_err(cql_err)
}

/// A dead letter sent home whose operation has its final answer
/// (`dead_lettered`, which never changes) comes back as a new attempt, under
/// an operation of its own that the old one links to (`retried_as`). Its id
/// follows from the old one, so a shovel run again after a crash sends the
/// same attempt, which the processors answer once.
struct NewAttempt {
    tenant: String,
    old: String,
    id: String,
}

async fn new_attempt(record: &ShovelRecord<'_>, dl: &DeadLetter) -> Result<Option<NewAttempt>, OpsError> {
    let (Some(old), Some(source), Some(command_id)) = (&dl.message_id, &dl.source, &dl.command_id) else {
        return Ok(None);
    };
    let status = record
        .audit
        .session()
        .query_unpaged("SELECT status FROM operations WHERE tenant = ? AND operation_id = ?", (&dl.tenant, old))
        .await
        .map_err(cql_err)?
        .into_rows_result()
        .map_err(cql_err)?
        .maybe_first_row::<(Option<String>,)>()
        .map_err(cql_err)?
        .and_then(|(status,)| status);
    if status.as_deref() != Some("dead_lettered") {
        return Ok(None); // not answered yet: it comes back under its own operation
    }
    let ids = record.options.operation_ids.as_ref().ok_or_else(|| {
        OpsError::Usage(
            "sending a dead-lettered command back needs the operation secret (ingest.operation_secret)".into(),
        )
    })?;
    let id = ids.issue(&dl.tenant, source, &format!("{command_id}#retry-of-{old}"));
    Ok(Some(NewAttempt { tenant: dl.tenant.clone(), old: old.clone(), id }))
}

impl NewAttempt {
    /// Links the old operation to the new one (its answer stays as it is).
    async fn link(&self, audit: &AuditLog) -> Result<(), OpsError> {
        audit
            .session()
            .query_unpaged(
                "UPDATE operations SET retried_as = ? WHERE tenant = ? AND operation_id = ?",
                (&self.id, &self.tenant, &self.old),
            )
            .await
            .map_err(cql_err)?;
        Ok(())
    }
}

/// What a broker shovel's stop compares with: the queues as it found them.
struct ShovelStart {
    /// Messages ready in the destination.
    at_destination: u32,
    /// Consumers of the DLQ other than the shovel.
    dlq_consumers: u32,
}

/// What a broker shovel stopped midway had done.
struct Stopped {
    /// Copies in the destination.
    moved: u64,
    /// Of those, the ones whose original is back in the DLQ.
    copied_twice: u64,
}

/// How a broker shovel ended.
enum Shovelled {
    All,
    Stopped,
}

/// What every audit row of one shovel says.
struct ShovelRecord<'a> {
    audit: &'a AuditLog,
    who: &'a Who,
    filter: &'a Filter,
    described: String,
    options: &'a ShovelOptions,
}

impl ShovelRecord<'_> {
    /// Writes the row of a move out of `dlq` about to start.
    async fn begin(&self, dlq: &DlqRef, destination: &str) -> Result<AuditRow, OpsError> {
        let to = match &self.options.to {
            Some(to) => to.clone(),
            None => format!("their work queues ({destination}, …)"),
        };
        let selection = format!("{} to {to}", self.described);
        let action = AuditAction {
            tenant: &dlq.tenant,
            context: &dlq.context,
            queue: &dlq.queue,
            action: if self.options.foreign { "shovel-foreign" } else { "shovel" },
            actor: &self.who.actor,
            reason: &self.who.reason,
            filter: &selection,
        };
        self.audit.begin(&action).await
    }
}

/// A shovel from `tenant`'s DLQ moves to `tenant`'s own queues only, unless
/// the operator named a foreign destination on purpose.
fn check_destination(tenant: &str, destination: &str, foreign: bool) -> Result<(), OpsError> {
    if foreign || destination.starts_with(&format!("{tenant}.")) {
        return Ok(());
    }
    Err(OpsError::Usage(format!(
        "{destination} is not a queue of tenant {tenant}: a shovel moves a tenant's dead letters to its own \
         queues (to name another on purpose, use --to-foreign; it is audited as such)"
    )))
}

/// A walk and what it removed so far (kept together so a failure midway
/// still reports what is gone).
struct Removal {
    walk: Walk,
    ids: Vec<String>,
}

fn message_id_of(delivery: &Delivery) -> Option<String> {
    delivery.properties.message_id().as_ref().map(|s| s.to_string())
}

fn describe(scope: &Scope) -> String {
    let queues: Vec<&str> = scope.dlqs.iter().map(|d| d.queue.as_str()).collect();
    queues.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_names_the_dlqs_of_its_tenants_and_contexts() {
        let configured = vec!["acme".to_owned(), "globex".to_owned()];
        let all = Scope::new(&configured, None, None).unwrap();
        let queues: Vec<&str> = all.dlqs.iter().map(|d| d.queue.as_str()).collect();
        assert_eq!(queues.len(), 2 * catalog::CONTEXTS.len(), "every context of every tenant");
        assert_eq!(queues[0], "acme.orders.commands.dlq");
        assert!(queues.contains(&"globex.orders.commands.dlq"));
        let one = Scope::new(&configured, Some("globex"), Some("orders")).unwrap();
        assert_eq!(one.dlqs[0].queue, "globex.orders.commands.dlq");
        assert!(
            matches!(Scope::new(&configured, Some("t123"), None), Err(OpsError::Usage(m)) if m.contains("unknown tenant")),
            "a tenant the config does not know is refused, like an unknown context"
        );
        let unchecked = Scope::new(&[], Some("t123"), None).unwrap();
        assert_eq!(unchecked.dlqs[0].tenant, "t123", "without tenants in the config there is nothing to check against");
        assert!(matches!(Scope::new(&configured, None, Some("billing")), Err(OpsError::Usage(_))));
        assert!(matches!(Scope::new(&[], None, None), Err(OpsError::Usage(_))));
    }
}
