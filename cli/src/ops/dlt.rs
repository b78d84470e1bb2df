//! `sluice dlt`: the dead-letter topics of the Kafka consumers (the
//! projections and the process managers) and their parked keys.
//!
//! A record a consumer can never apply goes to `<topic>.<consumer>.dlt` and
//! parks its key; the key's later records follow it there (class `parked`),
//! so they are never applied out of order. After a fix (a schema restored,
//! a bug fixed), [`Dlt::replay`] applies a key's dead-lettered records in
//! their original order and unparks it:
//!
//! 1. a release row (`projection_key_releases`) makes the live consumer hold
//!    the key's new records (retried) instead of dead-lettering them;
//! 2. after a grace longer than a dead-letter write in flight, the
//!    dead-letter topic is read to its end: every record of the key, once
//!    per original offset, in original order;
//! 3. they are applied with the consumer's own code; then the parked row
//!    goes, then the release row: the held records apply after them.
//!
//! A record that still cannot be applied stops the replay: the key stays
//! parked, nothing after that record is applied. [`Dlt::unpark`] frees a key
//! without applying its dead letters (they stay in the topic). Both are
//! audited in `dlq_audit` like the DLQ verbs. A process manager's dead
//! letters are applied by its own runtime: each step is recorded in the
//! instance's stream before it is carried out, so nothing is sent twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Headers, Message, OwnedMessage};
use scylla::client::session::Session;
use scylla::value::CqlTimestamp;
use serde::Serialize;
use sluice_processors::process::onboarding::Onboarding;
use sluice_processors::process::runtime::handle_record;
use sluice_processors::process::ProcessManager;
use sluice_projections::apply::{tenant_of, Applier};
use sluice_projections::orders::Orders;
use sluice_projections::patients::Patients;
use sluice_projections::store::ReadModels;
use sluice_schemas::codec::EventCodec;
use sluice_schemas::names;
use sluice_schemas::operation_id::OperationIds;
use sluice_streams::dead_letter::{dead_letter_topic, key_state, DeadLetters, Parking};
use sluice_streams::ApplyError;

use super::audit::{AuditAction, AuditLog};
use super::{cql_err, OpsError};
use crate::settings::Settings;

const ORDERS: &str = "orders projection";
const PATIENTS: &str = "patients projection";

/// One consumer with dead-letter topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerRef {
    pub name: String,
    /// Parked keys are per version of a versioned projection.
    pub version: i32,
    /// What it is: `orders projection`, `patients projection`, `process`.
    pub kind: &'static str,
    /// The events topics it reads.
    pub topics: Vec<String>,
}

/// A parked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedKey {
    pub consumer: String,
    pub version: i32,
    pub topic: String,
    pub key: String,
    /// Offset of the poison record that parked it.
    pub first_offset: i64,
    pub reason: String,
    /// `sluice dlt replay` is applying its records.
    pub releasing: bool,
}

/// One record of a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadRecord {
    pub consumer: String,
    pub dlt: String,
    pub dlt_partition: i32,
    pub dlt_offset: i64,
    pub key: String,
    pub class: String,
    pub reason: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The CloudEvent type the record carried, if any.
    pub event_type: Option<String>,
    pub payload_bytes: usize,
    /// Every header, for `show`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The payload as hex, for `show` (the first 256 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
}

impl DeadRecord {
    fn of(consumer: &str, m: &OwnedMessage, detail: bool) -> Self {
        let header = |name: &str| sluice_streams::dead_letter::header(m, name);
        let number = |name: &str| header(name).and_then(|v| v.parse().ok()).unwrap_or(-1);
        let headers = if detail {
            m.headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_owned(),
                                x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let payload = m.payload().unwrap_or_default();
        Self {
            consumer: consumer.to_owned(),
            dlt: m.topic().to_owned(),
            dlt_partition: m.partition(),
            dlt_offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            class: header("sluice_error_class").unwrap_or_default(),
            reason: header("sluice_reason").unwrap_or_default(),
            topic: header("sluice_original_topic").unwrap_or_default(),
            partition: number("sluice_original_partition") as i32,
            offset: number("sluice_original_offset"),
            event_type: header("ce_type"),
            payload_bytes: payload.len(),
            headers,
            payload_hex: detail.then(|| payload.iter().take(256).map(|b| format!("{b:02x}")).collect()),
        }
    }
}

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct DltFilter {
    pub consumer: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
}

impl DltFilter {
    fn consumer(&self, c: &ConsumerRef) -> bool {
        self.consumer.as_deref().is_none_or(|name| name == c.name)
    }

    fn topic(&self, topic: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| tenant_of(topic) == Some(t))
    }

    fn key(&self, key: &str) -> bool {
        self.key.as_deref().is_none_or(|k| k == key)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DltListing {
    pub parked: Vec<ParkedKey>,
    pub records: Vec<DeadRecord>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    pub consumer: String,
    pub topic: String,
    pub key: String,
    /// Records applied, in original order (duplicates of one original
    /// offset counted once).
    pub applied: usize,
    /// The record that still cannot be applied (the key stays parked).
    pub failed: Option<(i64, String)>,
    pub unparked: bool,
}

pub struct Dlt {
    settings: Settings,
    session: Arc<Session>,
    audit: AuditLog,
}

impl Dlt {
    pub fn new(settings: Settings, session: Arc<Session>) -> Self {
        let audit = AuditLog::new(session.clone());
        Self { settings, session, audit }
    }

    /// Every consumer of the configured tenants that has dead-letter topics.
    pub async fn consumers(&self) -> Result<Vec<ConsumerRef>, OpsError> {
        let tenants: Vec<String> = self.settings.tenants.iter().map(|t| t.name.clone()).collect();
        let topics = |context: &str| tenants.iter().map(|t| names::events_topic(t, context)).collect::<Vec<_>>();
        let store = ReadModels::new(self.session.clone(), &self.settings.projector).await.map_err(cql_err)?;
        let version = store.versions().get(&self.settings.projector.name).await.map_err(cql_err)?.active;
        let patients_version =
            store.versions().get(&self.settings.projector.patients_name).await.map_err(cql_err)?.active;
        let patients = sluice_schemas::patients::CONTEXT;
        Ok(vec![
            ConsumerRef {
                name: self.settings.projector.name.clone(),
                version,
                kind: ORDERS,
                topics: topics(sluice_schemas::orders::CONTEXT),
            },
            ConsumerRef {
                name: self.settings.projector.patients_name.clone(),
                version: patients_version,
                kind: PATIENTS,
                topics: topics(patients),
            },
            ConsumerRef {
                name: <Onboarding as ProcessManager>::NAME.into(),
                version: 1,
                kind: "process",
                topics: topics(patients),
            },
        ])
    }

    async fn consumer(&self, name: &str) -> Result<ConsumerRef, OpsError> {
        let all = self.consumers().await?;
        let names: Vec<String> = all.iter().map(|c| c.name.clone()).collect();
        all.into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| OpsError::Usage(format!("no consumer {name:?}; the consumers are {}", names.join(", "))))
    }

    /// The parked keys of `consumer` in the configured tenants' topics.
    pub async fn parked(&self, consumer: &ConsumerRef) -> Result<Vec<ParkedKey>, OpsError> {
        let rows = self
            .session
            .query_unpaged(
                "SELECT topic, key, first_offset, reason FROM projection_parked_keys WHERE projection = ? AND version = ?",
                (&consumer.name, consumer.version),
            )
            .await
            .map_err(cql_err)?
            .into_rows_result()
            .map_err(cql_err)?;
        let mut out = Vec::new();
        for row in rows.rows::<(String, String, Option<i64>, Option<String>)>().map_err(cql_err)? {
            let (topic, key, first_offset, reason) = row.map_err(cql_err)?;
            if !consumer.topics.contains(&topic) {
                continue;
            }
            let releasing =
                key_state(&self.session, &consumer.name, consumer.version, &topic, &key).await.map_err(cql_err)?
                    == Parking::Releasing;
            out.push(ParkedKey {
                consumer: consumer.name.clone(),
                version: consumer.version,
                topic,
                key,
                first_offset: first_offset.unwrap_or(-1),
                reason: reason.unwrap_or_default(),
                releasing,
            });
        }
        Ok(out)
    }

    /// The brokers of the Kafka cluster holding `topic` (its tenant's).
    fn brokers_of(&self, topic: &str) -> &str {
        tenant_of(topic).map_or(&self.settings.kafka.brokers, |tenant| self.settings.kafka_brokers_for(tenant))
    }

    /// Parked keys and dead-lettered records matching `filter`;
    /// `progress(topic)` hears each dead-letter topic as it is read.
    pub async fn list(&self, filter: &DltFilter, mut progress: impl FnMut(&str)) -> Result<DltListing, OpsError> {
        let mut listing = DltListing { parked: Vec::new(), records: Vec::new() };
        for consumer in self.consumers().await?.iter().filter(|c| filter.consumer(c)) {
            listing.parked.extend(
                self.parked(consumer).await?.into_iter().filter(|p| filter.topic(&p.topic) && filter.key(&p.key)),
            );
            for topic in consumer.topics.iter().filter(|t| filter.topic(t)) {
                let dlt = dead_letter_topic(topic, &consumer.name);
                progress(&dlt);
                let records = read_to_end(self.brokers_of(topic), &dlt).await?;
                listing.records.extend(
                    records.iter().map(|m| DeadRecord::of(&consumer.name, m, false)).filter(|r| filter.key(&r.key)),
                );
            }
        }
        Ok(listing)
    }

    /// Every dead-lettered record of one key of one consumer, in full.
    pub async fn show(&self, consumer: &str, tenant: &str, key: &str) -> Result<Vec<DeadRecord>, OpsError> {
        let consumer = self.consumer(consumer).await?;
        let mut out = Vec::new();
        for topic in consumer.topics.iter().filter(|t| tenant_of(t) == Some(tenant)) {
            let records = read_to_end(self.brokers_of(topic), &dead_letter_topic(topic, &consumer.name)).await?;
            out.extend(
                records
                    .iter()
                    .filter(|m| m.key() == Some(key.as_bytes()))
                    .map(|m| DeadRecord::of(&consumer.name, m, true)),
            );
        }
        Ok(out)
    }

    /// Applies a parked key's dead-lettered records in their original order
    /// and unparks it (see the module's steps); `progress(done, total)`
    /// hears each record applied.
    pub async fn replay(
        &self,
        consumer: &str,
        tenant: &str,
        key: &str,
        who: (&str, &str),
        grace: Duration,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<ReplayOutcome, OpsError> {
        let consumer = self.consumer(consumer).await?;
        let topic = self.parked_topic(&consumer, tenant, key).await?;
        let dlt = dead_letter_topic(&topic, &consumer.name);
        let (actor, reason) = who;
        let action = AuditAction {
            tenant,
            context: sluice_projections::apply::context_of(&topic).unwrap_or_default(),
            queue: &dlt,
            action: "dlt-replay",
            actor,
            reason,
            filter: key,
        };
        let mut row = self.audit.begin(&action).await?;
        let values = (&consumer.name, consumer.version, &topic, key);
        self.session
            .query_unpaged(
                "INSERT INTO projection_key_releases (projection, version, topic, key, started_at, actor) VALUES (?, ?, ?, ?, ?, ?)",
                (&consumer.name, consumer.version, &topic, key, CqlTimestamp(chrono::Utc::now().timestamp_millis()), actor),
            )
            .await
            .map_err(cql_err)?;
        let outcome = self.apply_dead_letters(&consumer, &topic, &dlt, key, grace, &mut progress).await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                self.release_done(values).await?;
                self.audit.finish(&row, "failed", &e.to_string()).await?;
                return Err(e);
            }
        };
        if outcome.failed.is_none() {
            self.session
                .query_unpaged(
                    "DELETE FROM projection_parked_keys WHERE projection = ? AND version = ? AND topic = ? AND key = ?",
                    values,
                )
                .await
                .map_err(cql_err)?;
        }
        self.release_done(values).await?;
        let ids: Vec<String> = vec![format!("{topic}:{key}")];
        self.audit.add_ids(&mut row, &ids).await?;
        let detail = match &outcome.failed {
            None => format!("{} record(s) applied; unparked", outcome.applied),
            Some((offset, why)) => {
                format!("{} applied; offset {offset} still fails ({why}); still parked", outcome.applied)
            }
        };
        self.audit.finish(&row, if outcome.failed.is_none() { "done" } else { "failed" }, &detail).await?;
        Ok(outcome)
    }

    async fn release_done(&self, values: (&String, i32, &String, &str)) -> Result<(), OpsError> {
        self.session
            .query_unpaged(
                "DELETE FROM projection_key_releases WHERE projection = ? AND version = ? AND topic = ? AND key = ?",
                values,
            )
            .await
            .map_err(cql_err)?;
        Ok(())
    }

    async fn apply_dead_letters(
        &self,
        consumer: &ConsumerRef,
        topic: &str,
        dlt: &str,
        key: &str,
        grace: Duration,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<ReplayOutcome, OpsError> {
        // A dead-letter write that saw the key parked just before the release
        // row landed is done within this grace (its send times out before).
        tokio::time::sleep(grace).await;
        let mut by_offset: BTreeMap<(i32, i64), OwnedMessage> = BTreeMap::new();
        for m in read_to_end(self.brokers_of(topic), dlt).await? {
            let r = DeadRecord::of(&consumer.name, &m, false);
            if r.key == key && r.topic == topic {
                by_offset.entry((r.partition, r.offset)).or_insert(m);
            }
        }
        // The records as they were in the events topic: their own topic,
        // partition and offset, not the dead-letter topic's.
        let records: Vec<OwnedMessage> = by_offset
            .into_iter()
            .map(|((partition, offset), dead)| {
                OwnedMessage::new(
                    dead.payload().map(<[u8]>::to_vec),
                    dead.key().map(<[u8]>::to_vec),
                    topic.to_owned(),
                    dead.timestamp(),
                    partition,
                    offset,
                    dead.headers().cloned(),
                )
            })
            .collect();
        let mut outcome = ReplayOutcome {
            consumer: consumer.name.clone(),
            topic: topic.to_owned(),
            key: key.to_owned(),
            applied: 0,
            failed: None,
            unparked: false,
        };
        let (brokers, registry) = (&self.brokers_of(topic).to_owned(), &self.settings.registry.url);
        match consumer.kind {
            ORDERS => {
                let orders = Arc::new(Orders { name: consumer.name.clone() });
                let (session, version) = (self.session.clone(), consumer.version);
                let applier =
                    Applier::new(brokers, registry, orders, session, version).await.map_err(cql_err)?.replaying();
                apply_in_order(&records, &mut outcome, progress, async |r| applier.apply(r).await.map(drop)).await;
            }
            PATIENTS => {
                let (session, version) = (self.session.clone(), consumer.version);
                let applier = Applier::new(
                    brokers,
                    registry,
                    Arc::new(Patients { name: consumer.name.clone() }),
                    session,
                    version,
                )
                .await
                .map_err(cql_err)?
                .replaying();
                apply_in_order(&records, &mut outcome, progress, async |r| applier.apply(r).await.map(drop)).await;
            }
            _ => {
                let infra = sluice_processors::Infra {
                    amqp: self.settings.amqp_connections(),
                    partitions: self.settings.amqp.partitions,
                    operation_ids: OperationIds::new(&self.settings.ingest.operation_secret),
                    kafka: self.settings.kafka_clusters(),
                    replication: self.settings.kafka.replication(),
                    registry_url: registry.clone(),
                    session: self.session.clone(),
                };
                let runtime = sluice_processors::onboarding_runtime(&self.settings.processor.processes, &infra)
                    .await
                    .map_err(|e| OpsError::Usage(e.to_string()))?;
                let codec = EventCodec::new(registry).map_err(cql_err)?;
                let dead_letters = DeadLetters::new(brokers, self.session.clone(), &consumer.name, consumer.version)
                    .await
                    .map_err(cql_err)?
                    .replaying();
                // Each step is recorded in the instance's stream before it is
                // carried out, so applying a record twice sends nothing twice.
                let apply = async |r: &OwnedMessage| handle_record(&runtime, &codec, &dead_letters, r).await.map(drop);
                apply_in_order(&records, &mut outcome, progress, apply).await;
            }
        }
        outcome.unparked = outcome.failed.is_none();
        Ok(outcome)
    }

    /// Frees a parked key without applying its dead letters (they stay in
    /// the dead-letter topic); its next records apply as they come.
    pub async fn unpark(
        &self,
        consumer: &str,
        tenant: &str,
        key: &str,
        who: (&str, &str),
    ) -> Result<ParkedKey, OpsError> {
        let consumer = self.consumer(consumer).await?;
        let topic = self.parked_topic(&consumer, tenant, key).await?;
        let parked = self.parked(&consumer).await?.into_iter().find(|p| p.topic == topic && p.key == key);
        let parked = parked.ok_or_else(|| not_parked(&consumer, tenant, key))?;
        let dlt = dead_letter_topic(&topic, &consumer.name);
        let action = AuditAction {
            tenant,
            context: sluice_projections::apply::context_of(&topic).unwrap_or_default(),
            queue: &dlt,
            action: "dlt-unpark",
            actor: who.0,
            reason: who.1,
            filter: key,
        };
        let mut row = self.audit.begin(&action).await?;
        self.session
            .query_unpaged(
                "DELETE FROM projection_parked_keys WHERE projection = ? AND version = ? AND topic = ? AND key = ?",
                (&consumer.name, consumer.version, &topic, key),
            )
            .await
            .map_err(cql_err)?;
        self.audit.add_ids(&mut row, &[format!("{topic}:{key}")]).await?;
        self.audit.finish(&row, "done", "unparked; its dead letters were not applied").await?;
        Ok(parked)
    }

    /// The events topic of `tenant` in which `consumer` parked `key`.
    async fn parked_topic(&self, consumer: &ConsumerRef, tenant: &str, key: &str) -> Result<String, OpsError> {
        let parked = self.parked(consumer).await?;
        parked
            .into_iter()
            .find(|p| tenant_of(&p.topic) == Some(tenant) && p.key == key)
            .map(|p| p.topic)
            .ok_or_else(|| not_parked(consumer, tenant, key))
    }
}

fn not_parked(consumer: &ConsumerRef, tenant: &str, key: &str) -> OpsError {
    OpsError::NotParked { consumer: consumer.name.clone(), tenant: tenant.to_owned(), key: key.to_owned() }
}

/// Applies `records` one after the other until one fails.
async fn apply_in_order(
    records: &[OwnedMessage],
    outcome: &mut ReplayOutcome,
    progress: &mut impl FnMut(usize, usize),
    apply: impl AsyncFn(&OwnedMessage) -> Result<(), ApplyError>,
) {
    for record in records {
        if let Err(e) = apply(record).await {
            outcome.failed = Some((record.offset(), e.to_string()));
            return;
        }
        outcome.applied += 1;
        progress(outcome.applied, records.len());
    }
}

/// Every record of `topic`, from its start to the end it had when asked.
pub async fn read_to_end(brokers: &str, topic: &str) -> Result<Vec<OwnedMessage>, OpsError> {
    sluice_streams::dead_letter::read_to_end(brokers, topic).await.map_err(|e| OpsError::Usage(format!("Kafka: {e}")))
}
