//! Clients that hold the edge: a body sent slowly is answered `408` (a
//! problem document) once the request timeout passes, and never holds a
//! graceful shutdown; a request head trickled a byte at a time is cut off
//! once the request timeout passes while other clients get answers, and
//! never holds a shutdown either; connections past the cap wait until one
//! closes; a connection that sends nothing is closed.

use std::time::Duration;

use sluice_cli::serve::Role;
use sluice_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds the waits for what must happen (they end as soon as it does).
const BOUND: Duration = Duration::from_secs(15);

fn address(platform: &Platform) -> String {
    platform.base_url.trim_start_matches("http://").to_owned()
}

/// Sends a request's head and the first bytes of a body it says is longer.
async fn slow_post(platform: &Platform, tenant: &TestTenant) -> TcpStream {
    let mut stream = TcpStream::connect(address(platform)).await.unwrap();
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/cloudevents+json\r\nContent-Length: 1000\r\n\r\n{{\"specversion\":",
        tenant.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut answer)).await.expect("the server answers and closes").ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_slowly_gets_a_408_and_never_holds_a_shutdown() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.ingest.request_timeout_ms = 500;
    let platform = Platform::start(settings, Role::Ingest).await;

    let mut slow = slow_post(&platform, &tenant).await;
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json") && answer.contains("request-timeout"), "{answer}");

    // Another one mid-body while the edge stops: the stop does not wait
    // for the body that never comes.
    let _held = slow_post(&platform, &tenant).await;
    tokio::time::timeout(BOUND, platform.stop()).await.expect("the edge stops despite a body in flight").unwrap();
}

/// Starts sending a request head a byte every 100 ms (never idle for the
/// idle timeout) on a task; answers the read half, which sees the server
/// close the connection.
async fn trickled_head(platform: &Platform) -> tokio::net::tcp::OwnedReadHalf {
    let stream = TcpStream::connect(address(platform)).await.unwrap();
    let (read, mut write) = stream.into_split();
    tokio::spawn(async move {
        write.write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\nX-Slow: ").await.unwrap();
        // Until the server closes (or, if it never does, a minute).
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if write.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_trickled_is_cut_off_while_others_get_answers() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.ingest.request_timeout_ms = 1_000;
    let platform = Platform::start(settings, Role::Ingest).await;

    let started = std::time::Instant::now();
    let mut slow = trickled_head(&platform).await;
    // Meanwhile other clients are answered, one after the other.
    let others = {
        let (http, url) = (platform.http.clone(), platform.url("/healthz"));
        tokio::spawn(async move {
            let mut answered = 0;
            for _ in 0..10 {
                let response = http.get(&url).timeout(Duration::from_secs(2)).send().await.expect("answered");
                assert_eq!(response.status(), 200);
                answered += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answered
        })
    };
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(BOUND, slow.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the trickled head still held its connection after {BOUND:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut off at the timeout, not before: {took:?}");
    assert!(!String::from_utf8_lossy(&sink).contains("200 OK"), "no answer to a head never finished");
    assert_eq!(others.await.unwrap(), 10, "the other clients got their answers");

    // One more trickling while the edge stops: the stop does not wait for it.
    let _held = trickled_head(&platform).await;
    tokio::time::timeout(BOUND, platform.stop()).await.expect("the edge stops despite a head in flight").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.ingest.max_connections = 2;
    let platform = Platform::start(settings, Role::Ingest).await;
    let url = platform.url("/healthz");
    // A client with a fresh connection per request.
    let client = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    let first = TcpStream::connect(address(&platform)).await.unwrap();
    let _second = TcpStream::connect(address(&platform)).await.unwrap();
    // Both slots held: a third client is not served while they stay.
    let waiting = client().get(&url).timeout(Duration::from_secs(2)).send().await;
    assert!(waiting.is_err(), "served past the cap: {waiting:?}");
    drop(first);
    let served = eventually(BOUND, "a slot freed by the closed connection", || async {
        client().get(&url).timeout(Duration::from_secs(2)).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    assert_eq!(served.status(), 200);
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.ingest.request_timeout_ms = 500;
    let platform = Platform::start(settings, Role::Ingest).await;
    let mut idle = TcpStream::connect(address(&platform)).await.unwrap();
    // Closed by the server (twice the request timeout without a byte).
    let answer = read_to_close(&mut idle).await;
    assert_eq!(answer, "", "nothing to answer, just closed");
    platform.stop().await.unwrap();
}
