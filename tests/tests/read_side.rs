//! The read side against the real stack: replays give the same rows as the
//! live projection, a replay can start at a time, a blue/green rebuild
//! switches reads without a failed read, and poison events go to the
//! projection's dead-letter topic while the rest keeps flowing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_cli::serve::{events_topics, Role};
use sluice_projections::replay::{self, ReplayCtx, StartAt};
use sluice_projections::store::ReadModels;
use sluice_tests::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

/// Sends orders (some later cancelled or shipped) and waits until every
/// operation is settled and the read model shows the last one.
async fn submit_orders(
    platform: &Platform,
    tenant: &TestTenant,
    prefix: &str,
    count: usize,
) -> (Vec<String>, Vec<String>) {
    let mut orders = Vec::new();
    let mut customers = Vec::new();
    let mut locations = Vec::new();
    for i in 0..count {
        let order = format!("{prefix}-{i}");
        let customer = format!("c{}", i % 3);
        let response =
            platform.post_event(tenant, &submit_order(tenant, &format!("{order}-s"), &order, &customer)).await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
        orders.push(order);
        if !customers.contains(&customer) {
            customers.push(customer);
        }
    }
    for location in &locations {
        assert_eq!(platform.await_operation(tenant, location, WAIT).await["status"], "succeeded");
    }
    let mut follow_ups = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let event = match i % 3 {
            0 => command(
                tenant,
                &format!("{order}-c"),
                "com.example.orders.CancelOrder",
                json!({"order_id": order, "reason": "changed mind"}),
            ),
            1 => command(
                tenant,
                &format!("{order}-x"),
                "com.example.orders.ShipOrder",
                json!({"order_id": order, "carrier": "dhl", "tracking_number": "T1"}),
            ),
            _ => continue,
        };
        follow_ups.push(platform.post_event(tenant, &event).await.headers()["location"].to_str().unwrap().to_owned());
    }
    for location in &follow_ups {
        assert_eq!(platform.await_operation(tenant, location, WAIT).await["status"], "succeeded");
    }
    (orders, customers)
}

/// Waits until the live projection has applied everything in the topics.
async fn await_projection_idle(settings: &sluice_cli::settings::Settings, version: i32, topics: &[String]) {
    let group = sluice_projections::runner::group_id(&settings.projector, version);
    eventually(WAIT, "the projection to catch up", || async {
        let lag = sluice_streams::lag::group_lag(&settings.kafka.brokers, &group, topics).await.ok()?;
        (!lag.is_empty() && lag.iter().all(|p| p.lag == 0 && p.committed.is_some() || p.end == 0)).then_some(())
    })
    .await;
}

fn replay_ctx(settings: &sluice_cli::settings::Settings, topics: Vec<String>, store: Arc<ReadModels>) -> ReplayCtx {
    ReplayCtx {
        config: settings.projector.clone(),
        brokers: settings.kafka.brokers.clone(),
        registry_url: settings.registry.url.clone(),
        topics,
        store,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_from_earliest_gives_rows_identical_to_the_live_ones_and_switches_without_a_failed_read() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let projection = settings.projector.name.clone();
    let platform = Platform::start(settings.clone(), Role::All).await;
    let (orders, customers) = submit_orders(&platform, &tenant, "o", 12).await;
    let topics = events_topics(std::slice::from_ref(&tenant.name));
    await_projection_idle(&settings, 1, &topics).await;
    let live = read_model_rows(&projection, 1, &tenant.name, &orders, &customers).await;
    assert_eq!(live.iter().filter(|r| r.starts_with("order ")).count(), 12);

    // Reads keep going through the whole rebuild and switch.
    let reading = Arc::new(AtomicBool::new(true));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (reading, reads, failures, http, url, key) = (
            reading.clone(),
            reads.clone(),
            failures.clone(),
            platform.http.clone(),
            platform.url("/orders/o-1"),
            tenant.key.clone(),
        );
        tokio::spawn(async move {
            while reading.load(Ordering::Relaxed) {
                let response = http.get(&url).bearer_auth(&key).send().await;
                reads.fetch_add(1, Ordering::Relaxed);
                if !matches!(response, Ok(ref r) if r.status() == 200) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let store = Arc::new(ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap());
    let ctx = replay_ctx(&settings, topics.clone(), store.clone());
    // Batches of a few records (a replay takes four times the live batch):
    // an order's cancel or shipment comes a batch or more after its
    // submission, made while the batch before is written, and its rows need
    // what that batch learned about the order.
    let mut small_batches = replay_ctx(&settings, topics.clone(), store.clone());
    small_batches.config.batch_max_records = 1;
    let report =
        replay::rebuild(&small_batches, ctx.orders(), StartAt::Earliest, false, &CancellationToken::new(), |_| {})
            .await
            .unwrap();
    assert_eq!((report.version, report.previous_version), (2, Some(1)));
    assert_eq!(store.versions().get(&projection).await.unwrap().active, 2);

    // Dropping version 1 needs a justification, shows what goes, asks, and
    // is in the audit log.
    let drop_v1 = |extra: &[&str]| {
        let mut args = vec!["replay", projection.as_str(), "--drop-version", "1"];
        args.extend_from_slice(extra);
        sluice_says(&settings, &args)
    };
    let (ok, _, err) = drop_v1(&["--yes"]);
    assert!(!ok && err.contains("--why"), "{err}");
    let (ok, out, err) = drop_v1(&["--why", "version 2 serves", "--dry-run"]);
    assert!(ok && out.contains("would drop version 1"), "{out}{err}");
    let (ok, _, err) = drop_v1(&["--why", "version 2 serves"]);
    assert!(!ok && err.contains("not confirmed"), "{err}");
    assert_eq!(read_model_rows(&projection, 1, &tenant.name, &orders, &customers).await, live, "still there");
    let (ok, _, err) = drop_v1(&["--why", "version 2 serves", "--yes"]);
    assert!(ok, "{err}");
    let audit = sluice_cli::ops::audit::AuditLog::new(cql_sluice().await);
    let rows = audit.list(Some("*"), 1000).await.unwrap();
    let row = rows.iter().find(|e| e.context.as_deref() == Some(projection.as_str())).expect("the drop's audit row");
    assert_eq!(
        (row.action.as_deref(), row.reason.as_deref(), row.status.as_deref()),
        (Some("drop-version"), Some("version 2 serves"), Some("done"))
    );
    // Version 1 is gone: dropping it again is an error, not a success.
    let again = replay::drop_version(&store, store.orders(), 1).await.expect_err("nothing left to drop");
    assert!(again.to_string().contains("has no tables"), "{again}");
    let rebuilt = read_model_rows(&projection, 2, &tenant.name, &orders, &customers).await;
    assert_eq!(rebuilt, live, "row by row");

    reading.store(false, Ordering::Relaxed);
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 10, "reads ran during the rebuild");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no read failed during the switch");

    // The live projector follows the new version: a new order shows up there.
    let response = platform.post_event(&tenant, &submit_order(&tenant, "after-switch", "o-new", "c9")).await;
    let new_order_location = response.headers()["location"].to_str().unwrap().to_owned();
    platform.await_operation(&tenant, &new_order_location, WAIT).await;
    let (status, order) = eventually(WAIT, "the new order in version 2", || async {
        let (s, b) = platform.get_json(&tenant, "/orders/o-new").await;
        (s == 200).then_some((s, b))
    })
    .await;
    assert_eq!((status, order["status"].as_str()), (200, Some("submitted")));

    // A plain replay into the active version changes nothing: the rows are
    // read before it and compared with the rows after it.
    let mut all_orders = orders.clone();
    all_orders.push("o-new".into());
    let mut all_customers = customers.clone();
    all_customers.push("c9".into());
    let before_replay = read_model_rows(&projection, 2, &tenant.name, &all_orders, &all_customers).await;
    assert!(before_replay.len() > rebuilt.len(), "the snapshot holds the new order too");
    let again = replay::replay(&ctx, ctx.orders(), StartAt::Earliest, &CancellationToken::new(), |_| {}).await.unwrap();
    assert_eq!(again.applied, 12 + 8 + 1);
    let after_replay = read_model_rows(&projection, 2, &tenant.name, &all_orders, &all_customers).await;
    assert_eq!(after_replay, before_replay);

    // From a listed position: that partition from there, no other partition.
    let topic = &topics[0];
    let in_partition_0 =
        read_committed_topic(topic).await.iter().filter(|r| rdkafka::Message::partition(*r) == 0).count() as u64;
    let from = format!("{topic}:0:0").parse::<StartAt>().unwrap();
    let listed = replay::replay(&ctx, ctx.orders(), from, &CancellationToken::new(), |_| {}).await.unwrap();
    assert_eq!(listed.applied, in_partition_0, "only partition 0 ({in_partition_0} of 21 records)");
    platform.stop().await.unwrap();

    // A plain replay never moves the live version's applied offsets back:
    // say the live projector had got past the end the replay reads up to (a
    // race leaves it so; set here with the projector stopped, so that only
    // the replay could write). After the replay it still is.
    let session = cql_sluice().await;
    let live_offset = || async {
        session
            .query_unpaged(
                "SELECT next_offset FROM projection_offsets WHERE projection = ? AND version = 2 AND topic = ? \
                 AND partition = 0",
                (&projection, topic),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .maybe_first_row::<(i64,)>()
            .unwrap()
            .map(|(next,)| next)
    };
    let ahead =
        "INSERT INTO projection_offsets (projection, version, topic, partition, next_offset) VALUES (?, 2, ?, 0, ?)";
    session.query_unpaged(ahead, (&projection, topic, 1_000_000_i64)).await.unwrap();
    let last = replay::replay(&ctx, ctx.orders(), StartAt::Earliest, &CancellationToken::new(), |_| {}).await.unwrap();
    assert_eq!(last.applied, 12 + 8 + 1);
    assert_eq!(live_offset().await, Some(1_000_000), "the replay did not move the live offset back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_can_start_at_a_time() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let projection = settings.projector.name.clone();
    let platform = Platform::start(settings.clone(), Role::All).await;
    submit_orders(&platform, &tenant, "early", 3).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await; // event times are in milliseconds: step past the cut
    let (late, _) = submit_orders(&platform, &tenant, "late", 3).await;

    let store = Arc::new(ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap());
    let ctx = replay_ctx(&settings, events_topics(std::slice::from_ref(&tenant.name)), store.clone());
    let report = replay::rebuild(
        &ctx,
        ctx.orders(),
        StartAt::Time(cut.timestamp_millis()),
        false,
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .unwrap();
    // 3 submissions, 1 cancellation and 1 shipment after the cut.
    assert_eq!(report.applied, 5, "{report:?}");
    assert!(store.order(&tenant.name, &late[0]).await.unwrap().is_some());
    assert!(store.order(&tenant.name, "early-2").await.unwrap().is_none(), "before the cut: not in the new version");
    // A partial version never lets the complete one go: not by a drop, not
    // by a rebuild that would drop it after its switch.
    let refused = replay::drop_version(&store, store.orders(), 1).await.expect_err("the active version is partial");
    assert!(refused.to_string().contains("was rebuilt from"), "{refused}");
    let cut_ms = StartAt::Time(cut.timestamp_millis());
    let refused = replay::rebuild(&ctx, ctx.orders(), cut_ms, true, &CancellationToken::new(), |_| {})
        .await
        .expect_err("partial");
    assert!(refused.to_string().contains("partial version"), "{refused}");
    // The CLI has it asked for by name.
    let out = run_sluice(&settings, &["replay", projection.as_str(), "--rebuild", "--from", &cut.to_rfc3339()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--partial"), "{err}");
    platform.stop().await.unwrap();
}

/// The rows of some patients in one version of the patients read model, as
/// the store keeps them.
async fn patient_rows(
    settings: &sluice_cli::settings::Settings,
    version: i32,
    tenant: &str,
    patients: &[String],
) -> Vec<(String, i64, String, String, String)> {
    let session = cql_sluice().await;
    let table = format!("{}_onboarding_steps_v{version}", settings.projector.patients_name);
    let mut out = Vec::new();
    for patient in patients {
        let rows = session
            .query_unpaged(
                format!("SELECT patient_id, version, event_id, step, detail FROM {table} WHERE tenant = ? AND patient_id = ?"),
                (tenant, patient),
            )
            .await
            .expect("steps query")
            .into_rows_result()
            .expect("rows");
        out.extend(rows.rows::<(String, i64, String, String, String)>().expect("typed").map(|r| r.expect("row")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_patients_projection_replays_what_it_lost_and_rebuilds_blue_green_like_the_orders_one() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::All).await;
    let patients: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
    for p in &patients {
        let enrol = command(
            &tenant,
            &format!("e-{p}"),
            "com.example.patients.EnrollPatient",
            json!({"patient_id": p, "name": "Ada"}),
        );
        assert_eq!(platform.post_event(&tenant, &enrol).await.status(), 202);
    }
    for p in &patients {
        eventually(WAIT, &format!("{p}'s assessment scheduled"), || async {
            let (status, view) = platform.get_json(&tenant, &format!("/patients/{p}/onboarding")).await;
            (status == 200 && view["status"] == "awaiting_assessment").then_some(())
        })
        .await;
    }
    platform.stop().await.unwrap();
    let before = patient_rows(&settings, 1, &tenant.name, &patients).await;
    assert_eq!(before.len(), 2 * patients.len(), "enrolled and scheduled: {before:?}");

    // The rows are lost (a truncate, a bad migration): the topic has them all.
    let session = cql_sluice().await;
    // (Truncated, not deleted: the table is this test's own, and the
    // rows are written with their stream versions as timestamps, which a
    // delete's tombstone would shadow for good.)
    let table = format!("{}_onboarding_steps_v1", settings.projector.patients_name);
    session.query_unpaged(format!("TRUNCATE {table}"), ()).await.expect("truncate");
    assert!(patient_rows(&settings, 1, &tenant.name, &patients).await.is_empty());
    let store = Arc::new(ReadModels::new(session, &settings.projector).await.unwrap());
    let topics = vec![format!("{}.patients.events", tenant.name)];
    let ctx = replay_ctx(&settings, topics, store.clone());
    let projection = Arc::new(store.patients().clone());
    let report = replay::replay(&ctx, projection.clone(), StartAt::Earliest, &CancellationToken::new(), |_| {})
        .await
        .expect("patients replay");
    let name = settings.projector.patients_name.as_str();
    assert_eq!((report.projection.as_str(), report.applied, report.dead_lettered), (name, before.len() as u64, 0));
    assert_eq!(report.rows, before.len() as u64, "one step row per event");
    assert_eq!(patient_rows(&settings, 1, &tenant.name, &patients).await, before, "the same rows again");

    // Blue/green, through the same code as the orders projection: version 2
    // is built from the log, reads switch to it, and version 1 can go.
    let report = replay::rebuild(&ctx, projection.clone(), StartAt::Earliest, false, &CancellationToken::new(), |_| {})
        .await
        .expect("patients rebuild");
    assert_eq!((report.version, report.previous_version, report.applied), (2, Some(1), before.len() as u64));
    assert_eq!(store.versions().get(name).await.unwrap().active, 2);
    assert_eq!(patient_rows(&settings, 2, &tenant.name, &patients).await, before, "version 2 row by row");
    replay::drop_version(&store, &*projection, 1).await.expect("version 1 dropped");
    for p in &patients {
        let view = store.patient_onboarding(&tenant.name, p).await.unwrap().expect("served from version 2");
        assert_eq!(view.status, "awaiting_assessment", "{p}");
    }
}

/// Under a steady load something always arrives while a rebuild looks at the
/// ends again: it still switches (once what arrived is at most a batch), and
/// the live projector carries the new version on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_steady_load_switches_and_the_live_projector_carries_on() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let projection = settings.projector.name.clone();
    let platform = Arc::new(Platform::start(settings.clone(), Role::All).await);
    submit_orders(&platform, &tenant, "before", 6).await;

    // A client sends a new order every 20 ms until told to stop.
    let sending = Arc::new(AtomicBool::new(true));
    let load = {
        let (platform, tenant, sending) = (platform.clone(), tenant.clone(), sending.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while sending.load(Ordering::Relaxed) {
                let order = format!("steady-{}", sent.len());
                let response = platform.post_event(&tenant, &submit_order(&tenant, &order, &order, "c1")).await;
                assert_eq!(response.status(), 202);
                sent.push(order);
                tokio::time::sleep(Duration::from_millis(20)).await; // the load's pace
            }
            sent
        })
    };
    eventually(WAIT, "the load under way", || async {
        let (status, _) = platform.get_json(&tenant, "/orders/steady-20").await;
        (status == 200).then_some(())
    })
    .await;

    let store = Arc::new(ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap());
    let ctx = replay_ctx(&settings, events_topics(std::slice::from_ref(&tenant.name)), store.clone());
    let never = CancellationToken::new();
    let rebuild = replay::rebuild(&ctx, ctx.orders(), StartAt::Earliest, false, &never, |_| {});
    let report = tokio::time::timeout(Duration::from_secs(90), rebuild)
        .await
        .expect("the rebuild switched while the load went on")
        .unwrap();
    assert!(sending.load(Ordering::Relaxed) && !load.is_finished(), "the load was still running");
    assert_eq!((report.version, report.previous_version), (2, Some(1)));
    sending.store(false, Ordering::Relaxed);
    let sent = load.await.unwrap();

    // The new version has every order, those sent after the switch included.
    for order in &sent {
        eventually(WAIT, "every order in the new version", || async {
            store.order(&tenant.name, order).await.unwrap().is_some().then_some(())
        })
        .await;
    }
    assert_eq!(store.versions().get(&projection).await.unwrap().active, 2);
    Arc::into_inner(platform).expect("the load task is done").stop().await.unwrap();
}

/// Ctrl-C stops a replay cleanly, and says so: exit status 130, and
/// `"interrupted": true` in the `--json` report (a script must not take it
/// for a complete replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_replay_exits_130_and_says_so() {
    use std::io::BufRead;

    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let topics = events_topics(std::slice::from_ref(&tenant.name));
    sluice_cli::serve::ensure_projection_topics(&settings, &topics, &settings.projector.name).await.unwrap();
    // Records enough for a replay of several seconds: one key's records
    // that cannot be decoded are dead-lettered one after another.
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", KAFKA).create().unwrap();
    let sends = (0..3_000).map(|_| {
        let record = rdkafka::producer::FutureRecord::to(&topics[0]).key("o-slow").payload(&[1u8, 2, 3][..]);
        producer.send(record, Duration::from_secs(30))
    });
    for sent in futures::future::join_all(sends).await {
        sent.expect("produced");
    }

    let mut replay = spawn_sluice(&settings, &["replay", &settings.projector.name, "--json"]);
    let stdout = replay.child.stdout.take().unwrap();
    let pid = replay.child.id();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines().map(|l| l.expect("stdout"));
        let mut seen = Vec::new();
        // Running (a progress line out), the operator presses Ctrl-C.
        for line in lines.by_ref() {
            let progress = line.contains("\"progress\"");
            seen.push(line);
            if progress {
                let kill = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
                assert!(kill.success());
                break;
            }
        }
        seen.extend(lines);
        seen
    })
    .await
    .unwrap();
    let status = replay.child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}: {lines:?}");
    let last: serde_json::Value = serde_json::from_str(lines.last().expect("a report")).expect("JSON");
    assert_eq!(last["interrupted"], true, "{last}");
    let report = &last["report"];
    let done = report["applied"].as_u64().unwrap() + report["dead_lettered"].as_u64().unwrap();
    assert!(done < 3_000, "stopped before the end: {report}");
}
