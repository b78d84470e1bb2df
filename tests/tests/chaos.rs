//! A short chaos run in every `make test`: a few hundred commands, every
//! fault once (processors and projector killed with SIGKILL, RabbitMQ, Kafka
//! and Cassandra restarted). Restarts the shared servers, so it is alone in
//! its file. Bigger runs: `SLUICE_CHAOS_COMMANDS=10000 cargo test -p sluice-tests --test chaos -- --nocapture`;
//! the run prints its seed, and `SLUICE_CHAOS_SEED=<seed>` repeats its fault positions and victims.

use sluice_tests::chaos::{run, ChaosConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_accepted_is_lost_or_applied_twice_under_chaos() {
    let summary = run(ChaosConfig::from_env(300, 6)).await;
    println!("{summary}");
    assert_eq!(summary.lost, 0, "{summary}");
    assert_eq!(summary.duplicated, 0, "{summary}");
    assert_eq!(summary.server_errors, 0, "{summary}");
    assert_eq!(summary.mismatches, 0, "{summary}");
    assert_eq!(summary.kafka_mismatches, 0, "{summary}");
    assert_eq!(summary.faults.len(), 7, "every fault happened: {summary}");
    assert!(
        summary.accepted > 0 && summary.succeeded > 0 && summary.rejected > 0 && summary.dead_lettered > 0,
        "{summary}"
    );
    assert_eq!(summary.accepted, summary.succeeded + summary.rejected + summary.dead_lettered, "{summary}");
}
