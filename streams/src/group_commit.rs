//! Group commit: writes that come while one is in flight wait for it and go
//! out together in the next, so that many small writes (a processor's
//! partitions each writing a round of two rows) cost the store a few large
//! requests instead of many small ones. A write that finds nothing in flight
//! goes out at once: grouping adds no wait when the store keeps up, and
//! groups grow exactly as far as the store falls behind. Reads group the
//! same way (the answer is then what the group read): a read that joins a
//! group is sent after it was asked for, so it sees every write that ended
//! before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Sends a group: every unit of the requests that came together.
type Flush<U, R> = dyn Fn(Vec<U>) -> Pin<Box<dyn Future<Output = Result<R, String>> + Send>> + Send + Sync;

/// Sends units (a unit: what must stay in one request, such as a stream's
/// rows, or one key to read) through one flush function, grouped as
/// described above. Every request of a group gets the group's answer (`R`:
/// nothing for writes, what was read for reads): a group that fails fails
/// each request in it (the callers try again; group-committed writes are
/// idempotent upserts).
pub struct GroupCommit<U, R = ()> {
    inner: Arc<Inner<U, R>>,
}

struct Inner<U, R> {
    /// What it sends, for its metrics (`sluice_group_commit_requests`).
    name: &'static str,
    flush: Box<Flush<U, R>>,
    pending: Mutex<Pending<U, R>>,
}

struct Pending<U, R> {
    units: Vec<U>,
    waiting: Vec<oneshot::Sender<Result<R, String>>>,
    /// A flusher task is running: it takes what is pending when its write
    /// ends.
    flushing: bool,
}

impl<U: Send + 'static, R: Clone + Send + 'static> GroupCommit<U, R> {
    /// `name`: what it sends, the label of its metrics.
    pub fn new<F, Fut>(name: &'static str, flush: F) -> Self
    where
        F: Fn(Vec<U>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, String>> + Send + 'static,
    {
        let flush: Box<Flush<U, R>> = Box::new(move |units| Box::pin(flush(units)));
        let pending = Mutex::new(Pending { units: Vec::new(), waiting: Vec::new(), flushing: false });
        Self { inner: Arc::new(Inner { name, flush, pending }) }
    }

    /// Sends `units` in the next group; resolves with that group's answer
    /// (`None`: there was nothing to send). The group is sent by a task of
    /// its own: a caller that stops waiting takes no one else's request
    /// with it.
    pub async fn send(&self, units: Vec<U>) -> Result<Option<R>, String> {
        if units.is_empty() {
            return Ok(None);
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
        answered.await.unwrap_or_else(|_| Err("the group request ended without an answer".into())).map(Some)
    }
}

impl<U: Send + 'static, R: Clone + Send + 'static> Inner<U, R> {
    /// Sends what is pending, group after group, until nothing is.
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
            metrics::histogram!("sluice_group_commit_requests", "store" => self.name).record(waiting.len() as f64);
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

    /// A flush that records each group, holds the first one until told, and
    /// answers the units it was given (as a read answers what it read).
    fn recorder() -> (GroupCommit<u32, Vec<u32>>, Groups, Arc<tokio::sync::Semaphore>) {
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
                Ok(units)
            }
        });
        (group, groups, gate)
    }

    type Write = tokio::task::JoinHandle<Result<Option<Vec<u32>>, String>>;

    /// Writes `first`, and once its group is in flight (held by the
    /// recorder) each of `later`, which wait for it.
    async fn behind_a_held_write(
        group: &Arc<GroupCommit<u32, Vec<u32>>>,
        groups: &Groups,
        first: Vec<u32>,
        later: Vec<Vec<u32>>,
    ) -> (Write, Vec<Write>) {
        let write = |units: Vec<u32>| {
            let group = group.clone();
            tokio::spawn(async move { group.send(units).await })
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
    async fn requests_that_come_during_one_go_together_in_the_next_and_each_gets_its_answer() {
        let (group, groups, gate) = recorder();
        let group = Arc::new(group);
        let (first, later) = behind_a_held_write(&group, &groups, vec![1, 2], vec![vec![3], vec![4, 5], vec![6]]).await;
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), Ok(Some(vec![1, 2])));
        for write in later {
            assert_eq!(write.await.unwrap(), Ok(Some(vec![3, 4, 5, 6])), "each request of a group gets its answer");
        }
        assert_eq!(*groups.lock().unwrap(), vec![vec![1, 2], vec![3, 4, 5, 6]]);
        // Nothing in flight: the next request goes out alone, at once.
        assert_eq!(group.send(vec![7]).await, Ok(Some(vec![7])));
        assert_eq!(group.send(vec![]).await, Ok(None), "nothing to send is sent nowhere");
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
            assert_eq!(write.await.unwrap(), Err("unlucky".to_owned()), "every request of the group gets its answer");
        }
        group.send(vec![3]).await.unwrap();
        assert_eq!(*groups.lock().unwrap(), vec![vec![1], vec![13, 2], vec![3]]);
    }
}
