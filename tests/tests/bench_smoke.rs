//! `sluice bench --quick` end to end, as a user runs it: the real binary
//! against the real stack, every phase, a report with every section. Speed
//! is never asserted (this machine is shared); only that each figure was
//! measured (> 0) and the files were written.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{cql, require_stack, sluice_bin};

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
    // A configuration with an admin address, as the demo's has: the bench's
    // role processes must not each try to bind it.
    let config = std::env::temp_dir().join(format!("sluice-bench-smoke-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, "[metrics]\naddr = \"127.0.0.1:9466\"\n").expect("write config");
    let mut child = Command::new(sluice_bin())
        .arg("--config")
        .arg(&config)
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

    // The run wrote its rows into a keyspace of its own (named as its
    // projection) and dropped it at the end.
    let keyspace = report["keyspace"].as_str().expect("the run's keyspace");
    assert_eq!(report["keyspace"], report["projection"], "the keyspace is named as the run's projection");
    let left = cql()
        .await
        .query_unpaged("SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?", (keyspace,))
        .await
        .expect("reading the schema")
        .into_rows_result()
        .expect("rows")
        .rows_num();
    assert_eq!(left, 0, "the run's keyspace {keyspace} is gone");

    for section in
        ["machine", "mix", "raw", "bare", "edge", "e2e", "reads", "rebuild", "memory", "ratios", "latency_target"]
    {
        assert!(report[section].is_object(), "section {section} missing: {text}");
    }
    // Every ceiling swept over both quick windows, each with a rate and the
    // CPU it cost; the bare-hops pipeline likewise.
    let ceilings = [
        "amqp_publish",
        "amqp_consume",
        "kafka_produce",
        "cql_insert",
        "cql_batch_insert",
        "cql_spread_batch_insert",
        "cql_order_rows_insert",
        "cql_lwt_insert",
    ];
    let sweeps = ceilings.iter().map(|c| format!("/raw/{c}")).chain(["/bare/ceiling".to_owned()]);
    for ceiling in sweeps {
        positive(&report, &format!("{ceiling}/per_second"));
        let sweep = report.pointer(&format!("{ceiling}/sweep")).and_then(Value::as_array).expect("a sweep");
        let windows: Vec<u64> = sweep.iter().filter_map(|p| p["window"].as_u64()).collect();
        assert_eq!(windows, [32, 128], "{ceiling} is swept over the quick windows");
        for (i, point) in sweep.iter().enumerate() {
            positive(&report, &format!("{ceiling}/sweep/{i}/rate/per_second"));
            positive(&report, &format!("{ceiling}/sweep/{i}/busy_us_per_op"));
            let cpu = point["cpu_us_per_op"].as_array().expect("CPU per operation");
            assert!(!cpu.is_empty(), "{ceiling} window {i} has CPU figures");
        }
    }
    positive(&report, "/edge/single/commands_per_second");
    positive(&report, "/edge/batch/commands_per_second");
    for figure in ["max_per_second", "processor_per_second", "projector_per_second", "offsets_per_command"] {
        positive(&report, &format!("/e2e/{figure}"));
    }
    let scaling = report["e2e"]["scaling"].as_array().expect("e2e scaling");
    let processes: Vec<u64> = scaling.iter().filter_map(|s| s["processes"].as_u64()).collect();
    assert_eq!(processes, [1, 2], "one processor, then two on the same backlog");
    for i in 0..scaling.len() {
        positive(&report, &format!("/e2e/scaling/{i}/commands_per_second"));
    }
    let steps = report["e2e"]["steps"].as_array().expect("e2e steps");
    // 25 and 50 % of the drain maximum, then (quick mode) one step halfway
    // between the highest rate that held and the lowest above it that did
    // not, when there is one.
    let rate = |s: &Value| s["target_per_second"].as_f64().expect("a step's rate");
    let fractions: Vec<f64> = steps.iter().take(2).filter_map(|s| s["fraction"].as_f64()).collect();
    assert_eq!(fractions, [0.25, 0.5], "25 and 50 % of the drain maximum first");
    let held = steps[..2].iter().filter(|s| s["holds"] == true).map(rate).fold(0.0, f64::max);
    let failed_above = steps[..2].iter().filter(|s| s["holds"] != true && rate(s) > held).map(rate).reduce(f64::min);
    assert_eq!(steps.len(), 2 + usize::from(failed_above.is_some()), "one step between, when one is due");
    if let Some(failed) = failed_above {
        assert!((rate(&steps[2]) - (held + failed) / 2.0).abs() < 1.0, "the step between runs halfway");
    }
    let step_figures = |pointer: &str| {
        for field in [
            "latency_ms/p50",
            "latency_ms/p99",
            "latency_ms/max",
            "accept_latency_ms/p99",
            "sent_per_second",
            "kafka_offsets_per_command",
        ] {
            positive(&report, &format!("{pointer}/{field}"));
        }
        assert!(
            report.pointer(&format!("{pointer}/holds")).is_some_and(Value::is_boolean),
            "{pointer} says if it held"
        );
        assert!(report.pointer(&format!("{pointer}/backlog_growth_per_second")).is_some_and(Value::is_number));
    };
    for i in 0..steps.len() {
        step_figures(&format!("/e2e/steps/{i}"));
    }
    // The sustained maximum is the highest step that held; the latency step
    // at half of it runs whenever one did.
    let held = steps.iter().filter(|s| s["holds"] == true).count();
    let sustained = report["e2e"]["sustained_per_second"].as_f64().expect("sustained maximum");
    assert_eq!(held > 0, sustained > 0.0, "sustained > 0 exactly when a step held");
    if held > 0 {
        step_figures("/e2e/half_sustained");
        positive(&report, "/latency_target/p99_ms");
        // The bare hops ran open loop at the latency step's rate.
        let half = report["e2e"]["half_sustained"]["target_per_second"].as_f64();
        assert_eq!(report["bare"]["latency"]["per_second"].as_f64(), half, "bare latency at the step's rate");
        for figure in ["latency_ms/p50", "latency_ms/p99", "point/rate/per_second", "point/busy_us_per_op"] {
            positive(&report, &format!("/bare/latency/{figure}"));
        }
    } else {
        assert!(report["e2e"]["half_sustained"].is_null());
        assert!(report["bare"]["latency"].is_null());
    }
    // The read routes were driven with the run's orders in the day.
    for route in ["by_id", "daily_sales"] {
        positive(&report, &format!("/reads/{route}/requests_per_second"));
        positive(&report, &format!("/reads/{route}/latency_ms/p99"));
        assert_eq!(report["reads"][route]["errors"], 0, "every {route} read answered 200: {}", report["reads"][route]);
    }
    positive(&report, "/reads/orders_in_day");
    // The projector alone: its events produced on schedule and all applied,
    // the apply target read from that step.
    for figure in ["target_per_second", "events", "sent_per_second", "caught_up_after_s", "apply_p99_ms"] {
        positive(&report, &format!("/projector_alone/{figure}"));
    }
    assert_eq!(report["projector_alone"]["failed"], 0, "Kafka took every record");
    assert_eq!(
        report["apply_latency_target"]["per_second"], report["projector_alone"]["target_per_second"],
        "the apply target is the projector-alone step's"
    );
    // The live projector on a backlog: every new order applied, its rows
    // counted by the projector itself.
    assert_eq!(report["projector_backlog"]["events"], 10_000, "every backlog event applied, each once");
    for figure in ["rows", "seconds", "first_write_after_s", "writing_seconds", "rows_per_second"] {
        positive(&report, &format!("/projector_backlog/{figure}"));
    }
    assert!(report["ratios"]["backlog_rows_vs_cql_spread_batch_insert"]["value"].as_f64().is_some_and(|v| v > 0.0));
    assert!(report["ratios"]["backlog_rows_vs_cql_order_rows_insert"].as_f64().is_some_and(|v| v > 0.0));
    positive(&report, "/rebuild/events_per_second");
    positive(&report, "/rebuild/rows_per_second");
    for role in ["ingest_mib", "processor_mib", "projector_mib", "bench_mib"] {
        positive(&report, &format!("/memory/{role}"));
    }
    // Noise guard and memory per phase: every phase says how loaded the
    // machine was and how much memory the processes held.
    let phases = report["cpu"].as_array().expect("phases");
    assert!(phases.len() >= 10, "a record per phase");
    for phase in phases {
        assert!(phase["load_average_start"].is_number() && phase["steal"].is_number(), "{phase}");
        assert!(!phase["peak_rss_mib"].as_array().expect("peak RSS").is_empty(), "{phase}");
    }
    assert!(report["machine"]["busy_share_before"].is_number());
    for ratio in ["edge_single_vs_amqp_publish", "edge_batch_vs_amqp_publish", "rebuild_rows_vs_cql_batch_insert"] {
        positive(&report, &format!("/ratios/{ratio}/value"));
    }
    assert!(report["ratios"]["sustained_vs_bare"]["value"].is_number());
    for chart in ["latency.svg", "stages.svg"] {
        let svg = std::fs::read_to_string(out.join(chart)).unwrap_or_else(|e| panic!("{chart} is written: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{chart} is an SVG");
    }
    let markdown = std::fs::read_to_string(out.join("report.md")).expect("report.md is written");
    assert!(markdown.contains("## Ratios") && markdown.contains("bare hops"), "report.md has every section");

    // --compare prints every figure of two reports side by side.
    let compared = Command::new(sluice_bin())
        .args(["bench", "--compare"])
        .arg(out.join("report.json"))
        .arg("--against")
        .arg(out.join("report.json"))
        .output()
        .expect("sluice bench --compare");
    assert!(compared.status.success(), "{}", String::from_utf8_lossy(&compared.stderr));
    let table = String::from_utf8_lossy(&compared.stdout);
    assert!(table.contains("| bare.ceiling.per_second |") && table.contains("+0.0 %"), "{table}");
    let _ = std::fs::remove_dir_all(&out);
}
