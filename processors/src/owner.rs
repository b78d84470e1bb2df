//! The owner of one command partition: decides its commands in rounds.
//!
//! While a processor owns a partition, nobody else decides its commands, so
//! the owner keeps each stream's state in memory and decides without asking
//! the store whether anything changed. A round takes the deliveries at hand
//! (in the order the queue handed them out, which is the order the edge
//! accepted them) and:
//!
//! 1. checks and parses each command (a malformed one is dead-lettered);
//! 2. loads the streams it does not know yet, and reads each command's
//!    operation record (a command already answered is answered again);
//! 3. decides the commands in order, each on its stream's state so far;
//! 4. journals the round's decisions in one write and reads the owner's
//!    epoch back ([`crate::journal`]): from here on the decisions stand;
//! 5. writes each stream's new events in one write, records rejections,
//!    produces the events in a Kafka transaction that also commits the
//!    journal position (other partitions' rounds may share it: the
//!    processor shares its producers per context, [`crate::kafka`]), recording
//!    the successes before the commit.
//!
//! Step 5 of a round runs in a task of its own (the relay) while the next
//! round goes through steps 1 to 4: decisions stand once journaled, so the
//! next round decides on them without waiting for Kafka. Rounds are finished
//! one at a time and in journal order, so Kafka sees each stream's events in
//! version order; at most one decided round waits for the one in flight.
//!
//! A failure before step 4 sends the round's commands back for a retry
//! with backoff (the consumer holds back only their streams). After step 4
//! the owner redoes step 5 until it succeeds (Kafka or the registry may be
//! down for hours): a journaled decision is never dead-lettered. A new owner
//! first fences the producers of the partition's earlier owners, then redoes
//! step 5 for every entry past the committed relay position. A takeover of
//! another partition fences this processor's producer too: step 5 goes on
//! once the journal says the partition is still this owner's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use sluice_schemas::catalog::CommandSchemas;
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::amqp::consumer::PartitionRef;
use crate::domain::{Aggregate, DomainEvent, Stamp};
use crate::event_store::{EventStore, StoredEvent, StreamRef};
use crate::journal::{Appended, Entry, Journal, Verdict, MAX_BYTES_PER_WRITE};
use crate::kafka::{OutgoingEvent, Relay, RelayError, RelayFactory, RelayPosition};
use crate::operations::{EventPosition, OperationRef, OperationStore, Order, Status};

/// A command as it arrives from the work queue.
#[derive(Debug, Clone)]
pub struct IncomingCommand {
    pub tenant: String,
    pub operation_id: String,
    pub event: CloudEvent,
    /// 1 on the first try; counts retries.
    pub attempt: u32,
    /// W3C trace context, carried on to the Kafka headers.
    pub traceparent: Option<String>,
}

impl IncomingCommand {
    fn op_ref(&self) -> OperationRef<'_> {
        OperationRef {
            tenant: &self.tenant,
            operation_id: &self.operation_id,
            command_type: &self.event.ty,
            source: &self.event.source,
            command_id: &self.event.id,
        }
    }
}

/// What the consumer does with one delivery of the round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Events stored and produced, operation recorded: ack.
    Succeeded,
    /// A business rule said no, operation recorded: ack.
    Rejected(String),
    /// Answered before (a redelivery, a resubmission): ack.
    AlreadyDone,
    /// Cannot ever succeed: dead-letter with the reason, then ack.
    DeadLetter { class: &'static str, reason: String },
    /// Not decided: a dependency failed; try again after a backoff.
    Retry(String),
}

/// Why the owner stopped: the partition is released either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// A newer owner exists: nothing more may be written.
    Fenced(String),
    /// The partition is being released (stop).
    Stopped,
    /// The relay's task ended without an answer (a bug: it panicked).
    Failed(String),
}

/// A round's commands once decided: the answers known at once, and the
/// round that answers the others when it is finished.
#[derive(Debug)]
pub struct Decided {
    pub round: u64,
    /// One per command; `None` for a journaled command, answered by
    /// [`Finished`] of `round`.
    pub outcomes: Vec<Option<Outcome>>,
}

/// A round's journaled commands answered, in their order in the round.
#[derive(Debug)]
pub struct Finished {
    pub round: u64,
    pub outcomes: Vec<Outcome>,
}

/// What every owner of one context shares.
pub struct Backends<S, J, O, F> {
    /// Commands can reach the queue without the edge (ops tools, other
    /// producers), so their data is checked against its schema here too.
    pub schemas: CommandSchemas,
    pub store: S,
    pub journal: J,
    pub operations: O,
    pub relays: F,
    /// Backoff between tries of what follows the journal.
    pub retry_delays_ms: Vec<u64>,
}

/// A stream as the owner knows it.
struct Stream<S> {
    version: i64,
    state: S,
    /// Command keys decided on this stream (appended or rejected).
    decided: HashSet<String>,
}

/// Streams held in memory per partition before the cache starts over.
const MAX_CACHED_STREAMS: usize = 50_000;
/// Journal entries per write (the batch also has a size limit,
/// [`MAX_BYTES_PER_WRITE`]).
const MAX_ENTRIES_PER_WRITE: usize = 64;
/// Relayed journal entries are trimmed every this many seqs.
const TRIM_EVERY: i64 = 1_000;

pub struct Owner<A: Aggregate, S, J, O, F: RelayFactory> {
    partition: PartitionRef,
    backends: Arc<Backends<S, J, O, F>>,
    epoch: i64,
    next_seq: i64,
    streams: HashMap<String, Stream<A::State>>,
    /// Streams held before the cache starts over ([`MAX_CACHED_STREAMS`]).
    max_streams: usize,
    /// A journal write failed with an unknown outcome: claim again first.
    unsure: bool,
    /// The processor's name, as the journal records it.
    name: String,
    stop: CancellationToken,
    relayer: Slot<A, S, J, O, F>,
    note: Arc<RelayNote>,
    /// A round decided while another is finished: it goes next.
    queued: Option<Batch>,
    /// Rounds finished while the owner waited for the relay itself.
    ready: VecDeque<Result<Finished, Halt>>,
    rounds: u64,
}

/// The relay side of an owner: idle, or finishing a round in its own task.
enum Slot<A: Aggregate, S, J, O, F: RelayFactory> {
    Idle(Relayer<A, S, J, O, F>),
    Busy(JoinHandle<Relayed<A, S, J, O, F>>),
    /// Its task failed: the owner can finish nothing more.
    Gone,
}

/// What the relay's task hands back: itself, the round, how it ended.
type Relayed<A, S, J, O, F> = (Relayer<A, S, J, O, F>, Batch, Result<(), Halt>);

/// A journaled round on its way through the relay.
struct Batch {
    round: u64,
    entries: Vec<Entry>,
    /// Each entry's answer once the round is finished.
    outcomes: Vec<Outcome>,
    traces: HashMap<String, String>,
    /// The commands' spans, open until the round is finished.
    spans: Vec<tracing::Span>,
    started: Instant,
    commands: usize,
}

/// What follows the journal: stream rows, operation records and the Kafka
/// transaction of the partition's producer.
struct Relayer<A, S, J, O, F: RelayFactory> {
    partition: PartitionRef,
    backends: Arc<Backends<S, J, O, F>>,
    relay: F::Relay,
    /// The owner's epoch: with the attempt, it ranks operation writes.
    epoch: i64,
    /// Relay tries of this owner.
    relay_attempt: u32,
    /// First journal seq not yet relayed.
    relayed: i64,
    /// The relay position this owner last committed to Kafka (or found
    /// there when it took over). Rounds of rejections alone commit nothing.
    committed: Option<i64>,
    note: Arc<RelayNote>,
    stop: CancellationToken,
    _context: PhantomData<fn() -> A>,
}

/// The relay position as the journal notes it (a fallback for Kafka's). A
/// journal write carries the position of the last finished round, so in a
/// busy spell the note costs no write of its own; once the partition has
/// been idle for a moment its owner notes the last round's position
/// ([`Owner::note`]), so an idle partition's note is exact.
#[derive(Default)]
struct RelayNote {
    /// First journal seq not yet relayed, as of the last finished round.
    position: AtomicI64,
    /// The highest position the journal holds, noted on its own or carried
    /// by a journal write.
    noted: AtomicI64,
}

impl<A: Aggregate, S, J, O, F: RelayFactory> Drop for Owner<A, S, J, O, F> {
    fn drop(&mut self) {
        // An owner dropped mid-round (its channel failed) leaves the rest to
        // the next owner, as a crash would: the transaction its round joined
        // aborts once the round's relay is dropped ([`crate::kafka`]).
        if let Slot::Busy(task) = &self.relayer {
            task.abort();
        }
    }
}

impl<A, S, J, O, F> Owner<A, S, J, O, F>
where
    A: Aggregate,
    S: EventStore,
    J: Journal,
    O: OperationStore,
    F: RelayFactory,
{
    /// Records `processing` for commands that wait for a retry.
    pub async fn record_retry(&self, cmd: &IncomingCommand) -> Result<(), String> {
        let status = Status::Processing { attempt: cmd.attempt };
        self.backends.operations.record(cmd.op_ref(), &status, Order::default()).await.map_err(|e| e.to_string())
    }

    /// Records the terminal state of a command the consumer dead-lettered.
    pub async fn record_dead_letter(&self, cmd: &IncomingCommand, reason: &str) -> Result<(), String> {
        let status = Status::DeadLettered(reason.to_owned());
        self.backends.operations.record(cmd.op_ref(), &status, Order::default()).await.map_err(|e| e.to_string())
    }
}

impl<A, S, J, O, F> Owner<A, S, J, O, F>
where
    A: Aggregate,
    S: EventStore + 'static,
    J: Journal + 'static,
    O: OperationStore + 'static,
    F: RelayFactory + 'static,
{
    /// Takes the partition over: a new epoch in the journal, a producer that
    /// fences the previous owner's, then whatever the previous owner
    /// journaled but did not finish. Tries until it succeeds, is fenced or
    /// `stop`.
    pub async fn take_over(
        partition: PartitionRef,
        owner: &str,
        backends: Arc<Backends<S, J, O, F>>,
        stop: CancellationToken,
    ) -> Result<Self, Halt> {
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = async {
                let claim = backends.journal.claim(&partition, owner).await.map_err(|e| e.to_string())?;
                // An earlier owner's producer could still commit a
                // transaction holding this partition's rounds: fenced
                // before the position is read.
                backends.relays.fence(&partition, &claim.fence).await.map_err(|e| e.to_string())?;
                let epoch = claim.epoch;
                let (relay, opened) = backends.relays.open(&partition, owner).await.map_err(|e| e.to_string())?;
                // Kafka just restarted, or a transaction of another relay
                // still open: tried again a few times before the take-over
                // goes on without it.
                let on_topic = match relay.relayed_on_topic().await {
                    Err(e) if tries < TOPIC_READS => return Err(format!("events topic: {e}")),
                    read => read.map_err(|e| e.to_string()),
                };
                Ok::<_, String>((epoch, relay, opened, on_topic))
            };
            match attempt.await {
                Ok((epoch, relay, opened, on_topic)) => {
                    let note = Arc::new(RelayNote::default());
                    let relayer = Relayer {
                        partition: partition.clone(),
                        backends: backends.clone(),
                        relay,
                        epoch,
                        relay_attempt: 0,
                        relayed: opened.committed.unwrap_or(0),
                        committed: opened.committed,
                        note: note.clone(),
                        stop: stop.clone(),
                        _context: PhantomData,
                    };
                    let mut me = Owner {
                        partition,
                        backends,
                        epoch,
                        next_seq: 0,
                        streams: HashMap::new(),
                        max_streams: MAX_CACHED_STREAMS,
                        unsure: true,
                        name: owner.to_owned(),
                        stop,
                        relayer: Slot::Idle(relayer),
                        note,
                        queued: None,
                        ready: VecDeque::new(),
                        rounds: 0,
                    };
                    // A claim and an open of another processor may have
                    // come in between: only the latest claimant begins.
                    me.catch_up(Some(Start { kafka: opened, on_topic })).await?;
                    info!(queue = %me.partition.queue(), epoch, next_seq = me.next_seq, "took the partition over");
                    return Ok(me);
                }
                Err(reason) => {
                    warn!(queue = %partition.queue(), %reason, "could not take the partition over yet");
                    pause(&backends.retry_delays_ms, tries, &stop).await?;
                }
            }
        }
    }

    /// Finishes every journaled entry past the relay position, learns where
    /// the journal ends and records that this epoch's entries begin there;
    /// forgets cached streams (another owner may have changed them). The
    /// relay is idle.
    async fn catch_up(&mut self, start: Option<Start>) -> Result<(), Halt> {
        let Slot::Idle(relayer) = &mut self.relayer else {
            return Err(Halt::Failed("caught up while the relay was busy".into()));
        };
        relayer.epoch = self.epoch;
        let mut tries = 0;
        let pending = loop {
            tries += 1;
            let read = async {
                let note = self.backends.journal.relay_note(&self.partition).await?;
                if let (1, Some(start)) = (tries, &start) {
                    relayer.relayed = start.position(note, &self.partition);
                }
                let pending = self.backends.journal.entries_from(&self.partition, relayer.relayed).await?;
                let next_seq = pending.last().map_or(relayer.relayed, |last| (last.seq + 1).max(relayer.relayed));
                // Readers from the note on must still judge rows the way
                // this owner did.
                let read_from = note.unwrap_or(0).min(relayer.relayed);
                let begun = self.backends.journal.begin(&self.partition, self.epoch, next_seq, read_from).await?;
                Ok::<_, crate::journal::JournalError>((pending, next_seq, begun))
            };
            match read.await {
                Ok((_, _, Appended::Fenced)) => {
                    return Err(Halt::Fenced(format!("epoch {} superseded while taking over", self.epoch)))
                }
                Ok((pending, next_seq, Appended::Applied)) => {
                    self.next_seq = next_seq;
                    break pending;
                }
                Err(e) => {
                    warn!(queue = %self.partition.queue(), error = %e, "cannot read the journal yet");
                    pause(&self.backends.retry_delays_ms, tries, &self.stop).await?;
                }
            }
        };
        self.streams.clear();
        if !pending.is_empty() {
            info!(queue = %self.partition.queue(), entries = pending.len(), "finishing what the journal holds past the relay position");
            relayer.finish(&pending, &HashMap::new()).await?;
        }
        self.unsure = false;
        Ok(())
    }

    /// After a journal write with no answer, the entries it sent may land
    /// at any later time: a new epoch makes them stand only if they are
    /// there when it begins, and this owner goes on from what it reads.
    /// Rounds in the relay are finished first.
    async fn claim_again(&mut self) -> Result<(), Halt> {
        self.drain().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let claimed = async {
                let claim =
                    self.backends.journal.claim(&self.partition, &self.name).await.map_err(|e| e.to_string())?;
                self.backends.relays.fence(&self.partition, &claim.fence).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(claim.epoch)
            };
            match claimed.await {
                Ok(epoch) => {
                    self.epoch = epoch;
                    return self.catch_up(None).await;
                }
                Err(e) => {
                    warn!(queue = %self.partition.queue(), error = %e, "cannot claim the partition again yet");
                    pause(&self.backends.retry_delays_ms, tries, &self.stop).await?;
                }
            }
        }
    }

    /// Decides one round of commands (steps 1 to 4) and hands what it
    /// journaled to the relay. The answers of journaled commands come with
    /// [`Owner::finished`] of the round.
    pub async fn decide(&mut self, commands: &[IncomingCommand]) -> Result<Decided, Halt> {
        if self.unsure {
            self.claim_again().await?;
        }
        self.rounds += 1;
        let round = self.rounds;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; commands.len()];
        // 1. Check and parse.
        let mut parsed = Vec::with_capacity(commands.len());
        for (i, cmd) in commands.iter().enumerate() {
            match self.parse(cmd) {
                Ok((stream_id, command)) => parsed.push((i, stream_id, Some(command))),
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        // 2. Load unknown streams, read operation records.
        let needed: HashSet<&String> = parsed.iter().map(|(_, s, _)| s).collect();
        let new = needed.iter().filter(|s| !self.streams.contains_key(**s)).count();
        if self.streams.len() + new > self.max_streams {
            // The cache starts over, and its streams are loaded from the
            // store again: the rounds in the relay write their events there
            // first (a stream loaded before would miss them).
            self.drain().await?;
            self.streams.clear();
        }
        let unknown: Vec<String> = needed.into_iter().filter(|s| !self.streams.contains_key(*s)).cloned().collect();
        let started = Instant::now();
        let loads = self.load_all(&unknown);
        let operation_ids: Vec<&str> = parsed.iter().map(|(i, _, _)| commands[*i].operation_id.as_str()).collect();
        let statuses = self.backends.operations.statuses(&self.partition.tenant, &operation_ids);
        let (loads, statuses) = futures::join!(loads, statuses);
        let mut failed: HashMap<String, String> = HashMap::new();
        let loads: Vec<Result<Stream<A::State>, String>> = match loads {
            Ok(loads) => loads,
            Err(e) => unknown.iter().map(|_| Err(e.clone())).collect(),
        };
        for (stream_id, loaded) in unknown.into_iter().zip(loads) {
            match loaded {
                Ok(stream) => {
                    self.streams.insert(stream_id, stream);
                }
                Err(e) => {
                    failed.insert(stream_id, e);
                }
            }
        }
        // 3. Decide in order.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut entries = Vec::new();
        let mut entry_of = Vec::new();
        for (i, stream_id, command) in parsed {
            let cmd = &commands[i];
            let settled = match &statuses {
                Ok(statuses) => statuses.get(&cmd.operation_id).is_some_and(|s| Status::is_settled(s)),
                Err(e) => {
                    // Later commands of the stream must wait for this one.
                    failed.entry(stream_id.clone()).or_insert_with(|| e.to_string());
                    false
                }
            };
            if let Some(reason) = failed.get(&stream_id) {
                outcomes[i] = Some(Outcome::Retry(reason.clone()));
                continue;
            }
            let key = cmd.event.command_key();
            let stream = self.streams.get_mut(&stream_id).expect("loaded above");
            if settled || stream.decided.contains(&key) {
                outcomes[i] = Some(Outcome::AlreadyDone);
                continue;
            }
            let stamp = Stamp { next_version: stream.version + 1, now_ms, id_seed: event_id_seed(&cmd.tenant, &key) };
            let command = command.expect("parsed once");
            let verdict = match A::decide(&stream.state, command, &stamp) {
                Ok(events) => {
                    let stored = events
                        .iter()
                        .map(|e| StoredEvent {
                            version: e.version(),
                            event_id: e.event_id().to_owned(),
                            event_type: e.event_type().to_owned(),
                            payload: e.to_json(),
                            command_key: key.clone(),
                            operation_id: cmd.operation_id.clone(),
                            recorded_at_ms: now_ms,
                        })
                        .collect();
                    let state = std::mem::take(&mut stream.state);
                    stream.state = events.iter().fold(state, A::evolve);
                    stream.version += events.len() as i64;
                    Verdict::Appended(stored)
                }
                Err(rejection) => Verdict::Rejected(rejection.0),
            };
            stream.decided.insert(key.clone());
            entries.push(Entry {
                seq: self.next_seq,
                stream_id,
                command_key: key,
                operation_id: cmd.operation_id.clone(),
                command_type: cmd.event.ty.clone(),
                source: cmd.event.source.clone(),
                command_id: cmd.event.id.clone(),
                verdict,
            });
            self.next_seq += 1;
            entry_of.push(i);
        }
        stage("read_and_decide", started);
        // 4. Journal.
        let journaling = Instant::now();
        let journaled = self.journal(&entries).await?;
        stage("journal", journaling);
        if let Err(reason) = journaled {
            // Unknown outcome: the cached streams and seqs may be wrong.
            for entry in &entries {
                self.streams.remove(&entry.stream_id);
            }
            self.unsure = true;
            for i in entry_of {
                outcomes[i] = Some(Outcome::Retry(reason.clone()));
            }
            return Ok(Decided { round, outcomes });
        }
        if entries.is_empty() {
            return Ok(Decided { round, outcomes });
        }
        // 5. Stream rows, operation records, Kafka. Each command's span
        // continues the trace it came with, and its events carry the span's
        // context on to their consumers.
        let spans: Vec<tracing::Span> = entry_of
            .iter()
            .map(|&i| {
                let cmd = &commands[i];
                let span = tracing::info_span!("command", tenant = %cmd.tenant, operation = %cmd.operation_id);
                sluice_telemetry::set_parent(&span, cmd.traceparent.as_deref());
                span
            })
            .collect();
        let traces: HashMap<String, String> = entry_of
            .iter()
            .zip(&spans)
            .filter_map(|(&i, span)| {
                let cmd = &commands[i];
                Some((cmd.operation_id.clone(), sluice_telemetry::onward(span, cmd.traceparent.as_deref())?))
            })
            .collect();
        let answers = entries
            .iter()
            .map(|entry| match &entry.verdict {
                Verdict::Appended(_) => Outcome::Succeeded,
                Verdict::Rejected(reason) => Outcome::Rejected(reason.clone()),
            })
            .collect();
        let batch = Batch { round, entries, outcomes: answers, traces, spans, started, commands: commands.len() };
        self.submit(batch).await?;
        Ok(Decided { round, outcomes })
    }

    /// Lets the partition go once every round is finished: the journal says
    /// nothing of this owner is in flight, so the next owner need not fence
    /// this processor's producer (which its other partitions share). Best
    /// effort: without it, the next owner fences.
    pub async fn release(&self) {
        if self.busy() || self.queued.is_some() || self.unsure || !matches!(self.relayer, Slot::Idle(_)) {
            return;
        }
        match self.backends.journal.release(&self.partition, self.epoch).await {
            Ok(Appended::Applied) => debug!(queue = %self.partition.queue(), "released in the journal"),
            Ok(Appended::Fenced) => debug!(queue = %self.partition.queue(), "a newer owner claimed it first"),
            Err(e) => {
                warn!(queue = %self.partition.queue(), error = %e, "could not release in the journal; the next owner fences this processor's producer")
            }
        }
    }

    /// Whether the journal's note lags the relay position: a write of its
    /// own is owed once the partition stays idle ([`Owner::note`]).
    pub fn owes_note(&self) -> bool {
        self.note.position.load(Ordering::SeqCst) > self.note.noted.load(Ordering::SeqCst)
    }

    /// Notes the relay position of the last finished round in the journal
    /// if the journal lags it. A busy partition's journal writes carry the
    /// position, so its owner calls this once the partition has been idle
    /// for a moment, and before it lets the partition go. Best effort: the
    /// note is a fallback for Kafka's position.
    pub async fn note(&self) {
        let position = self.note.position.load(Ordering::SeqCst);
        if position <= self.note.noted.load(Ordering::SeqCst) {
            return;
        }
        match self.backends.journal.relayed(&self.partition, position, None).await {
            Ok(()) => {
                self.note.noted.fetch_max(position, Ordering::SeqCst);
            }
            Err(e) => {
                warn!(queue = %self.partition.queue(), error = %e, "could not note the relay position in the journal")
            }
        }
    }

    /// Whether a round can be decided without waiting for the relay.
    pub fn can_decide(&self) -> bool {
        self.queued.is_none()
    }

    /// Whether [`Owner::finished`] has a round to answer.
    pub fn busy(&self) -> bool {
        matches!(self.relayer, Slot::Busy(_)) || !self.ready.is_empty()
    }

    /// The next finished round, in the order they were decided; never
    /// resolves while none is in the relay. Cancel-safe.
    pub async fn finished(&mut self) -> Result<Finished, Halt> {
        match self.ready.pop_front() {
            Some(done) => done,
            None => self.join().await,
        }
    }

    /// Starts the relay on `batch`, or queues it behind the round in flight
    /// (waiting for that one first if a round is queued already).
    async fn submit(&mut self, batch: Batch) -> Result<(), Halt> {
        while self.queued.is_some() {
            let done = self.join().await;
            let halt = done.as_ref().err().cloned();
            self.ready.push_back(done);
            if let Some(halt) = halt {
                return Err(halt);
            }
        }
        match self.relayer {
            Slot::Idle(_) => self.start(batch),
            Slot::Busy(_) => self.queued = Some(batch),
            Slot::Gone => return Err(Halt::Failed("the relay is gone".into())),
        }
        Ok(())
    }

    fn start(&mut self, batch: Batch) {
        let Slot::Idle(mut relayer) = std::mem::replace(&mut self.relayer, Slot::Gone) else {
            unreachable!("started only when idle")
        };
        self.relayer = Slot::Busy(tokio::spawn(async move {
            let result = relayer.finish(&batch.entries, &batch.traces).await;
            (relayer, batch, result)
        }));
    }

    /// Waits for the round in flight, then starts the queued one.
    async fn join(&mut self) -> Result<Finished, Halt> {
        let Slot::Busy(task) = &mut self.relayer else { return std::future::pending().await };
        let joined = task.await;
        let (relayer, batch, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                self.relayer = Slot::Gone;
                return Err(Halt::Failed(format!("the relay task ended: {e}")));
            }
        };
        self.relayer = Slot::Idle(relayer);
        result?;
        metrics::histogram!("sluice_round_seconds").record(batch.started.elapsed().as_secs_f64());
        metrics::histogram!("sluice_round_commands").record(batch.commands as f64);
        drop(batch.spans);
        if let Some(next) = self.queued.take() {
            self.start(next);
        }
        Ok(Finished { round: batch.round, outcomes: batch.outcomes })
    }

    /// Finishes every round in the relay; their answers wait in `ready`.
    async fn drain(&mut self) -> Result<(), Halt> {
        while matches!(self.relayer, Slot::Busy(_)) {
            let done = self.join().await;
            let halt = done.as_ref().err().cloned();
            self.ready.push_back(done);
            if let Some(halt) = halt {
                return Err(halt);
            }
        }
        Ok(())
    }

    fn parse(&self, cmd: &IncomingCommand) -> Result<(String, A::Command), Outcome> {
        let malformed = |reason: String| Outcome::DeadLetter { class: "malformed_command", reason };
        let data = cmd.event.data.clone().unwrap_or_default();
        if let Err(errors) = self.backends.schemas.validate(&cmd.event.ty, &data) {
            let list: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", if e.pointer.is_empty() { "/" } else { &e.pointer }, e.problem))
                .collect();
            return Err(malformed(format!("data fails its schema: {}", list.join("; "))));
        }
        let command = A::parse(&cmd.event.ty, data).map_err(|e| malformed(e.to_string()))?;
        Ok((A::stream_id(&command).to_owned(), command))
    }

    /// Loads streams in one go; a stream whose history cannot be read back
    /// fails alone. `Err`: the store failed.
    async fn load_all(&self, stream_ids: &[String]) -> Result<Vec<Result<Stream<A::State>, String>>, String> {
        let streams: Vec<StreamRef<'_>> = stream_ids
            .iter()
            .map(|stream_id| StreamRef { tenant: &self.partition.tenant, context: A::CONTEXT, stream_id })
            .collect();
        let histories = self.backends.store.load_all(&streams).await.map_err(|e| e.to_string())?;
        Ok(stream_ids.iter().zip(histories).map(|(stream_id, history)| Self::replay(stream_id, &history)).collect())
    }

    /// A stream's state from its history.
    fn replay(stream_id: &str, history: &[StoredEvent]) -> Result<Stream<A::State>, String> {
        let mut state = A::State::default();
        let mut decided = HashSet::new();
        for stored in history {
            let event = A::Event::from_json(&stored.event_type, stored.payload.clone())
                .map_err(|e| format!("stream {stream_id} holds an unreadable event: {e}"))?;
            state = A::evolve(state, &event);
            decided.insert(stored.command_key.clone());
        }
        Ok(Stream { version: history.last().map_or(0, |e| e.version), state, decided })
    }

    /// Journals `entries` in writes of a bounded size; `Ok(Err)` when the
    /// journal failed (the outcome of the write is unknown).
    async fn journal(&self, entries: &[Entry]) -> Result<Result<(), String>, Halt> {
        let mut start = 0;
        while start < entries.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < entries.len()
                && end - start < MAX_ENTRIES_PER_WRITE
                && (end == start || bytes < MAX_BYTES_PER_WRITE)
            {
                bytes += entry_size(&entries[end]);
                end += 1;
            }
            let relayed = self.note.position.load(Ordering::SeqCst);
            match self.backends.journal.append(&self.partition, self.epoch, &entries[start..end], relayed).await {
                Ok(Appended::Applied) => {
                    self.note.noted.fetch_max(relayed, Ordering::SeqCst);
                }
                Ok(Appended::Fenced) => {
                    return Err(Halt::Fenced(format!("epoch {} is no longer the partition's", self.epoch)))
                }
                Err(e) => return Ok(Err(e.to_string())),
            }
            start = end;
        }
        Ok(Ok(()))
    }
}

impl<A, S, J, O, F> Relayer<A, S, J, O, F>
where
    A: Aggregate,
    S: EventStore,
    J: Journal,
    O: OperationStore,
    F: RelayFactory,
{
    /// Everything that follows journaled entries, tried until it succeeds:
    /// stream rows, rejections, then the events in one transaction with the
    /// successes recorded before its commit.
    async fn finish(&mut self, entries: &[Entry], traces: &HashMap<String, String>) -> Result<(), Halt> {
        let Some(last) = entries.last() else { return Ok(()) };
        let next = last.seq + 1;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_finish(entries, next, traces, tries > 1).await {
                Ok(()) => break,
                Err(RelayError::Fenced(reason)) => {
                    // The producers serve every partition of the context
                    // this processor owns, and a takeover of any of them
                    // fences them: this one goes on once the journal says
                    // it is still this owner's.
                    self.still_ours(&reason).await?;
                    info!(queue = %self.partition.queue(), %reason, "the processor's producer was fenced by a takeover of another partition; trying again");
                    metrics::counter!("sluice_relay_fenced_still_owner_total", "tenant" => self.partition.tenant.clone())
                        .increment(1);
                }
                Err(RelayError::Transient(reason)) => {
                    warn!(queue = %self.partition.queue(), %reason, tries, "decided commands not finished yet; trying again");
                    metrics::counter!("sluice_relay_retries_total", "tenant" => self.partition.tenant.clone())
                        .increment(1);
                    // The operations say the command is being worked on.
                    let busy = Status::Processing { attempt: tries + 1 };
                    let (tenant, operations) = (&self.partition.tenant, &self.backends.operations);
                    join_all(entries.iter().map(|e| operations.record(entry_op(tenant, e), &busy, Order::default())))
                        .await;
                    pause(&self.backends.retry_delays_ms, tries, &self.stop).await?;
                }
            }
        }
        let before = self.relayed;
        self.relayed = self.relayed.max(next);
        self.note.position.store(self.relayed, Ordering::SeqCst);
        let Some(trim) = (self.relayed / TRIM_EVERY > before / TRIM_EVERY).then(|| self.relayed - TRIM_EVERY) else {
            // The next round's journal write notes it, or the owner once
            // the partition stays idle ([`Owner::note`]).
            return Ok(());
        };
        match self.backends.journal.relayed(&self.partition, self.relayed, Some(trim)).await {
            Ok(()) => {
                self.note.noted.fetch_max(self.relayed, Ordering::SeqCst);
            }
            // Only a fallback and housekeeping: the position is in Kafka.
            Err(e) => warn!(error = %e, "could not note the relay position in the journal"),
        }
        Ok(())
    }

    /// Whether the partition's epoch is still this owner's (asked until the
    /// journal answers): `Err` when it is not.
    async fn still_ours(&self, reason: &str) -> Result<(), Halt> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.backends.journal.epoch(&self.partition).await {
                Ok(Some(epoch)) if epoch == self.epoch => return Ok(()),
                Ok(_) => return Err(Halt::Fenced(reason.to_owned())),
                Err(e) => {
                    warn!(queue = %self.partition.queue(), error = %e, "cannot read the partition's epoch yet");
                    pause(&self.backends.retry_delays_ms, tries, &self.stop).await?;
                }
            }
        }
    }

    /// `again`: an earlier try of these entries failed.
    async fn try_finish(
        &mut self,
        entries: &[Entry],
        next: i64,
        traces: &HashMap<String, String>,
        again: bool,
    ) -> Result<(), RelayError> {
        let transient = |e: String| RelayError::Transient(e);
        let checked = if again { self.in_kafka(entries, next).await? } else { InKafka::AsExpected };
        let lost = match checked {
            // An earlier try's commit went through although its answer was
            // lost: rows and records were written before it.
            InKafka::Committed => return Ok(()),
            InKafka::Lost(lost) => lost,
            InKafka::AsExpected => Vec::new(),
        };
        let entries: &[Entry] = if lost.is_empty() {
            entries
        } else {
            &lost.into_iter().chain(entries.iter().cloned()).collect::<Vec<_>>()
        };
        let tenant = self.partition.tenant.clone();
        let topic = names::events_topic(&tenant, A::CONTEXT);
        let source = format!("/sluice/{tenant}/{}", A::CONTEXT);
        let mut outgoing = Vec::new();
        let mut owners = Vec::new();
        for entry in entries {
            let Verdict::Appended(events) = &entry.verdict else { continue };
            for stored in events {
                let event = A::Event::from_json(&stored.event_type, stored.payload.clone())
                    .map_err(|e| transient(format!("journaled event unreadable: {e}")))?;
                outgoing.push(OutgoingEvent {
                    topic: topic.clone(),
                    key: entry.stream_id.clone(),
                    event_id: stored.event_id.clone(),
                    event_type: stored.event_type.clone(),
                    source: source.clone(),
                    time_ms: stored.recorded_at_ms,
                    avro: event.to_avro(),
                    traceparent: traces.get(&entry.operation_id).cloned(),
                    seq: entry.seq,
                });
                owners.push(entry);
            }
        }
        self.relay_attempt += 1;
        let order = Order { epoch: self.epoch, attempt: self.relay_attempt };
        // Stream rows (one write per stream), rejections and the events go
        // out at once; nothing is visible before the commit, which waits
        // for all three.
        let mut by_stream: HashMap<&str, Vec<StoredEvent>> = HashMap::new();
        for entry in entries {
            if let Verdict::Appended(events) = &entry.verdict {
                by_stream.entry(entry.stream_id.as_str()).or_default().extend(events.iter().cloned());
            }
        }
        let rows = async {
            let streams: Vec<(StreamRef<'_>, &[StoredEvent])> = by_stream
                .iter()
                .map(|(stream_id, events)| {
                    (StreamRef { tenant: &tenant, context: A::CONTEXT, stream_id }, events.as_slice())
                })
                .collect();
            if streams.is_empty() {
                return Ok(());
            }
            let writing = Instant::now();
            let written = self.backends.store.write_all(&streams).await;
            stage("stream_rows", writing);
            written.map_err(|e| e.to_string())
        };
        let rejections = async {
            let rejections: Vec<(OperationRef<'_>, Status)> = entries
                .iter()
                .filter_map(|e| match &e.verdict {
                    Verdict::Rejected(reason) => Some((entry_op(&tenant, e), Status::Rejected(reason.clone()))),
                    Verdict::Appended(_) => None,
                })
                .collect();
            if rejections.is_empty() {
                return Ok(());
            }
            self.backends.operations.record_all(&rejections, order).await.map_err(|e| e.to_string())
        };
        let produce = async {
            if outgoing.is_empty() {
                return Ok(Vec::new());
            }
            let producing = Instant::now();
            let produced = self.relay.produce(outgoing).await;
            stage("produce", producing);
            produced
        };
        let (rows, rejected, produced) = futures::join!(rows, rejections, produce);
        let positions = match (rows.and(rejected), produced) {
            (Ok(()), Ok(positions)) => positions,
            (Err(e), Ok(positions)) => {
                if !positions.is_empty() {
                    self.relay.abort().await?;
                }
                return Err(transient(e));
            }
            (_, Err(e)) => return Err(e),
        };
        if owners.is_empty() {
            return Ok(());
        }
        // The successes are recorded before the commit: a commit that fails
        // is redone, and the redone record (a later order) wins.
        let mut per_entry: Vec<(&Entry, Vec<EventPosition>)> = Vec::new();
        for (entry, position) in owners.iter().zip(positions) {
            match per_entry.last_mut() {
                Some((e, list)) if e.seq == entry.seq => list.push(position),
                _ => per_entry.push((entry, vec![position])),
            }
        }
        let statuses: Vec<(OperationRef<'_>, Status)> = per_entry
            .into_iter()
            .map(|(entry, positions)| (entry_op(&tenant, entry), Status::Succeeded(positions)))
            .collect();
        let recording = Instant::now();
        let recorded = self.backends.operations.record_all(&statuses, order).await;
        stage("record", recording);
        if let Err(e) = recorded {
            self.relay.abort().await?;
            return Err(transient(e.to_string()));
        }
        let committing = Instant::now();
        let committed = self.relay.commit(next).await;
        stage("commit", committing);
        if committed.is_ok() {
            self.committed = Some(next);
        }
        committed
    }

    /// Where Kafka says the relay stands, before another try of `entries`
    /// (up to `next`). Kafka may have lost entries before them after it had
    /// acknowledged their transaction's commit (seen after a Kafka restart:
    /// the coordinator forgot the commit, the next round's transaction
    /// joined the old one, and its abort took both, relay position and all;
    /// the next commit would have covered them without carrying them): they
    /// are relayed again with these. Or the earlier try's commit went
    /// through although its answer was lost: the try ends. Both show only
    /// after a failed try (a forgotten commit that is not aborted is
    /// committed with the next round), so only a try that follows one
    /// asks. The events topic has the last word: the commit to the relay's
    /// group can be lost or left pending while the same transaction's
    /// events stand. Without the group's answer (Kafka down, or a commit
    /// pending for long: an orphan one is seen after a broker restart) only
    /// a round whose events the topic shows is taken as done; otherwise the
    /// try goes ahead unchecked.
    async fn in_kafka(&mut self, entries: &[Entry], next: i64) -> Result<InKafka, RelayError> {
        let Some(first) = entries.first().map(|e| e.seq) else { return Ok(InKafka::AsExpected) };
        let group = match self.relay.position().await {
            Ok(position) => Ok(position),
            Err(RelayError::Fenced(reason)) => return Err(RelayError::Fenced(reason)),
            Err(RelayError::Transient(reason)) => Err(reason),
        };
        if matches!(group, Ok(Some(position)) if position >= next) {
            return Ok(InKafka::Committed);
        }
        let on_topic = match self.relay.relayed_on_topic().await {
            Ok(on_topic) => on_topic,
            Err(RelayError::Fenced(reason)) => return Err(RelayError::Fenced(reason)),
            Err(RelayError::Transient(reason)) => {
                debug!(queue = %self.partition.queue(), %reason, "the events topic could not tell how far the relay went");
                None
            }
        };
        if on_topic.is_some_and(|on_topic| on_topic > first) {
            // The earlier try's transaction committed: its events are there.
            return Ok(InKafka::Committed);
        }
        let position = match group {
            Ok(Some(position)) => position.max(on_topic.unwrap_or(0)),
            Ok(None) => return Ok(InKafka::AsExpected),
            Err(reason) => {
                debug!(queue = %self.partition.queue(), %reason, "relay position not read; going ahead unchecked");
                return Ok(InKafka::AsExpected);
            }
        };
        if self.committed.is_none_or(|committed| position >= committed) {
            return Ok(InKafka::AsExpected);
        }
        let lost: Vec<Entry> = self
            .backends
            .journal
            .entries_from(&self.partition, position)
            .await
            .map_err(|e| RelayError::Transient(e.to_string()))?
            .into_iter()
            .filter(|e| e.seq < first)
            .collect();
        warn!(
            queue = %self.partition.queue(), kafka_position = position, committed = ?self.committed, entries = lost.len(),
            "Kafka lost rounds it had committed; relaying them again"
        );
        metrics::counter!("sluice_relay_rounds_lost_in_kafka_total", "tenant" => self.partition.tenant.clone())
            .increment(1);
        self.relayed = position;
        self.committed = Some(position);
        Ok(InKafka::Lost(lost))
    }
}

/// What Kafka's relay position says about a round about to be tried.
enum InKafka {
    /// Where the relay left it.
    AsExpected,
    /// Behind: these entries before the round were lost.
    Lost(Vec<Entry>),
    /// Past the round: it is committed.
    Committed,
}

fn entry_op<'a>(tenant: &'a str, entry: &'a Entry) -> OperationRef<'a> {
    OperationRef {
        tenant,
        operation_id: &entry.operation_id,
        command_type: &entry.command_type,
        source: &entry.source,
        command_id: &entry.command_id,
    }
}

/// How many take-over attempts read the events topic before one goes on
/// without it ([`Start::position`]).
const TOPIC_READS: u32 = 3;

/// What a take-over learns of where the relay stands.
#[derive(Debug)]
struct Start {
    /// The position committed to the relay's group.
    kafka: RelayPosition,
    /// [`Relay::relayed_on_topic`] (`Err`: it could not tell).
    on_topic: Result<Option<i64>, String>,
}

impl Start {
    /// Where the relay goes on from. Kafka's committed position, or, when
    /// it has none (never relayed, or the group's offsets expired), the
    /// journal's note. Raised to what the events topic shows: after a
    /// Kafka restart the commit to the group can be left pending or lost
    /// while the same transaction's events stand, and relaying from the
    /// older position would produce them twice. When the topic cannot tell
    /// and the position was read past a pending commit, the note stands
    /// in: it holds only positions whose commit Kafka acknowledged.
    fn position(&self, note: Option<i64>, partition: &PartitionRef) -> i64 {
        let kafka = self.kafka.committed.unwrap_or(note.unwrap_or(0));
        let position = match &self.on_topic {
            Ok(on_topic) => kafka.max(on_topic.unwrap_or(0)),
            Err(_) if self.kafka.may_lag => kafka.max(note.unwrap_or(0)),
            Err(_) => kafka,
        };
        if position != kafka || self.on_topic.is_err() {
            warn!(
                queue = %partition.queue(), kafka = ?self.kafka, on_topic = ?self.on_topic, ?note, position,
                "the relay position the group holds is not the one the relay goes on from"
            );
        }
        position
    }
}

/// How long a stage of a round took (`sluice_round_stage_seconds`).
fn stage(name: &'static str, started: Instant) {
    metrics::histogram!("sluice_round_stage_seconds", "stage" => name).record(started.elapsed().as_secs_f64());
}

/// Rough size of an entry in a journal write.
fn entry_size(entry: &Entry) -> usize {
    let events = match &entry.verdict {
        Verdict::Appended(events) => events.iter().map(|e| e.payload.to_string().len() + 128).sum(),
        Verdict::Rejected(reason) => reason.len(),
    };
    256 + entry.command_key.len() + entry.stream_id.len() + events
}

/// Waits the backoff of try `tries` (1-based), or returns `Stopped`.
async fn pause(delays_ms: &[u64], tries: u32, stop: &CancellationToken) -> Result<(), Halt> {
    let delay = delays_ms.get((tries as usize).saturating_sub(1)).or(delays_ms.last()).copied().unwrap_or(1_000);
    tokio::select! {
        _ = stop.cancelled() => Err(Halt::Stopped),
        _ = tokio::time::sleep(Duration::from_millis(delay)) => Ok(()),
    }
}

/// Event ids are a UUID v5 of tenant and command key: the same command always
/// yields the same ids, so consumers can dedupe across redeliveries.
fn event_id_seed(tenant: &str, command_key: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{tenant}\u{1f}{command_key}").as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    //! The owner's rules with in-memory doubles of its boundaries.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::event_store::{Append, StoreError};
    use crate::journal::{Claim, JournalError};
    use crate::operations::OperationError;
    use crate::orders::Orders;

    #[derive(Default)]
    struct Store(Mutex<HashMap<String, BTreeMap<i64, StoredEvent>>>);

    impl EventStore for Store {
        async fn load(&self, s: StreamRef<'_>) -> Result<Vec<StoredEvent>, StoreError> {
            Ok(self.0.lock().unwrap().get(s.stream_id).map(|m| m.values().cloned().collect()).unwrap_or_default())
        }
        async fn append(&self, _: StreamRef<'_>, _: &[StoredEvent]) -> Result<Append, StoreError> {
            unreachable!("owners write, they do not append")
        }
        async fn write(&self, s: StreamRef<'_>, events: &[StoredEvent]) -> Result<(), StoreError> {
            let mut streams = self.0.lock().unwrap();
            let stream = streams.entry(s.stream_id.to_owned()).or_default();
            events.iter().for_each(|e| {
                stream.insert(e.version, e.clone());
            });
            Ok(())
        }
    }

    #[derive(Default)]
    struct JournalState {
        epoch: i64,
        /// The last claimant, and the earlier owners left to fence.
        owner: Option<String>,
        to_fence: BTreeSet<String>,
        /// Each seq's row: the epoch that wrote it, and the entry.
        rows: BTreeMap<i64, (i64, Entry)>,
        first_seqs: BTreeMap<i64, i64>,
        relayed: Option<i64>,
        /// Relay notes written on their own (not with an append).
        notes: usize,
        /// The next append is applied but answers an error (a timeout).
        lose_answer: bool,
    }

    impl JournalState {
        fn standing(&self) -> Vec<Entry> {
            self.rows
                .iter()
                .filter(|(&seq, (epoch, _))| crate::journal::valid(seq, Some(*epoch), &self.first_seqs))
                .map(|(_, (_, e))| e.clone())
                .collect()
        }
    }

    #[derive(Default)]
    struct MemJournal(Mutex<JournalState>);

    impl Journal for MemJournal {
        async fn claim(&self, _: &PartitionRef, owner: &str) -> Result<Claim, JournalError> {
            let mut j = self.0.lock().unwrap();
            j.epoch += 1;
            if let Some(previous) = j.owner.replace(owner.to_owned()).filter(|p| p != owner) {
                j.to_fence.insert(previous);
            }
            j.to_fence.remove(owner);
            Ok(Claim { epoch: j.epoch, fence: j.to_fence.iter().cloned().collect() })
        }
        async fn epoch(&self, _: &PartitionRef) -> Result<Option<i64>, JournalError> {
            Ok(Some(self.0.lock().unwrap().epoch))
        }
        async fn entries_from(&self, _: &PartitionRef, seq: i64) -> Result<Vec<Entry>, JournalError> {
            Ok(self.0.lock().unwrap().standing().into_iter().filter(|e| e.seq >= seq).collect())
        }
        async fn relay_note(&self, _: &PartitionRef) -> Result<Option<i64>, JournalError> {
            Ok(self.0.lock().unwrap().relayed)
        }
        async fn begin(&self, _: &PartitionRef, epoch: i64, first: i64, from: i64) -> Result<Appended, JournalError> {
            let mut j = self.0.lock().unwrap();
            if j.epoch != epoch {
                return Ok(Appended::Fenced);
            }
            j.first_seqs = crate::journal::first_seqs_to_keep(&j.first_seqs, from, epoch, first);
            j.to_fence.clear();
            Ok(Appended::Applied)
        }
        async fn append(
            &self,
            _: &PartitionRef,
            epoch: i64,
            entries: &[Entry],
            relayed: i64,
        ) -> Result<Appended, JournalError> {
            let mut j = self.0.lock().unwrap();
            if relayed > 0 {
                j.relayed = Some(j.relayed.unwrap_or(0).max(relayed));
            }
            // The epoch is the write timestamp: an older one never wins.
            for e in entries {
                if j.rows.get(&e.seq).is_none_or(|(by, _)| *by <= epoch) {
                    j.rows.insert(e.seq, (epoch, e.clone()));
                }
            }
            if std::mem::take(&mut j.lose_answer) {
                return Err(JournalError("timed out".into()));
            }
            Ok(if j.epoch == epoch { Appended::Applied } else { Appended::Fenced })
        }
        async fn release(&self, _: &PartitionRef, epoch: i64) -> Result<Appended, JournalError> {
            let mut j = self.0.lock().unwrap();
            if j.epoch != epoch {
                return Ok(Appended::Fenced);
            }
            j.owner = None;
            Ok(Appended::Applied)
        }
        async fn relayed(&self, _: &PartitionRef, next: i64, _: Option<i64>) -> Result<(), JournalError> {
            let mut j = self.0.lock().unwrap();
            j.notes += 1;
            j.relayed = Some(j.relayed.unwrap_or(0).max(next));
            Ok(())
        }
    }

    /// Kafka: committed events (id, journal seq) and the committed
    /// position; `fail` transactions fail before they commit.
    #[derive(Default)]
    struct Kafka {
        committed: Vec<(String, i64)>,
        staged: Vec<(String, i64)>,
        position: Option<i64>,
        fail: usize,
        /// The next commit goes through but its answer is lost.
        lose_commit_answer: bool,
        /// Each processor's producer epoch: an older relay is fenced.
        producers: HashMap<String, u32>,
        /// The next open reads the position past a pending commit.
        read_past_pending: bool,
        /// The events topic cannot be read.
        topic_unreadable: bool,
        /// The next commit's position is lost (its events stand).
        lose_group_commit: bool,
    }

    #[derive(Default, Clone)]
    struct Relays(Arc<Mutex<Kafka>>);

    struct MemRelay {
        kafka: Arc<Mutex<Kafka>>,
        /// The processor it produces for, and its producer's epoch.
        owner: String,
        producer: Mutex<u32>,
    }

    impl RelayFactory for Relays {
        type Relay = MemRelay;
        async fn sweep(&self, _: &PartitionRef) {}

        async fn fence(&self, _: &PartitionRef, owners: &[String]) -> Result<(), RelayError> {
            let mut k = self.0.lock().unwrap();
            for owner in owners {
                *k.producers.entry(owner.clone()).or_default() += 1;
                k.staged.clear();
            }
            Ok(())
        }

        async fn open(&self, _: &PartitionRef, owner: &str) -> Result<(MemRelay, RelayPosition), RelayError> {
            let k = self.0.lock().unwrap();
            let opened = RelayPosition { committed: k.position, may_lag: k.read_past_pending };
            let producer = k.producers.get(owner).copied().unwrap_or_default();
            Ok((MemRelay { kafka: self.0.clone(), owner: owner.to_owned(), producer: Mutex::new(producer) }, opened))
        }
    }

    impl MemRelay {
        /// A fenced producer fails once, and is set up again for the next
        /// call, as the processor's shared producer is.
        fn check(&self, k: &Kafka) -> Result<(), RelayError> {
            let current = k.producers.get(&self.owner).copied().unwrap_or_default();
            let mut producer = self.producer.lock().unwrap();
            if *producer == current {
                Ok(())
            } else {
                *producer = current;
                Err(RelayError::Fenced("a newer producer".into()))
            }
        }
    }

    impl Relay for MemRelay {
        async fn produce(&self, events: Vec<OutgoingEvent>) -> Result<Vec<EventPosition>, RelayError> {
            let mut k = self.kafka.lock().unwrap();
            self.check(&k)?;
            if k.fail > 0 {
                k.fail -= 1;
                return Err(RelayError::Transient("kafka down".into()));
            }
            let base = k.committed.len() as i64;
            k.staged = events.iter().map(|e| (e.event_id.clone(), e.seq)).collect();
            Ok(events
                .iter()
                .enumerate()
                .map(|(i, e)| EventPosition {
                    event_type: e.event_type.clone(),
                    topic: e.topic.clone(),
                    partition: 0,
                    offset: base + i as i64,
                })
                .collect())
        }
        async fn commit(&self, next: i64) -> Result<(), RelayError> {
            let mut k = self.kafka.lock().unwrap();
            self.check(&k)?;
            let staged = std::mem::take(&mut k.staged);
            k.committed.extend(staged);
            if !std::mem::take(&mut k.lose_group_commit) {
                k.position = Some(next);
            }
            if std::mem::take(&mut k.lose_commit_answer) {
                return Err(RelayError::Transient("the commit's answer was lost".into()));
            }
            Ok(())
        }
        async fn abort(&self) -> Result<(), RelayError> {
            self.kafka.lock().unwrap().staged.clear();
            Ok(())
        }
        async fn position(&self) -> Result<Option<i64>, RelayError> {
            let mut k = self.kafka.lock().unwrap();
            if k.fail > 0 {
                k.fail -= 1;
                return Err(RelayError::Transient("kafka down".into()));
            }
            Ok(k.position)
        }
        async fn relayed_on_topic(&self) -> Result<Option<i64>, RelayError> {
            let k = self.kafka.lock().unwrap();
            if k.topic_unreadable {
                return Err(RelayError::Transient("events topic unreadable".into()));
            }
            Ok(k.committed.iter().map(|(_, seq)| seq + 1).max())
        }
    }

    #[derive(Default)]
    struct Ops(Mutex<HashMap<String, Status>>);

    impl OperationStore for Ops {
        async fn status(&self, _: &str, operation_id: &str) -> Result<Option<String>, OperationError> {
            Ok(self.0.lock().unwrap().get(operation_id).map(|s| s.name().to_owned()))
        }
        async fn statuses(&self, _: &str, ids: &[&str]) -> Result<HashMap<String, String>, OperationError> {
            let ops = self.0.lock().unwrap();
            Ok(ids.iter().filter_map(|id| Some(((*id).to_owned(), ops.get(*id)?.name().to_owned()))).collect())
        }
        async fn record(&self, op: OperationRef<'_>, status: &Status, _: Order) -> Result<(), OperationError> {
            let mut ops = self.0.lock().unwrap();
            let settled = ops.get(op.operation_id).is_some_and(|s| Status::is_settled(s.name()));
            if !settled || Status::is_settled(status.name()) {
                ops.insert(op.operation_id.to_owned(), status.clone());
            }
            Ok(())
        }
    }

    type TestBackends = Backends<Store, MemJournal, Ops, Relays>;

    fn backends() -> Arc<TestBackends> {
        Arc::new(Backends {
            schemas: CommandSchemas::load(),
            store: Store::default(),
            journal: MemJournal::default(),
            operations: Ops::default(),
            relays: Relays::default(),
            retry_delays_ms: vec![1],
        })
    }

    fn partition() -> PartitionRef {
        PartitionRef { tenant: "acme".into(), context: "orders", partition: 0 }
    }

    type TestOwner = Owner<Orders, Store, MemJournal, Ops, Relays>;

    async fn owner(b: &Arc<TestBackends>) -> TestOwner {
        Owner::take_over(partition(), "p1", b.clone(), CancellationToken::new()).await.expect("taken over")
    }

    /// Decides a round and waits until it is finished: every outcome.
    async fn round(owner: &mut TestOwner, commands: &[IncomingCommand]) -> Result<Vec<Outcome>, Halt> {
        let decided = owner.decide(commands).await?;
        let mut outcomes = decided.outcomes;
        if outcomes.iter().any(Option::is_none) {
            let finished = loop {
                let finished = owner.finished().await?;
                if finished.round == decided.round {
                    break finished;
                }
            };
            let mut answers = finished.outcomes.into_iter();
            outcomes.iter_mut().filter(|o| o.is_none()).for_each(|o| *o = answers.next());
            assert!(answers.next().is_none(), "one answer per journaled command");
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every command answered")).collect())
    }

    fn command(id: &str, ty: &str, data: serde_json::Value) -> IncomingCommand {
        let event = CloudEvent::from_json(json!({
            "specversion": "1.0", "id": id, "source": "/acme/shop", "type": format!("com.example.orders.{ty}"), "data": data
        }))
        .unwrap();
        IncomingCommand {
            tenant: "acme".into(),
            operation_id: format!("op-{id}"),
            event,
            attempt: 1,
            traceparent: None,
        }
    }

    fn submit(id: &str, order: &str) -> IncomingCommand {
        let lines = json!([{"sku": "a", "quantity": 1, "unit_price_cents": 10}]);
        command(id, "SubmitOrder", json!({"order_id": order, "customer_id": "c1", "currency": "EUR", "lines": lines}))
    }

    fn cancel(id: &str, order: &str) -> IncomingCommand {
        command(id, "CancelOrder", json!({"order_id": order, "reason": "changed my mind"}))
    }

    fn committed(b: &TestBackends) -> Vec<String> {
        b.relays.0.lock().unwrap().committed.iter().map(|(id, _)| id.clone()).collect()
    }

    #[tokio::test]
    async fn one_round_decides_a_streams_commands_in_the_order_they_came() {
        let b = backends();
        let mut owner = owner(&b).await;
        let commands = [submit("s1", "o1"), cancel("c1", "o1"), submit("s2", "o2"), submit("s3", "o1")];
        let outcomes = round(&mut owner, &commands).await.unwrap();
        assert_eq!(
            outcomes,
            [
                Outcome::Succeeded,
                Outcome::Succeeded,
                Outcome::Succeeded,
                Outcome::Rejected("order was already submitted".into())
            ],
            "the cancel saw the submit of its own round"
        );
        assert_eq!(committed(&b).len(), 3, "three events in one transaction");
        assert_eq!(b.relays.0.lock().unwrap().position, Some(4), "the position covers the rejection too");
        assert_eq!(b.store.0.lock().unwrap()["o1"].len(), 2);
        assert!(matches!(b.operations.0.lock().unwrap()["op-c1"], Status::Succeeded(ref p) if p.len() == 1));
        assert!(matches!(b.operations.0.lock().unwrap()["op-s3"], Status::Rejected(_)));
    }

    #[tokio::test]
    async fn a_command_answered_before_is_answered_again_without_a_second_decision() {
        let b = backends();
        let mut owner = owner(&b).await;
        round(&mut owner, &[submit("s1", "o1")]).await.unwrap();
        // The same delivery in a later round (redelivered) and again with a
        // copy of itself in one round (a client's retry).
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::AlreadyDone]);
        assert_eq!(
            round(&mut owner, &[submit("s2", "o2"), submit("s2", "o2")]).await.unwrap(),
            [Outcome::Succeeded, Outcome::AlreadyDone]
        );
        // A new owner knows nothing in memory: the operation record answers.
        let mut next = super::tests::owner(&b).await;
        assert_eq!(round(&mut next, &[submit("s1", "o1")]).await.unwrap(), [Outcome::AlreadyDone]);
        assert_eq!(committed(&b).len(), 2, "each event once");
    }

    #[tokio::test]
    async fn a_dead_lettered_operation_keeps_its_answer_when_a_copy_of_its_command_comes_back() {
        let b = backends();
        b.operations.0.lock().unwrap().insert("op-d1".into(), Status::DeadLettered("gave up".into()));
        let mut owner = owner(&b).await;
        // A redelivered copy under the same operation: answered as settled.
        assert_eq!(round(&mut owner, &[submit("d1", "o1")]).await.unwrap(), [Outcome::AlreadyDone]);
        assert!(matches!(b.operations.0.lock().unwrap()["op-d1"], Status::DeadLettered(_)));
        assert!(committed(&b).is_empty(), "nothing decided, nothing produced");
        assert!(!b.store.0.lock().unwrap().contains_key("o1"));
    }

    #[tokio::test]
    async fn an_owner_fenced_by_a_newer_one_journals_and_produces_nothing_more() {
        let b = backends();
        let mut old = owner(&b).await;
        round(&mut old, &[submit("s1", "o1")]).await.unwrap();
        let mut new = owner(&b).await;
        assert!(matches!(round(&mut old, &[submit("s2", "o2")]).await, Err(Halt::Fenced(_))));
        assert_eq!(b.journal.0.lock().unwrap().standing().len(), 1, "the fenced round's entry does not stand");
        assert_eq!(round(&mut new, &[submit("s2", "o2")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 2);
    }

    #[tokio::test]
    async fn a_relay_fenced_by_a_takeover_of_another_partition_goes_on_while_its_partition_is_its_own() {
        let b = backends();
        let mut owner = owner(&b).await;
        round(&mut owner, &[submit("s1", "o1")]).await.unwrap();
        // Another partition of this processor was taken over: the producer
        // they share is fenced; this partition's epoch is unchanged.
        b.relays.fence(&partition(), &["p1".to_owned()]).await.unwrap();
        assert_eq!(round(&mut owner, &[submit("s2", "o2")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 2, "in Kafka once");
    }

    #[tokio::test]
    async fn a_relay_whose_partition_was_taken_over_stops_at_its_fenced_producer() {
        let b = backends();
        let mut old = owner(&b).await;
        round(&mut old, &[submit("s1", "o1")]).await.unwrap();
        // A round is journaled; Kafka fails until another processor has
        // claimed the partition and fenced this one's producer.
        b.relays.0.lock().unwrap().fail = usize::MAX;
        let decided = old.decide(&[submit("s2", "o2")]).await.unwrap();
        assert_eq!(decided.outcomes, [None], "journaled: answered once finished");
        let claim = b.journal.claim(&partition(), "p2").await.unwrap();
        assert_eq!(claim.fence, ["p1"]);
        b.relays.fence(&partition(), &claim.fence).await.unwrap();
        b.relays.0.lock().unwrap().fail = 0;
        assert!(matches!(old.finished().await, Err(Halt::Fenced(_))));
        assert_eq!(committed(&b).len(), 1, "nothing more from the fenced owner");
    }

    #[tokio::test]
    async fn an_owner_that_let_its_partition_go_cleanly_is_not_fenced_by_the_next() {
        let b = backends();
        let mut owner = owner(&b).await;
        round(&mut owner, &[submit("s1", "o1")]).await.unwrap();
        owner.release().await;
        let claim = b.journal.claim(&partition(), "p2").await.unwrap();
        assert!(claim.fence.is_empty(), "released: {:?}", claim.fence);
        // Without the release, the next claim names it.
        let third = b.journal.claim(&partition(), "p3").await.unwrap();
        assert_eq!(third.fence, ["p2"]);
    }

    #[tokio::test]
    async fn an_owner_with_a_round_in_flight_does_not_release() {
        let b = backends();
        let mut owner = owner(&b).await;
        round(&mut owner, &[submit("s1", "o1")]).await.unwrap();
        b.relays.0.lock().unwrap().fail = usize::MAX;
        owner.decide(&[submit("s2", "o2")]).await.unwrap();
        owner.release().await;
        assert_eq!(b.journal.claim(&partition(), "p2").await.unwrap().fence, ["p1"]);
    }

    #[tokio::test]
    async fn kafka_failing_after_the_journal_is_retried_until_the_events_are_in_it_once() {
        let b = backends();
        let mut owner = owner(&b).await;
        b.relays.0.lock().unwrap().fail = 3;
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 1);
        assert_eq!(b.relays.0.lock().unwrap().fail, 0, "it took the retries");
    }

    #[tokio::test]
    async fn a_round_kafka_lost_after_its_commit_is_relayed_again_with_the_next_one() {
        let b = backends();
        let mut owner = owner(&b).await;
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::Succeeded]);
        // Kafka restarts, forgets the commit, and the next round's first
        // try fails: its abort takes the committed transaction, position and all.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.committed.clear();
            k.position = Some(0);
            k.fail = 1;
        }
        assert_eq!(round(&mut owner, &[submit("s2", "o2")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 2, "the lost round's event is in Kafka again, with the next round's");
        assert_eq!(b.relays.0.lock().unwrap().position, Some(2));
        assert_eq!(round(&mut owner, &[submit("s3", "o3")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 3, "nothing relayed twice once Kafka keeps what it committed");
    }

    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_not_produced_again() {
        let b = backends();
        let mut owner = owner(&b).await;
        b.relays.0.lock().unwrap().lose_commit_answer = true;
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 1, "in Kafka once");
        assert_eq!(round(&mut owner, &[submit("s2", "o2")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 2);
    }

    #[tokio::test]
    async fn a_new_owner_finishes_what_the_journal_holds_past_the_relay_position_first() {
        let b = backends();
        let stop = CancellationToken::new();
        let mut old = Owner::take_over(partition(), "p1", b.clone(), stop.clone()).await.unwrap();
        round(&mut old, &[submit("s1", "o1")]).await.unwrap();
        // The old owner journals a round and dies before anything else.
        b.relays.0.lock().unwrap().fail = usize::MAX;
        stop.cancel();
        assert_eq!(round(&mut old, &[cancel("c1", "o1"), submit("s2", "o2")]).await, Err(Halt::Stopped));
        assert_eq!(committed(&b).len(), 1);
        b.relays.0.lock().unwrap().fail = 0;
        let mut new = owner(&b).await;
        assert_eq!(committed(&b).len(), 3, "finished at takeover");
        assert!(b.store.0.lock().unwrap().contains_key("o2"));
        assert!(matches!(b.operations.0.lock().unwrap()["op-c1"], Status::Succeeded(_)));
        assert_eq!(round(&mut new, &[cancel("c1", "o1")]).await.unwrap(), [Outcome::AlreadyDone]);
        assert_eq!(committed(&b).len(), 3);
    }

    #[tokio::test]
    async fn a_take_over_goes_on_from_the_events_kafka_holds_whatever_the_relay_position_says() {
        let b = backends();
        let mut old = owner(&b).await;
        round(&mut old, &[submit("s1", "o1")]).await.unwrap();
        round(&mut old, &[submit("s2", "o2")]).await.unwrap();
        // Idle for a moment: the note is written.
        old.note().await;
        drop(old);
        // The second round's events are committed, its commit to the
        // relay's group was never marked (or was lost): the next owner
        // reads the position the first round committed.
        b.relays.0.lock().unwrap().position = Some(1);
        owner(&b).await;
        assert_eq!(committed(&b).len(), 2, "nothing produced again");
        // The events went with the position: relayed again.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.position = Some(1);
            k.committed.truncate(1);
        }
        owner(&b).await;
        assert_eq!(committed(&b).len(), 2, "the lost entry relayed again");
        // The topic cannot tell: a position read past a pending commit is
        // raised to the journal's note, which holds only acknowledged ones.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.position = Some(1);
            k.topic_unreadable = true;
            k.read_past_pending = true;
        }
        owner(&b).await;
        assert_eq!(committed(&b).len(), 2, "nothing produced again");
        // Without the doubt, Kafka's position stands.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.position = Some(1);
            k.read_past_pending = false;
        }
        owner(&b).await;
        assert_eq!(committed(&b).len(), 3, "the entry past Kafka's position relayed again");
    }

    #[tokio::test]
    async fn a_commit_to_the_relays_group_lost_while_its_events_stand_is_not_produced_again() {
        let b = backends();
        let mut owner = owner(&b).await;
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::Succeeded]);
        // Kafka restarts and forgets the commit to the relay's group, not
        // the events; the next round's first try fails.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.position = Some(0);
            k.fail = 1;
        }
        assert_eq!(round(&mut owner, &[submit("s2", "o2")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 2, "each event once");
        assert_eq!(b.relays.0.lock().unwrap().position, Some(2));
        // A commit goes through and both its answer and the commit to the
        // group are lost: the round is not produced again.
        {
            let mut k = b.relays.0.lock().unwrap();
            k.lose_commit_answer = true;
            k.lose_group_commit = true;
        }
        assert_eq!(round(&mut owner, &[submit("s3", "o3")]).await.unwrap(), [Outcome::Succeeded]);
        assert_eq!(committed(&b).len(), 3);
    }

    #[tokio::test]
    async fn a_journal_write_with_no_answer_is_read_back_before_anything_is_decided_again() {
        let b = backends();
        let mut owner = owner(&b).await;
        b.journal.0.lock().unwrap().lose_answer = true;
        let outcomes = round(&mut owner, &[submit("s1", "o1")]).await.unwrap();
        assert!(matches!(&outcomes[..], [Outcome::Retry(_)]), "{outcomes:?}");
        // The retry finds the decision the lost answer hid.
        assert_eq!(round(&mut owner, &[submit("s1", "o1")]).await.unwrap(), [Outcome::AlreadyDone]);
        assert_eq!(committed(&b).len(), 1);
        assert_eq!(b.journal.0.lock().unwrap().standing().len(), 1, "decided once");
    }

    #[tokio::test]
    async fn the_next_round_is_decided_on_the_last_one_while_kafka_still_holds_it() {
        let b = backends();
        let mut owner = owner(&b).await;
        b.relays.0.lock().unwrap().fail = usize::MAX;
        let first = owner.decide(&[submit("s1", "o1")]).await.unwrap();
        let second = owner.decide(&[cancel("c1", "o1"), submit("s2", "o2")]).await.unwrap();
        assert!(first.outcomes.iter().chain(&second.outcomes).all(Option::is_none), "all journaled, none answered");
        assert!(!owner.can_decide(), "one round in the relay and one queued behind it");
        assert!(committed(&b).is_empty());
        b.relays.0.lock().unwrap().fail = 0;
        let done = owner.finished().await.unwrap();
        assert_eq!((done.round, done.outcomes), (first.round, vec![Outcome::Succeeded]));
        let done = owner.finished().await.unwrap();
        assert_eq!(done.round, second.round);
        assert_eq!(done.outcomes, [Outcome::Succeeded, Outcome::Succeeded], "the cancel saw the submit");
        assert!(!owner.busy());
        let ids = committed(&b);
        assert_eq!(ids.len(), 3, "each event once");
        assert_eq!(b.store.0.lock().unwrap()["o1"].len(), 2);
        assert_eq!(b.relays.0.lock().unwrap().position, Some(3), "the position covers both rounds");
    }

    #[tokio::test]
    async fn a_full_stream_cache_starts_over_once_the_round_in_the_relay_has_written_its_events() {
        let b = backends();
        let mut owner = owner(&b).await;
        owner.max_streams = 2;
        // The first round stays in the relay for two tries.
        b.relays.0.lock().unwrap().fail = 2;
        let first = owner.decide(&[submit("s1", "o1"), submit("s2", "o2")]).await.unwrap();
        assert!(first.outcomes.iter().all(Option::is_none), "journaled, in the relay");
        // Three streams: more than the cache holds. o1 was cached; the new
        // cache must see its submission, which only the relay writes.
        let second = round(&mut owner, &[cancel("c1", "o1"), submit("s3", "o3"), submit("s4", "o4")]).await.unwrap();
        assert_eq!(second, [Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded], "the cancel saw the submit");
        assert_eq!(b.store.0.lock().unwrap()["o1"].len(), 2);
        assert_eq!(committed(&b).len(), 5, "each event once");
    }

    #[tokio::test]
    async fn a_busy_spell_notes_the_relay_position_with_its_journal_writes_and_an_idle_owner_with_a_write_of_its_own() {
        let b = backends();
        let mut owner = owner(&b).await;
        let notes = |b: &TestBackends| {
            let j = b.journal.0.lock().unwrap();
            (j.notes, j.relayed)
        };
        b.relays.0.lock().unwrap().fail = usize::MAX;
        owner.decide(&[submit("s1", "o1")]).await.unwrap();
        owner.decide(&[submit("s2", "o2")]).await.unwrap();
        b.relays.0.lock().unwrap().fail = 0;
        owner.finished().await.unwrap();
        owner.finished().await.unwrap();
        assert_eq!(notes(&b), (0, None), "no round writes a note of its own");
        assert!(owner.owes_note());
        // Idle: the owner notes the last round's position.
        owner.note().await;
        assert_eq!(notes(&b), (1, Some(2)), "idle: exact");
        assert!(!owner.owes_note());
        owner.note().await;
        assert_eq!(notes(&b), (1, Some(2)), "noted once");
        round(&mut owner, &[submit("s3", "o3")]).await.unwrap();
        assert!(owner.owes_note());
        owner.note().await;
        assert_eq!(notes(&b), (2, Some(3)));
        // A round decided while another is in the relay carries the
        // position of the last finished one in its journal write.
        b.relays.0.lock().unwrap().fail = usize::MAX;
        owner.decide(&[submit("s4", "o4")]).await.unwrap();
        owner.decide(&[submit("s5", "o5")]).await.unwrap();
        assert_eq!(notes(&b), (2, Some(3)));
        b.relays.0.lock().unwrap().fail = 0;
        owner.finished().await.unwrap();
        owner.decide(&[submit("s6", "o6")]).await.unwrap();
        assert_eq!(notes(&b), (2, Some(4)), "s6's journal write noted s4's round");
        owner.finished().await.unwrap();
        owner.finished().await.unwrap();
        assert_eq!(notes(&b), (2, Some(4)));
        owner.note().await;
        assert_eq!(notes(&b), (3, Some(6)));
    }

    #[tokio::test]
    async fn a_journal_write_lost_while_a_round_is_in_kafka_waits_for_that_round_before_claiming_again() {
        let b = backends();
        let mut owner = owner(&b).await;
        b.relays.0.lock().unwrap().fail = 2;
        let first = owner.decide(&[submit("s1", "o1")]).await.unwrap();
        b.journal.0.lock().unwrap().lose_answer = true;
        let lost = owner.decide(&[cancel("c1", "o1")]).await.unwrap();
        assert!(matches!(&lost.outcomes[..], [Some(Outcome::Retry(_))]), "{lost:?}");
        // Claiming again finishes the first round; its answer still comes.
        let again = owner.decide(&[cancel("c1", "o1")]).await.unwrap();
        assert_eq!(again.outcomes, [Some(Outcome::AlreadyDone)], "the lost write stood and was finished");
        let done = owner.finished().await.unwrap();
        assert_eq!((done.round, done.outcomes), (first.round, vec![Outcome::Succeeded]));
        assert_eq!(committed(&b).len(), 2);
    }

    #[tokio::test]
    async fn a_malformed_command_is_dead_lettered_and_holds_back_nothing() {
        let b = backends();
        let mut owner = owner(&b).await;
        let bad = command("x", "SubmitOrder", json!({"order_id": 5}));
        let outcomes = round(&mut owner, &[bad, submit("s1", "o1")]).await.unwrap();
        assert!(matches!(outcomes[0], Outcome::DeadLetter { class: "malformed_command", .. }));
        assert_eq!(outcomes[1], Outcome::Succeeded);
    }
}
