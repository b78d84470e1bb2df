//! `sluice bench --quick` end to end, as a user runs it: the real binary
//! against the real stack, every phase, a report with every section. Speed
//! is never asserted (this machine is shared); only that each figure was
//! measured (> 0) and the files were written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{require_stack, sluice_bin};

/// Quick mode takes under a minute on an idle machine; a loaded one gets
/// room, and a hung run still ends.
const LIMIT: Duration = Duration::from_secs(300);

fn positive(report: &Value, pointer: &str) {
    let value = report.pointer(pointer).and_then(Value::as_f64);
    assert!(value.is_some_and(|v| v > 0.0), "{pointer} should be a number > 0, is {value:?}");
}

#[tokio::test]
async fn quick_bench_writes_a_complete_report() {
    require_stack().await;
    let out = std::env::temp_dir().join(format!("sluice-bench-smoke-{}", uuid::Uuid::new_v4().simple()));
    let mut child = Command::new(sluice_bin())
        .args(["bench", "--quick", "--json", "--out"])
        .arg(&out)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice bench");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sluice bench") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice bench --quick did not finish within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = child.wait_with_output().expect("bench output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "sluice bench --quick failed ({status}):\n{stderr}");
    eprintln!("sluice bench --quick took {:.1} s", started.elapsed().as_secs_f64());

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json is written");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    let printed: Value = serde_json::from_slice(&output.stdout).expect("--json prints the report");
    assert_eq!(printed["tenant"], report["tenant"], "the printed report is the written one");
    assert_eq!(report["mode"], "quick");

    for section in ["raw", "edge", "e2e", "rebuild", "memory", "ratios", "latency_target"] {
        assert!(report[section].is_object(), "section {section} missing: {text}");
    }
    for raw in ["amqp_publish", "amqp_consume", "kafka_produce", "cql_insert", "cql_lwt_insert"] {
        positive(&report, &format!("/raw/{raw}/per_second"));
    }
    positive(&report, "/edge/single/commands_per_second");
    positive(&report, "/edge/batch/commands_per_second");
    positive(&report, "/e2e/max_per_second");
    let scaling = report["e2e"]["scaling"].as_array().expect("e2e scaling");
    let processes: Vec<u64> = scaling.iter().filter_map(|s| s["processes"].as_u64()).collect();
    assert_eq!(processes, [1, 2], "one processor, then two on the same backlog");
    for i in 0..scaling.len() {
        positive(&report, &format!("/e2e/scaling/{i}/commands_per_second"));
    }
    let steps = report["e2e"]["steps"].as_array().expect("e2e steps");
    assert_eq!(steps.len(), 3, "25, 50 and 75 % of the maximum");
    for (i, _) in steps.iter().enumerate() {
        for field in ["latency_ms/p50", "latency_ms/p99", "latency_ms/p999", "latency_ms/max", "generator_lag_ms/max"] {
            positive(&report, &format!("/e2e/steps/{i}/{field}"));
        }
    }
    positive(&report, "/rebuild/events_per_second");
    for role in ["ingest_mib", "processor_mib", "projector_mib"] {
        positive(&report, &format!("/memory/{role}"));
    }
    for ratio in ["e2e_vs_slowest_raw", "edge_vs_amqp_publish", "edge_batch_vs_amqp_publish", "rebuild_vs_cql_insert"] {
        positive(&report, &format!("/ratios/{ratio}/value"));
    }
    positive(&report, "/latency_target/p99_ms");
    let chart = std::fs::read_to_string(out.join("latency.svg")).expect("latency.svg is written");
    assert!(chart.starts_with("<svg") && chart.contains("polyline"), "the chart has curves");
    assert!(Path::new(&out.join("report.txt")).exists());
    let _ = std::fs::remove_dir_all(&out);
}
