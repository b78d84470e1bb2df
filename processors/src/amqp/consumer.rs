//! The consumer of one partition queue: deliveries → rounds of the
//! partition's [`Owner`] → ack, dead letter, or retry after a backoff.
//!
//! The queue has a single active consumer, so while this processor holds the
//! partition no other gets its commands; the first delivery makes it take
//! the partition over (a new ownership epoch, which fences the previous
//! owner). Deliveries at hand are decided together in one round, in the
//! order the queue handed them out: the order the edge accepted them. The
//! next round is decided while the owner's relay finishes the last one
//! (Kafka, operation records); a round's commands are settled when it is
//! finished. A command sent back for a retry waits for its backoff in
//! memory, still unacked; later commands of its stream wait behind it, other
//! streams go on.
//!
//! A dead letter is first published to the DLQ and confirmed by the broker,
//! and only then is the original acked: a crash in between duplicates,
//! never loses. Settled deliveries are acked together (`multiple`) up to the
//! first one still waiting. On stop (shutdown, or the partition moves to
//! another processor) the rounds in progress finish and no other starts;
//! closing the channel hands every unsettled delivery back to the queue, in
//! order, for the next owner.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::headers::{self, string};
use super::topology::stream_key_of;
use crate::domain::Aggregate;
use crate::event_store::EventStore;
use crate::journal::Journal;
use crate::kafka::RelayFactory;
use crate::operations::OperationStore;
use crate::owner::{Backends, Finished, Halt, IncomingCommand, Outcome, Owner};

/// Consumer settings (see `ProcessorConfig`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Unacked deliveries of one partition at once (the largest round).
    pub prefetch: u16,
    pub max_attempts: u32,
    /// Backoff before each retry; attempt n waits `retry_delays[n-1]`
    /// (the last tier repeats).
    pub retry_delays_ms: Vec<u64>,
    /// How often a dead letter of a transient class is re-driven by the
    /// processors (`redrive`); until then its operation is not terminal.
    pub max_redrives: u32,
    /// How often the partition's relay is swept for a transaction its
    /// coordinator forgot ([`RelayFactory::sweep`]), owned or not.
    pub hanging_sweep: Duration,
    /// This processor's name: the consumer tag, so the broker (and
    /// `sluice status`) says who holds each partition.
    pub instance: String,
}

/// One partition of one tenant's context.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionRef {
    pub tenant: String,
    pub context: &'static str,
    pub partition: u16,
}

impl PartitionRef {
    pub fn queue(&self) -> String {
        names::command_queue(&self.tenant, self.context, self.partition)
    }
}

/// A delivery not settled yet.
struct Pending {
    delivery: Delivery,
    headers: FieldTable,
    /// The command, or why the message is not one.
    command: Result<IncomingCommand, String>,
    /// The stream it belongs to: later deliveries of it wait behind it.
    key: String,
    attempt: u32,
    /// Waits for its backoff until then.
    not_before: Instant,
    /// Decided in this round, which the owner's relay is finishing.
    round: Option<u64>,
    /// When this processor took the delivery.
    received: Instant,
}

/// Consumes one partition queue until `stop`, until the owner is fenced, or
/// until the channel fails. The consumer registers at once; while another
/// processor's consumer is active on the queue, it waits (single active
/// consumer) and takes over when that one goes.
pub async fn consume_partition<A, S, J, O, F>(
    connection: &Connection,
    partition: PartitionRef,
    backends: Arc<Backends<S, J, O, F>>,
    settings: ConsumerSettings,
    stop: CancellationToken,
) -> lapin::Result<()>
where
    A: Aggregate,
    S: EventStore + 'static,
    J: Journal + 'static,
    O: OperationStore + 'static,
    F: RelayFactory + 'static,
{
    let queue = partition.queue();
    let channel = connection.create_channel().await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let tag = format!("{}/{}", settings.instance, queue);
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(%queue, "consuming partition");
    let ctx = Ctx { tenant: partition.tenant.clone(), queue, settings, publisher, stop: stop.clone() };
    let mut owner: Option<Owner<A, S, J, O, F>> = None;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut deliveries = std::pin::pin!(consumer.take_until(stop.clone().cancelled_owned()));
    let mut failure = None;
    // Swept beside the rounds, one sweep at a time.
    let mut sweep_at = Instant::now() + ctx.settings.hanging_sweep;
    let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
    // When the owner notes its relay position, once idle for a moment.
    let mut note_at: Option<Instant> = None;
    'rounds: loop {
        if Instant::now() >= sweep_at {
            if sweeping.as_ref().is_none_or(|s| s.is_finished()) {
                let (backends, partition) = (backends.clone(), partition.clone());
                sweeping = Some(tokio::spawn(async move { backends.relays.sweep(&partition).await }));
            }
            sweep_at = Instant::now() + ctx.settings.hanging_sweep;
        }
        // Wait for a delivery, for a retry's backoff to end or for a round to
        // be finished, unless a round can be decided now (a delivery behind
        // a waiting one of its stream cannot).
        let now = Instant::now();
        match &owner {
            Some(o) if !o.busy() && o.owes_note() => {
                note_at.get_or_insert(now + NOTE_WHEN_IDLE);
            }
            _ => note_at = None,
        }
        let picked = pickable(&pending, now).len();
        let prefetch = ctx.settings.prefetch;
        if !owner.as_ref().map_or(picked > 0, |o| may_decide(o.can_decide(), o.busy(), picked, prefetch)) {
            let due = pending.iter().map(|p| p.not_before).filter(|&at| at > now).min();
            let busy = owner.as_ref().is_some_and(|o| o.busy());
            let finished = tokio::select! {
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => { pending.push_back(ctx.pending(delivery)); None }
                    Some(Err(e)) => { failure = Some(e); break 'rounds; }
                    None => break 'rounds,
                },
                _ = tokio::time::sleep_until(due.unwrap_or(now)), if due.is_some() => None,
                // A sweep is due: swept at the top, nothing taken over.
                _ = tokio::time::sleep_until(sweep_at) => continue 'rounds,
                // Idle since the last round: its position is noted.
                _ = tokio::time::sleep_until(note_at.unwrap_or(now)), if note_at.is_some() => {
                    note_at = None;
                    if let Some(o) = &owner {
                        o.note().await;
                    }
                    continue 'rounds;
                }
                done = finished_of(&mut owner), if busy => Some(done),
            };
            if let (Some(done), Some(current)) = (finished, &owner) {
                match done {
                    Ok(finished) => ctx.settle_finished(current, &mut pending, finished).await,
                    Err(halt) => {
                        log_halt(&ctx.queue, &halt);
                        break;
                    }
                }
                continue;
            }
        }
        // Take whatever else has arrived.
        while pending.len() < usize::from(ctx.settings.prefetch.max(1)) {
            match deliveries.next().now_or_never() {
                Some(Some(Ok(delivery))) => pending.push_back(ctx.pending(delivery)),
                Some(Some(Err(e))) => {
                    failure = Some(e);
                    break 'rounds;
                }
                Some(None) => break 'rounds,
                None => break,
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let current = match &mut owner {
            Some(owner) => owner,
            None => match Owner::take_over(partition.clone(), &ctx.settings.instance, backends.clone(), stop.clone())
                .await
            {
                Ok(taken) => owner.insert(taken),
                Err(halt) => {
                    log_halt(&ctx.queue, &halt);
                    break;
                }
            },
        };
        let picked = pickable(&pending, Instant::now());
        if !may_decide(current.can_decide(), current.busy(), picked.len(), ctx.settings.prefetch) {
            continue;
        }
        let commands: Vec<IncomingCommand> = picked
            .iter()
            .filter_map(|&i| {
                let p = &pending[i];
                metrics::histogram!("sluice_command_wait_seconds").record(p.received.elapsed().as_secs_f64());
                p.command.as_ref().ok().map(|c| IncomingCommand { attempt: p.attempt, ..c.clone() })
            })
            .collect();
        let span = info_span!("round", queue = %ctx.queue, commands = commands.len());
        let decided = match current.decide(&commands).instrument(span).await {
            Ok(decided) => decided,
            Err(halt) => {
                log_halt(&ctx.queue, &halt);
                break;
            }
        };
        // Settle in order what is answered now; what the relay finishes
        // waits for its round, what waits for a retry stays.
        let mut outcomes = decided.outcomes.into_iter();
        let mut settled = Vec::new();
        for &index in &picked {
            let p = &mut pending[index];
            let outcome = match &p.command {
                Ok(_) => match outcomes.next().expect("one outcome per command") {
                    Some(outcome) => outcome,
                    None => {
                        p.round = Some(decided.round);
                        continue;
                    }
                },
                Err(reason) => Outcome::DeadLetter { class: "malformed_message", reason: reason.clone() },
            };
            let outcome = match outcome {
                Outcome::Retry(reason) => {
                    headers::push_history(
                        &mut p.headers,
                        format!("{} attempt {}: {reason}", chrono::Utc::now().to_rfc3339(), p.attempt),
                    );
                    metrics::counter!("sluice_commands_processed_total", "tenant" => ctx.tenant.clone(), "outcome" => "retried")
                        .increment(1);
                    if p.attempt >= ctx.settings.max_attempts {
                        Outcome::DeadLetter {
                            class: "retries_exhausted",
                            reason: format!("gave up after {} attempts: {reason}", p.attempt),
                        }
                    } else {
                        let tiers = &ctx.settings.retry_delays_ms;
                        let delay = tiers[(p.attempt as usize - 1).min(tiers.len() - 1)];
                        warn!(queue = %ctx.queue, %reason, delay_ms = delay, attempt = p.attempt, "transient failure, retrying after a delay");
                        p.attempt += 1;
                        p.not_before = Instant::now() + Duration::from_millis(delay);
                        if let Ok(cmd) = &p.command {
                            let cmd = IncomingCommand { attempt: p.attempt, ..cmd.clone() };
                            if let Err(e) = current.record_retry(&cmd).await {
                                warn!(error = %e, "could not record the retry");
                            }
                        }
                        continue;
                    }
                }
                other => other,
            };
            settled.push((index, outcome));
        }
        ctx.settle_all(current, &mut pending, settled).await;
    }
    // The rounds in the relay finish (on stop, their current try ends). A
    // failed channel can ack nothing: the next owner finishes them. With
    // every round finished, the partition is let go in the journal.
    if let (None, Some(current)) = (&failure, &mut owner) {
        let mut halted = false;
        while current.busy() {
            match current.finished().await {
                Ok(finished) => ctx.settle_finished(current, &mut pending, finished).await,
                Err(halt) => {
                    log_halt(&ctx.queue, &halt);
                    halted = true;
                    break;
                }
            }
        }
        if !halted {
            current.note().await;
            current.release().await;
        }
    }
    if let Some(sweep) = sweeping {
        sweep.abort();
    }
    // What was not settled goes back to the queue with the channel.
    stop.cancel();
    super::close_quietly(channel.close(200, "partition released".into())).await;
    super::close_quietly(ctx.publisher.close(200, "partition released".into())).await;
    info!(queue = %ctx.queue, "released partition");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// This round: every delivery not in a round yet whose stream has none
/// waiting for a retry before it (one in a round holds back nothing: its
/// decision stands).
fn pickable(pending: &VecDeque<Pending>, now: Instant) -> Vec<usize> {
    let open: Vec<usize> = (0..pending.len()).filter(|&i| pending[i].round.is_none()).collect();
    let ready = ready_in_order(open.iter().map(|&i| (pending[i].key.as_str(), pending[i].not_before)), now);
    ready.into_iter().map(|j| open[j]).collect()
}

/// Whether a round of `picked` deliveries goes now. While another round is
/// in the relay, only a round of a quarter of the prefetch, or of
/// [`ROUND_AHEAD`] deliveries if that is fewer, goes ahead of it: a smaller
/// one waits and grows, since every round costs a journal write and a Kafka
/// transaction of its own. Without the cap a deep prefetch kept moderate
/// loads from ever overlapping two rounds.
fn may_decide(can_decide: bool, busy: bool, picked: usize, prefetch: u16) -> bool {
    picked > 0 && can_decide && (!busy || picked >= usize::from(prefetch).div_ceil(4).min(ROUND_AHEAD))
}

/// The most deliveries a round needs to go ahead of one in the relay.
const ROUND_AHEAD: usize = 32;

/// The next round the owner finishes; never resolves without an owner.
async fn finished_of<A, S, J, O, F>(owner: &mut Option<Owner<A, S, J, O, F>>) -> Result<Finished, Halt>
where
    A: Aggregate,
    S: EventStore + 'static,
    J: Journal + 'static,
    O: OperationStore + 'static,
    F: RelayFactory + 'static,
{
    match owner {
        Some(owner) => owner.finished().await,
        None => std::future::pending().await,
    }
}

/// The indices of the (stream, not before) items that may go at `now`: an
/// item waiting for its backoff holds back the later items of its stream.
fn ready_in_order<'a>(items: impl Iterator<Item = (&'a str, Instant)>, now: Instant) -> Vec<usize> {
    let mut held = HashSet::new();
    let mut picked = Vec::new();
    for (index, (key, not_before)) in items.enumerate() {
        if held.contains(key) {
            continue;
        }
        if not_before > now {
            held.insert(key);
            continue;
        }
        picked.push(index);
    }
    picked
}

fn log_halt(queue: &str, halt: &Halt) {
    match halt {
        Halt::Fenced(reason) => warn!(%queue, %reason, "fenced: another processor owns the partition now"),
        Halt::Stopped => {}
        Halt::Failed(reason) => tracing::error!(%queue, %reason, "the partition's owner failed"),
    }
}

struct Ctx {
    tenant: String,
    queue: String,
    settings: ConsumerSettings,
    /// A confirm channel for DLQ copies.
    publisher: Channel,
    stop: CancellationToken,
}

/// How long a partition stays idle before its owner notes the relay
/// position in the journal with a write of its own ([`Owner::note`]); a
/// busy partition's journal writes carry it.
const NOTE_WHEN_IDLE: Duration = Duration::from_millis(500);

/// How long a delivery that could not be settled waits before the settle is
/// tried again, and how many times it is tried in place before the delivery
/// is handed back to its queue.
const SETTLE_RETRY_PAUSE: Duration = Duration::from_secs(1);
const SETTLE_TRIES: u32 = 3;

impl Ctx {
    fn pending(&self, delivery: Delivery) -> Pending {
        let headers = headers::headers_of(&delivery);
        let attempt = headers::attempt(&headers);
        let operation_id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
        let command = self.decode(&delivery, &headers, operation_id);
        // A message whose stream cannot be read is on its own.
        let key = stream_key_of(&delivery.data).unwrap_or_else(|| format!("#{}", delivery.delivery_tag));
        let now = Instant::now();
        Pending { delivery, headers, command, key, attempt, not_before: now, round: None, received: now }
    }

    /// Settles the commands of a finished round.
    async fn settle_finished<A, S, J, O, F>(
        &self,
        owner: &Owner<A, S, J, O, F>,
        pending: &mut VecDeque<Pending>,
        finished: Finished,
    ) where
        A: Aggregate,
        S: EventStore,
        J: Journal,
        O: OperationStore,
        F: RelayFactory,
    {
        let members = (0..pending.len()).filter(|&i| pending[i].round == Some(finished.round));
        let settled: Vec<(usize, Outcome)> = members.zip(finished.outcomes).collect();
        self.settle_all(owner, pending, settled).await;
    }

    /// Settles `settled` (indices into `pending`, with their outcomes),
    /// takes them out of `pending` and acks them.
    async fn settle_all<A, S, J, O, F>(
        &self,
        owner: &Owner<A, S, J, O, F>,
        pending: &mut VecDeque<Pending>,
        settled: Vec<(usize, Outcome)>,
    ) where
        A: Aggregate,
        S: EventStore,
        J: Journal,
        O: OperationStore,
        F: RelayFactory,
    {
        if settled.is_empty() {
            return;
        }
        let mut done = vec![false; pending.len()];
        let mut acks = Vec::new();
        for (index, outcome) in settled {
            let p = &pending[index];
            let span = info_span!("settle", queue = %self.queue, operation = p.delivery.properties.message_id().as_ref().map(|s| s.as_str()).unwrap_or("-"));
            if self.settle(owner, p, outcome).instrument(span).await {
                acks.push(p.delivery.delivery_tag);
            }
            metrics::histogram!("sluice_command_seconds").record(p.received.elapsed().as_secs_f64());
            done[index] = true;
        }
        let mut kept = VecDeque::with_capacity(pending.len());
        let mut settled_deliveries = Vec::new();
        for (index, p) in pending.drain(..).enumerate() {
            if done[index] {
                settled_deliveries.push(p.delivery);
            } else {
                kept.push_back(p);
            }
        }
        *pending = kept;
        self.ack(settled_deliveries, &acks, pending.iter().map(|p| p.delivery.delivery_tag).min()).await;
    }

    fn decode(
        &self,
        delivery: &Delivery,
        headers: &FieldTable,
        operation_id: Option<String>,
    ) -> Result<IncomingCommand, String> {
        let operation_id = operation_id.ok_or("message has no message_id (operation id)")?;
        let json: serde_json::Value =
            serde_json::from_slice(&delivery.data).map_err(|e| format!("body is not JSON: {e}"))?;
        let event = CloudEvent::from_json(json).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(|e| format!("{} {}", e.attribute, e.problem)).collect();
            format!("not a valid CloudEvent: {}", list.join("; "))
        })?;
        let traceparent = headers::get_str(headers, "traceparent")
            .or_else(|| event.extensions.get("traceparent").and_then(|v| v.as_str()).map(str::to_owned));
        Ok(IncomingCommand { tenant: self.tenant.clone(), operation_id, event, attempt: 1, traceparent })
    }

    /// Does what the outcome asks before the ack; false when the delivery
    /// was handed back to the queue instead (it must not be acked).
    async fn settle<A, S, J, O, F>(&self, owner: &Owner<A, S, J, O, F>, p: &Pending, outcome: Outcome) -> bool
    where
        A: Aggregate,
        S: EventStore,
        J: Journal,
        O: OperationStore,
        F: RelayFactory,
    {
        let label = match &outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::AlreadyDone => "duplicate",
            Outcome::Rejected(_) => "rejected",
            Outcome::Retry(_) => "retried",
            Outcome::DeadLetter { .. } => "dead_lettered",
        };
        metrics::counter!("sluice_commands_processed_total", "tenant" => self.tenant.clone(), "outcome" => label)
            .increment(1);
        let (class, reason) = match outcome {
            Outcome::DeadLetter { class, reason } => (class, reason),
            Outcome::Rejected(reason) => {
                // An answer like any other (its operation says why).
                debug!(%reason, "rejected");
                return true;
            }
            _ => return true,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            match self.dead_letter(owner, p, class, &reason).await {
                Ok(()) => return true,
                Err(e) if tries < SETTLE_TRIES && !self.stop.is_cancelled() => {
                    warn!(error = %e, "could not dead-letter the delivery; trying again after a pause");
                    tokio::time::sleep(SETTLE_RETRY_PAUSE).await;
                }
                Err(e) => {
                    // Never held: the delivery goes back to the queue and
                    // is tried again; RabbitMQ's delivery limit bounds the
                    // loop (and its dead letters are re-driven).
                    warn!(error = %e, "could not dead-letter the delivery; handing it back");
                    let requeue = BasicNackOptions { requeue: true, ..Default::default() };
                    if let Err(e) = p.delivery.nack(requeue).await {
                        // The channel is gone: its unacked deliveries go
                        // back by themselves, and the consumer reconnects.
                        warn!(error = %e, "could not hand the delivery back");
                    }
                    return false;
                }
            }
        }
    }

    async fn dead_letter<A, S, J, O, F>(
        &self,
        owner: &Owner<A, S, J, O, F>,
        p: &Pending,
        class: &'static str,
        reason: &str,
    ) -> Result<(), String>
    where
        A: Aggregate,
        S: EventStore,
        J: Journal,
        O: OperationStore,
        F: RelayFactory,
    {
        warn!(class, %reason, "dead-lettering");
        metrics::counter!("sluice_dead_letters_total", "tenant" => self.tenant.clone(), "class" => class).increment(1);
        if let Ok(cmd) = &p.command {
            // A dead letter the processors will re-drive is not an answer
            // yet: the operation says `processing` until its next try
            // decides it. Otherwise `dead_lettered` is its final answer.
            // Without the record the operation would say `processing`
            // forever: the settle is tried again.
            let redrives = headers::get_int(&p.headers, headers::REDRIVES).unwrap_or(0);
            let recorded =
                if headers::TRANSIENT_CLASSES.contains(&class) && redrives < i64::from(self.settings.max_redrives) {
                    owner.record_retry(&IncomingCommand { attempt: p.attempt, ..cmd.clone() }).await
                } else {
                    owner.record_dead_letter(cmd, reason).await
                };
            recorded.map_err(|e| format!("cannot record the dead letter yet: {e}"))?;
        }
        let mut headers = p.headers.clone();
        headers.insert(headers::REASON.into(), string(reason));
        headers.insert(headers::ERROR_CLASS.into(), string(class));
        headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(p.attempt)));
        headers.insert(headers::ORIGINAL_QUEUE.into(), string(&self.queue));
        headers.insert(headers::DEAD_LETTERED_AT.into(), string(&chrono::Utc::now().to_rfc3339()));
        let properties = p.delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        let dlq = names::dead_letter_queue(&self.tenant, A::CONTEXT);
        publish_confirmed(&self.publisher, &dlq, &p.delivery.data, properties).await
    }

    /// Acks the settled deliveries: one `multiple` ack for those below the
    /// first delivery still waiting, one by one for the rest.
    async fn ack(&self, settled: Vec<Delivery>, acked: &[u64], first_waiting: Option<u64>) {
        let acked: HashSet<u64> = acked.iter().copied().collect();
        let mut to_ack: Vec<Delivery> = settled.into_iter().filter(|d| acked.contains(&d.delivery_tag)).collect();
        to_ack.sort_by_key(|d| d.delivery_tag);
        let below = first_waiting.unwrap_or(u64::MAX);
        // A nacked delivery below the prefix is no longer outstanding, so a
        // multiple ack covers exactly the settled ones.
        let prefix_end = to_ack.iter().rposition(|d| d.delivery_tag < below);
        let mut result = Ok(());
        if let Some(end) = prefix_end {
            let multiple = BasicAckOptions { multiple: true };
            result = to_ack[end].ack(multiple).await.map(drop);
            for d in &to_ack[end + 1..] {
                if result.is_ok() {
                    result = d.ack(BasicAckOptions::default()).await.map(drop);
                }
            }
        } else {
            for d in &to_ack {
                if result.is_ok() {
                    result = d.ack(BasicAckOptions::default()).await.map(drop);
                }
            }
        }
        if let Err(e) = result {
            // The channel is gone: the deliveries come back to the next
            // owner, which finds them answered.
            warn!(queue = %self.queue, error = %e, "could not ack");
        }
    }
}

/// Publishes to a queue through the default exchange and waits for the
/// confirm; a return (no such queue) or a nack is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            properties,
        )
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(30), confirm).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(other)) => Err(format!("publish to {queue} not confirmed: {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no confirm from {queue} within 30s")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_goes_ahead_of_the_one_in_the_relay_only_when_it_is_big_enough() {
        assert!(may_decide(true, false, 1, 32), "nothing in the relay: any round goes");
        assert!(!may_decide(true, true, 7, 32), "a small one waits for the relay");
        assert!(may_decide(true, true, 8, 32), "a quarter of the prefetch goes ahead");
        assert!(!may_decide(false, false, 32, 32), "one is queued already");
        assert!(!may_decide(true, false, 0, 32), "nothing to decide");
        assert!(!may_decide(true, true, 31, 512), "a deep prefetch: a small one still waits");
        assert!(may_decide(true, true, 32, 512), "a deep prefetch: 32 go ahead");
    }

    #[test]
    fn a_waiting_command_holds_back_only_its_own_streams_later_ones() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let items = [("o1", later), ("o2", now), ("o1", now), ("o3", now), ("o2", now)];
        assert_eq!(ready_in_order(items.into_iter(), now), [1, 3, 4], "o1 waits, and its second command behind it");
        assert_eq!(ready_in_order(items.into_iter(), later), [0, 1, 2, 3, 4], "its backoff over, all go in order");
        assert!(ready_in_order([("o1", later), ("o1", now)].into_iter(), now).is_empty(), "nothing to do: wait");
    }
}
