//! librdkafka calls that can block longer than their own timeouts say: a
//! consumer's close waits for its group coordinator, and a coordinator that
//! is gone, or that just restarted while the consumer was rejoining, can
//! keep it (and a group's offset lookup) waiting for good. Such calls run
//! here, on a thread of their own, awaited up to a limit.

use std::time::Duration;

/// Runs `call` on a thread of its own and waits at most `limit` for it:
/// `None` once the limit passed, the call left to finish alone. Not a
/// blocking task of the runtime, which waits for all of those when it ends
/// (a runtime could not shut down behind a stuck call).
pub async fn within<T: Send + 'static>(limit: Duration, call: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(call());
    });
    tokio::time::timeout(limit, result).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_ends_in_time_gives_its_result_and_one_that_does_not_gives_none() {
        assert_eq!(within(Duration::from_secs(5), || 7).await, Some(7));
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let late = within(Duration::from_millis(200), move || stuck.recv().is_ok()).await;
        assert_eq!(late, None);
        assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
        drop(release);
    }
}
