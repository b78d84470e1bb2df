//! The round gate: the partitions a processor owns in one context decide
//! their rounds together, in generations.
//!
//! Every round costs the same requests whatever its size (stream loads,
//! status reads, a journal write, stream rows, operation records, a place
//! in a Kafka transaction), and the requests of rounds that come together
//! share one ([`sluice_streams::group_commit`], the relay's shared
//! transactions). Partitions that decide on their own rarely come together:
//! at moderate rates six partitions made rounds of four commands where one
//! partition made rounds of twelve, and each request waited for another
//! partition's in flight. Through the gate, a partition ready to decide
//! while other partitions' rounds are in progress (deciding, or in the
//! relay) waits until they are finished and then goes in with every
//! partition that waited meanwhile: one generation, whose requests go out
//! together and whose rounds share Kafka transactions, while the commands
//! that arrive in the meantime make the next generation's rounds bigger. A
//! partition whose round is finished and which has more to decide waits for
//! the next generation with its turn ([`Turn::next`]), so the last one out
//! goes on with the others. A partition that finds the gate empty goes in at
//! once, so a quiet processor adds no wait.
//!
//! The gate only groups: a partition never waits for it longer than
//! [`MAX_WAIT`] (a generation held up by a slow store or a take-over does not
//! hold the others), and a partition that stops waiting leaves no trace.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a partition waits for the generation in progress; then it
/// goes in beside it.
pub const MAX_WAIT: Duration = Duration::from_millis(50);

#[derive(Default)]
pub struct RoundGate {
    state: Mutex<State>,
    /// Wakes the waiters when a generation begins.
    begun: Notify,
}

#[derive(Default, Debug)]
struct State {
    /// Partitions deciding now.
    inside: usize,
    /// Partitions waiting for the next generation.
    waiting: usize,
    /// Generations begun with waiters (one that found the gate empty does
    /// not count).
    generation: u64,
}

/// A partition's turn: held while its round is decided and relayed.
#[must_use = "the turn ends when it is dropped"]
pub struct Turn<'a> {
    gate: &'a RoundGate,
}

impl RoundGate {
    /// Waits for this partition's turn: at once when nobody decides, else
    /// with the next generation, or after [`MAX_WAIT`]. Cancel-safe.
    pub async fn enter(&self) -> Turn<'_> {
        self.enter_within(MAX_WAIT).await
    }

    async fn enter_within(&self, max_wait: Duration) -> Turn<'_> {
        let ticket = {
            let mut state = self.lock();
            if state.inside == 0 {
                state.inside = 1;
                drop(state);
                metrics::histogram!("sluice_round_gate_partitions").record(1.0);
                return Turn { gate: self };
            }
            state.waiting += 1;
            state.generation + 1
        };
        self.admitted(ticket, max_wait).await
    }

    /// Waits for generation `ticket`, or [`MAX_WAIT`]; counted as waiting.
    async fn admitted(&self, ticket: u64, max_wait: Duration) -> Turn<'_> {
        let mut waiter = Waiter { gate: self, ticket, done: false };
        let admitted = async {
            loop {
                let begun = self.begun.notified();
                tokio::pin!(begun);
                begun.as_mut().enable();
                if self.lock().generation >= ticket {
                    return;
                }
                begun.await;
            }
        };
        if tokio::time::timeout(max_wait, admitted).await.is_err() {
            // Waited long enough: in beside the generation in progress,
            // unless the next one began in the meantime.
            let mut state = self.lock();
            if state.generation < ticket {
                state.waiting -= 1;
                state.inside += 1;
            }
        }
        waiter.done = true;
        Turn { gate: self }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One partition leaves; the last one lets the waiters in.
    fn leave(&self) {
        let mut state = self.lock();
        state.inside -= 1;
        if state.inside == 0 && state.waiting > 0 {
            state.generation += 1;
            state.inside = std::mem::take(&mut state.waiting);
            let partitions = state.inside;
            drop(state);
            metrics::histogram!("sluice_round_gate_partitions").record(partitions as f64);
            self.begun.notify_waiters();
        }
    }
}

impl<'a> Turn<'a> {
    /// Leaves for the next generation: a partition whose round is finished
    /// and which has more to decide waits for the others with its turn, and
    /// the last of them to leave goes on with the rest, not alone after
    /// them.
    pub async fn next(self) -> Turn<'a> {
        self.next_within(MAX_WAIT).await
    }

    async fn next_within(self, max_wait: Duration) -> Turn<'a> {
        let gate = self.gate;
        let ticket = {
            let mut state = gate.lock();
            state.waiting += 1;
            state.generation + 1
        };
        // Waiting already: leaving lets the next generation in, this
        // partition with it if it is the last.
        drop(self);
        gate.admitted(ticket, max_wait).await
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// A partition waiting: if it stops waiting, its place is given back.
struct Waiter<'a> {
    gate: &'a RoundGate,
    ticket: u64,
    done: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let admitted = {
            let mut state = self.gate.lock();
            let admitted = state.generation >= self.ticket;
            if !admitted {
                state.waiting -= 1;
            }
            admitted
        };
        if admitted {
            // Let in while it stopped waiting: it leaves at once.
            self.gate.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    fn counts(gate: &RoundGate) -> (usize, usize, u64) {
        let state = gate.lock();
        (state.inside, state.waiting, state.generation)
    }

    #[tokio::test]
    async fn an_empty_gate_lets_in_at_once_and_later_partitions_go_in_together() {
        let gate = Arc::new(RoundGate::default());
        let first = gate.enter().now_or_never().expect("nobody inside: in at once");
        let (b, c) = (gate.clone(), gate.clone());
        let second = tokio::spawn(async move {
            let _turn = b.enter_within(Duration::from_secs(60)).await;
        });
        let third = tokio::spawn(async move {
            let _turn = c.enter_within(Duration::from_secs(60)).await;
        });
        while counts(&gate).1 < 2 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished() && !third.is_finished(), "they wait while the first decides");
        drop(first);
        assert_eq!(counts(&gate), (2, 0, 1), "both go in as one generation");
        second.await.unwrap();
        third.await.unwrap();
        assert_eq!(counts(&gate), (0, 0, 1));
        let again = gate.enter().now_or_never().expect("empty again");
        drop(again);
    }

    #[tokio::test]
    async fn the_last_to_leave_goes_on_with_the_next_generation() {
        let gate = Arc::new(RoundGate::default());
        let first = gate.enter().await;
        let second = gate.enter_within(Duration::from_secs(60));
        let third = gate.enter_within(Duration::from_secs(60));
        let (mut second, mut third) = (Box::pin(second), Box::pin(third));
        assert!(second.as_mut().now_or_never().is_none() && third.as_mut().now_or_never().is_none());
        drop(first);
        let (second, third) = (second.await, third.await);
        assert_eq!(counts(&gate), (2, 0, 1), "one generation of two");
        // The second is finished and has nothing more; the third has more.
        drop(second);
        let mut next = Box::pin(third.next_within(Duration::from_secs(60)));
        let again = next.as_mut().now_or_never().expect("the last to leave is let in at once");
        assert_eq!(counts(&gate), (1, 0, 2), "in the next generation, not alone after it");
        // One still inside: a partition that leaves for the next
        // generation waits for it, with those that came meanwhile.
        let mut newcomer = Box::pin(gate.enter_within(Duration::from_secs(60)));
        assert!(newcomer.as_mut().now_or_never().is_none());
        drop(again);
        let newcomer = newcomer.await;
        assert_eq!(counts(&gate), (1, 0, 3));
        drop(newcomer);
    }

    #[tokio::test]
    async fn a_partition_waits_at_most_the_limit() {
        let gate = RoundGate::default();
        let _held = gate.enter().await;
        let started = tokio::time::Instant::now();
        let turn = gate.enter_within(Duration::from_millis(20)).await;
        assert!(started.elapsed() >= Duration::from_millis(20), "it waited for the limit");
        assert_eq!(counts(&gate), (2, 0, 0), "in beside the one that held it");
        drop(turn);
    }

    #[tokio::test]
    async fn a_partition_that_stops_waiting_leaves_no_trace() {
        let gate = RoundGate::default();
        let held = gate.enter().await;
        let mut waiting = Box::pin(gate.enter_within(Duration::from_secs(60)));
        assert!(waiting.as_mut().now_or_never().is_none());
        assert_eq!(counts(&gate), (1, 1, 0));
        drop(waiting);
        assert_eq!(counts(&gate), (1, 0, 0), "no longer waiting");
        // Let in, then gone before it noticed: its place is given back.
        let mut waiting = Box::pin(gate.enter_within(Duration::from_secs(60)));
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(held);
        assert_eq!(counts(&gate), (1, 0, 1));
        drop(waiting);
        assert_eq!(counts(&gate), (0, 0, 1), "the gate is empty");
    }
}
