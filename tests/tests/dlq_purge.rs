//! `sluice dlq purge` and `delete` against the real broker and CQL store:
//! what they remove is exactly what they were asked to, each removal is in
//! the `dlq_audit` table with who, why and which ids and archived whole, and
//! nothing happens without a justification and the operator's intent.

use std::collections::HashSet;

use sluice_cli::ops::audit::AuditLog;
use sluice_cli::ops::dead_letter::Filter;
use sluice_cli::ops::dlq::Who;
use sluice_cli::ops::OpsError;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_removes_what_it_selects_and_writes_its_audit_record() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let seeded = letters("p", 30);
    seed_dead_letters(&tenant, &seeded).await;
    let dlq = dlq_ops().await;
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)"));
    let scope = tenant_scope(&tenant);
    let who = Who { actor: "test-ops".into(), reason: "orders from the broken 1.4.2 client".into() };

    // A filtered purge: only the malformed SubmitOrders.
    let malformed = Filter { class: Some("malformed_command".into()), ..Default::default() };
    let report = dlq.purge(&audit, &scope, &malformed, &who).await.expect("filtered purge");
    let expected: Vec<String> = seeded
        .iter()
        .filter(|l| l.class.as_deref() == Some("malformed_command"))
        .map(|l| l.message_id.clone())
        .collect();
    assert_eq!(report.removed, 20);
    assert_eq!(report.ids, expected);
    assert_eq!(queue_depth(&dlq_name).await, 10);

    let entries = audit.list(Some(&tenant.name), 10).await.expect("audit");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.action.as_deref(), Some("purge"));
    assert_eq!(e.actor.as_deref(), Some("test-ops"));
    assert_eq!(e.reason.as_deref(), Some("orders from the broken 1.4.2 client"));
    assert_eq!(e.queue.as_deref(), Some(dlq_name.as_str()));
    assert_eq!(e.status.as_deref(), Some("done"));
    assert_eq!(e.count, 20);
    assert_eq!(e.message_ids, expected);
    assert!(e.filter.as_deref().unwrap().contains("malformed_command"));
    assert_eq!(Some(&e.id), report.queues[0].audit_id.as_ref());
    assert!((chrono::Utc::now() - e.at).num_seconds() < 120);

    // The whole rest. One of them waits for the processors' re-drive (its
    // operation says `processing`): removed, it gets its final answer.
    use sluice_processors::operations::{CqlOperationStore, OperationRef, OperationStore, Order, Status};
    let operations = CqlOperationStore::new(audit.session().clone(), "test").await.unwrap();
    let waiting = seeded.iter().find(|l| l.class.as_deref() == Some("retries_exhausted")).unwrap();
    let (op, command_id) = (waiting.message_id.as_str(), format!("cmd-{}", waiting.message_id));
    let op_ref = OperationRef {
        tenant: &tenant.name,
        operation_id: op,
        command_type: "com.example.orders.CancelOrder",
        source: &tenant.source,
        command_id: &command_id,
    };
    operations.record(op_ref, &Status::Processing { attempt: 6 }, Order::default()).await.unwrap();
    let report = dlq.purge(&audit, &scope, &Filter::default(), &who).await.expect("purge");
    assert_eq!(report.removed, 10);
    assert_eq!(operations.status(&tenant.name, op).await.unwrap().as_deref(), Some("dead_lettered"));
    assert_eq!(queue_depth(&dlq_name).await, 0);
    let entries = audit.list(Some(&tenant.name), 10).await.expect("audit");
    assert_eq!(entries.len(), 2, "one row per purge");
    assert_eq!((entries[0].count, entries[0].filter.as_deref()), (10, Some("all")), "newest first");
    let all: HashSet<String> = entries.iter().flat_map(|e| e.message_ids.clone()).collect();
    assert_eq!(
        all,
        seeded.iter().map(|l| l.message_id.clone()).collect::<HashSet<_>>(),
        "every removed id is in the log"
    );

    // Nothing removed, nothing to record.
    let report = dlq.purge(&audit, &scope, &Filter::default(), &who).await.expect("empty purge");
    assert_eq!(report.removed, 0);
    assert_eq!(audit.list(Some(&tenant.name), 10).await.unwrap().len(), 2);
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_removes_one_message_and_says_so_in_the_audit_log() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let seeded = letters("d", 5);
    seed_dead_letters(&tenant, &seeded).await;
    let dlq = dlq_ops().await;
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)"));
    let scope = tenant_scope(&tenant);
    let who = Who { actor: "test-ops".into(), reason: "customer withdrew the order by phone".into() };

    let report = dlq.delete(&audit, &scope, "d-002", &who).await.expect("delete");
    assert_eq!((report.removed, report.ids.as_slice()), (1, ["d-002".to_owned()].as_slice()));
    let entries = audit.list(Some(&tenant.name), 10).await.expect("audit");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].action.as_deref(), Some("delete"));
    assert_eq!(entries[0].message_ids, ["d-002"]);
    assert_eq!(entries[0].filter.as_deref(), Some("message_id=d-002"));
    assert_eq!(entries[0].status.as_deref(), Some("done"));

    // Gone for good; the rest untouched and in order.
    assert!(matches!(dlq.delete(&audit, &scope, "d-002", &who).await, Err(OpsError::NotFound(..))));
    assert_eq!(
        audit.list(Some(&tenant.name), 10).await.unwrap().len(),
        1,
        "a delete that found nothing removed nothing to record"
    );
    let left = drain_ids(&dlq_name).await;
    assert_eq!(left, ["d-000", "d-001", "d-003", "d-004"]);
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_removed_without_a_reason() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    seed_dead_letters(&tenant, &letters("r", 3)).await;
    let dlq = dlq_ops().await;
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)"));
    let who = Who { actor: "test-ops".into(), reason: "  ".into() };
    assert!(matches!(
        dlq.purge(&audit, &tenant_scope(&tenant), &Filter::default(), &who).await,
        Err(OpsError::Usage(_))
    ));
    assert!(matches!(dlq.delete(&audit, &tenant_scope(&tenant), "r-001", &who).await, Err(OpsError::Usage(_))));
    assert_eq!(queue_depth(&orders_dlq(&tenant)).await, 3);
    assert!(audit.list(Some(&tenant.name), 10).await.unwrap().is_empty());
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_limited_to_confirmed_ids_leaves_every_other_match() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    seed_dead_letters(&tenant, &letters("c", 6)).await;
    let dlq = dlq_ops().await;
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)"));
    let who = Who { actor: "test-ops".into(), reason: "shown and confirmed".into() };
    // Every one matches the class filter; only the two the operator saw go.
    let confirmed = Filter {
        class: Some("_".into()),
        message_ids: Some(["c-001".to_owned(), "c-004".to_owned()].into()),
        ..Default::default()
    };
    let report = dlq.purge(&audit, &tenant_scope(&tenant), &confirmed, &who).await.expect("purge");
    assert_eq!(report.ids, ["c-001", "c-004"]);
    assert_eq!(drain_ids(&orders_dlq(&tenant)).await, ["c-000", "c-002", "c-003", "c-005"]);
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

/// `sluice <args>`: whether it succeeded, its stdout and stderr.
/// The `sluice` binary as an operator (or a script) runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destructive_verbs_need_a_justification_a_filter_or_all_and_a_confirmation_and_archive_what_they_remove() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let seeded = letters("i", 6); // i-000 and i-003 retries_exhausted, the rest malformed_command
    seed_dead_letters(&tenant, &seeded).await;
    let t = tenant.name.as_str();
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)"));

    // The old spelling, where --reason was the justification: refused.
    let (ok, _, err) = sluice_says(&settings, &["dlq", "purge", "--tenant", t, "--reason", "timeout", "--yes"]);
    assert!(!ok && err.contains("--why"), "{err}");
    // No filter and no --all: refused.
    let (ok, _, err) = sluice_says(&settings, &["dlq", "purge", "--tenant", t, "--why", "cleanup", "--yes"]);
    assert!(!ok && err.contains("--all"), "{err}");
    // Not at a terminal and no --yes: shown, not confirmed.
    let (ok, _, err) =
        sluice_says(&settings, &["dlq", "purge", "--tenant", t, "--class", "malformed", "--why", "broken client"]);
    assert!(!ok && err.contains("not confirmed") && err.contains("i-001"), "{err}");
    // A dry run says what would go.
    let (ok, out, err) = sluice_says(
        &settings,
        &["dlq", "purge", "--tenant", t, "--class", "malformed", "--why", "broken client", "--dry-run", "--json"],
    );
    assert!(ok, "{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).expect("dry run JSON");
    assert_eq!(listing["matching"], 4, "{listing}");
    assert_eq!(queue_depth(&dlq_name).await, 6, "nothing removed so far");
    assert!(audit.list(Some(t), 10).await.unwrap().is_empty(), "nothing removed, nothing recorded");

    // Confirmed: the four go, archived with the audit row.
    let (ok, out, err) = sluice_says(
        &settings,
        &["dlq", "purge", "--tenant", t, "--class", "malformed", "--why", "broken client", "--yes", "--json"],
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("purge JSON");
    assert_eq!(report["removed"], 4, "{report}");
    assert_eq!(queue_depth(&dlq_name).await, 2);
    let audit_id = report["queues"][0]["audit_id"].as_str().expect("audit id").to_owned();
    let (ok, out, err) = sluice_says(&settings, &["dlq", "archive", &audit_id, "--tenant", t, "--json"]);
    assert!(ok, "{err}");
    let archived: Vec<serde_json::Value> = serde_json::from_str(&out).expect("archive JSON");
    let expected: Vec<&SeedLetter> =
        seeded.iter().filter(|l| l.class.as_deref() == Some("malformed_command")).collect();
    assert_eq!(archived.len(), expected.len());
    for (letter, seed) in archived.iter().zip(&expected) {
        let (body, _) = seed.message(&tenant);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(letter["message_id"], seed.message_id.as_str());
        assert_eq!(letter["detail"]["payload"], body, "the body as it was");
        assert_eq!(letter["detail"]["reason"], "seeded");
    }
    let entries = audit.list(Some(t), 10).await.unwrap();
    assert_eq!((entries.len(), entries[0].reason.as_deref()), (1, Some("broken client")));

    // delete: a dry run removes nothing, then it goes and is archived too.
    let (ok, _, err) = sluice_says(&settings, &["dlq", "delete", "i-000", "--tenant", t, "--why", "dup", "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(queue_depth(&dlq_name).await, 2);
    let (ok, _, err) = sluice_says(&settings, &["dlq", "delete", "i-000", "--tenant", t, "--why", "dup"]);
    assert!(!ok && err.contains("not confirmed"), "{err}");
    let (ok, _, err) = sluice_says(&settings, &["dlq", "delete", "i-000", "--tenant", t, "--why", "dup", "--yes"]);
    assert!(ok, "{err}");
    let (ok, _, err) = sluice_says(&settings, &["dlq", "delete", "i-000", "--tenant", t, "--why", "dup", "--yes"]);
    assert!(!ok && err.contains("no dead letter i-000"), "gone: {err}");

    // --all takes the rest.
    let (ok, out, err) =
        sluice_says(&settings, &["dlq", "purge", "--tenant", t, "--all", "--why", "end of test", "--yes"]);
    assert!(ok, "{err}");
    assert!(out.contains("removed 1"), "{out}");
    assert_eq!(queue_depth(&dlq_name).await, 0);
    let entries = audit.list(Some(t), 10).await.unwrap();
    assert_eq!(entries.len(), 3, "purge, delete, purge: {entries:?}");
    let archived: usize = {
        let mut n = 0;
        for e in &entries {
            n += audit.archived(t, &e.id).await.unwrap().len();
        }
        n
    };
    assert_eq!(archived, 6, "every removed message archived");
    delete_tenant_queues(&settings, &tenant).await;
}
