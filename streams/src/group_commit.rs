//! Group commit: writes that come while one is in flight wait for it and go
//! out together in the next, so that many small writes (a processor's
//! partitions each writing a round of two rows) cost the store a few large
//! requests instead of many small ones. A write that finds nothing in flight
//! goes out at once: grouping adds no wait when the store keeps up, and
//! groups grow exactly as far as the store falls behind.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Writes a group: every unit of the writes that came together.
type Flush<U> = dyn Fn(Vec<U>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// Writes units (a unit: what must stay in one request, such as a stream's
/// rows) through one flush function, grouped as described above. Every
/// write of a group gets the group's answer: a group that fails fails each
/// write in it (the writers try again; group-committed writes are
/// idempotent upserts).
pub struct GroupCommit<U> {
    inner: Arc<Inner<U>>,
}

struct Inner<U> {
    /// What it writes, for its metrics (`sluice_group_commit_writes`).
    name: &'static str,
    flush: Box<Flush<U>>,
    pending: Mutex<Pending<U>>,
}

struct Pending<U> {
    units: Vec<U>,
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
    /// A flusher task is running: it takes what is pending when its write
    /// ends.
    flushing: bool,
}

impl<U: Send + 'static> GroupCommit<U> {
    /// `name`: what it writes, the label of its metrics.
    pub fn new<F, Fut>(name: &'static str, flush: F) -> Self
    where
        F: Fn(Vec<U>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let flush: Box<Flush<U>> = Box::new(move |units| Box::pin(flush(units)));
        let pending = Mutex::new(Pending { units: Vec::new(), waiting: Vec::new(), flushing: false });
        Self { inner: Arc::new(Inner { name, flush, pending }) }
    }

    /// Writes `units` in the next group; resolves with that group's answer.
    /// The group is written by a task of its own: a writer that stops
    /// waiting takes no one else's write with it.
    pub async fn write(&self, units: Vec<U>) -> Result<(), String> {
        if units.is_empty() {
            return Ok(());
        }
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.units.extend(units);
            pending.waiting.push(answer);
            !std::mem::replace(&mut pending.flushing, true)
        };
        if start {
            tokio::spawn(self.inner.clone().flush_all());
        }
        answered.await.unwrap_or_else(|_| Err("the group write ended without an answer".into()))
    }
}

impl<U: Send + 'static> Inner<U> {
    /// Writes what is pending, group after group, until nothing is.
    async fn flush_all(self: Arc<Self>) {
        loop {
            let (units, waiting) = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if pending.waiting.is_empty() {
                    pending.flushing = false;
                    return;
                }
                (std::mem::take(&mut pending.units), std::mem::take(&mut pending.waiting))
            };
            metrics::histogram!("sluice_group_commit_writes", "store" => self.name).record(waiting.len() as f64);
            let answer = (self.flush)(units).await;
            for waiter in waiting {
                let _ = waiter.send(answer.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups a flush was given, in order.
    type Groups = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A flush that records each group and holds the first one until told.
    fn recorder() -> (GroupCommit<u32>, Groups, Arc<tokio::sync::Semaphore>) {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, held) = (groups.clone(), gate.clone());
        let group = GroupCommit::new("numbers", move |units: Vec<u32>| {
            let (seen, held) = (seen.clone(), held.clone());
            async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(units.clone());
                    seen.len() == 1
                };
                if first {
                    held.acquire().await.unwrap().forget();
                }
                if units.contains(&13) {
                    return Err("unlucky".to_owned());
                }
                Ok(())
            }
        });
        (group, groups, gate)
    }

    type Write = tokio::task::JoinHandle<Result<(), String>>;

    /// Writes `first`, and once its group is in flight (held by the
    /// recorder) each of `later`, which wait for it.
    async fn behind_a_held_write(
        group: &Arc<GroupCommit<u32>>,
        groups: &Groups,
        first: Vec<u32>,
        later: Vec<Vec<u32>>,
    ) -> (Write, Vec<Write>) {
        let write = |units: Vec<u32>| {
            let group = group.clone();
            tokio::spawn(async move { group.write(units).await })
        };
        let first = write(first);
        while groups.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let count = later.len();
        let later: Vec<Write> = later.into_iter().map(write).collect();
        while group.inner.pending.lock().unwrap().waiting.len() < count {
            tokio::task::yield_now().await;
        }
        (first, later)
    }

    #[tokio::test]
    async fn writes_that_come_during_a_write_go_together_in_the_next() {
        let (group, groups, gate) = recorder();
        let group = Arc::new(group);
        let (first, later) = behind_a_held_write(&group, &groups, vec![1, 2], vec![vec![3], vec![4, 5], vec![6]]).await;
        gate.add_permits(1);
        first.await.unwrap().unwrap();
        for write in later {
            write.await.unwrap().unwrap();
        }
        assert_eq!(*groups.lock().unwrap(), vec![vec![1, 2], vec![3, 4, 5, 6]]);
        // Nothing in flight: the next write goes out alone, at once.
        group.write(vec![7]).await.unwrap();
        assert_eq!(groups.lock().unwrap().last(), Some(&vec![7]));
    }

    #[tokio::test]
    async fn a_failed_group_fails_every_write_in_it_and_the_next_goes_on() {
        let (group, groups, gate) = recorder();
        let group = Arc::new(group);
        let (first, later) = behind_a_held_write(&group, &groups, vec![1], vec![vec![13], vec![2]]).await;
        gate.add_permits(1);
        first.await.unwrap().unwrap();
        for write in later {
            assert_eq!(write.await.unwrap(), Err("unlucky".to_owned()), "every write of the group gets its answer");
        }
        group.write(vec![3]).await.unwrap();
        assert_eq!(*groups.lock().unwrap(), vec![vec![1], vec![13, 2], vec![3]]);
    }
}
