//! A configuration whose tenants would collide refuses to start, naming the
//! entry: a tenant name with a dot (its topics and queues would read as
//! another tenant's), two tenants sharing a key hash, overlapping source
//! prefixes.

use std::time::{Duration, Instant};

use sluice_tests::*;

/// Starts `sluice serve` with `settings` and returns its exit and stderr;
/// fails if it is still running after 30 s (it started).
fn refused_start(settings: &sluice_cli::settings::Settings) -> (std::process::ExitStatus, String) {
    let config = std::env::temp_dir().join(format!("sluice-config-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let mut child = std::process::Command::new(sluice_bin())
        .arg("--config")
        .arg(&config)
        .args(["serve", "--role", "all"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if began.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("sluice started with a configuration it must refuse");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_file(&config);
    (status, stderr)
}

#[test]
fn colliding_tenants_refuse_to_start_naming_the_entry() {
    let (a, b) = (TestTenant::new(), TestTenant::new());

    let mut dotted = test_settings(&[&a]);
    dotted.tenants[0].name = format!("{}.eu", a.name);
    let (status, stderr) = refused_start(&dotted);
    assert!(!status.success());
    assert!(stderr.contains(&format!("tenants[0] (\"{}.eu\")", a.name)) && stderr.contains("no dots"), "{stderr}");

    let mut shared_key = test_settings(&[&a, &b]);
    shared_key.tenants[1].keys = shared_key.tenants[0].keys.clone();
    let (status, stderr) = refused_start(&shared_key);
    assert!(!status.success());
    assert!(stderr.contains(&format!("same hash as a key of tenant \"{}\"", a.name)), "{stderr}");

    let mut nested = test_settings(&[&a, &b]);
    nested.tenants[1].sources = vec![format!("/{}/eu/", a.name)];
    let (status, stderr) = refused_start(&nested);
    assert!(!status.success());
    assert!(stderr.contains("overlap"), "{stderr}");
}

#[test]
fn an_edge_others_can_reach_refuses_the_published_dev_secret_and_demo_keys() {
    let tenant = TestTenant::new();
    let mut public = test_settings(&[&tenant]);
    public.ingest.http_addr = "0.0.0.0:0".into();
    public.ingest.operation_secret = sluice_ingest::DEV_OPERATION_SECRET.into();
    let (status, stderr) = refused_start(&public);
    assert!(!status.success());
    assert!(stderr.contains("refusing to serve on 0.0.0.0:0") && stderr.contains("dev operation secret"), "{stderr}");

    // A secret of its own, but a demo key on one tenant.
    public.ingest.operation_secret = "a secret of this deployment".into();
    public.tenants[0].keys[0].sha256 = sluice_ingest::DEMO_KEY_SHA256[0].into();
    public.tenants[0].keys[0].name = "acme-dev".into();
    let (status, stderr) = refused_start(&public);
    assert!(!status.success());
    assert!(stderr.contains(&format!("the demo key \"acme-dev\" of tenant {}", tenant.name)), "{stderr}");
}

/// Runs the binary in `dir` with `args`; its exit, stdout and stderr.
fn sluice_in(dir: &std::path::Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = std::process::Command::new(sluice_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_cli_finds_its_config_says_which_and_fails_in_one_line() {
    let tenant = TestTenant::new();
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();

    let (status, stdout, _) = sluice_in(&dir, &["--version"]);
    assert!(status.success());
    assert!(stdout.starts_with("sluice ") && stdout.contains("(commit "), "{stdout}");

    // No config anywhere: said so, and the verb explains what it lacks.
    let (status, _, stderr) = sluice_in(&dir, &["dlq", "list"]);
    assert!(!status.success());
    assert!(stderr.contains("no config file"), "{stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains(" at "), "one clear line, no backtrace: {stderr}");

    // `./sluice.toml` is found without --config; an unknown tenant is
    // refused like an unknown context, naming the configured ones.
    std::fs::write(dir.join("sluice.toml"), toml::to_string(&test_settings(&[&tenant])).unwrap()).unwrap();
    let (status, _, stderr) = sluice_in(&dir, &["dlq", "list", "--tenant", "nobody-here"]);
    assert!(!status.success());
    assert!(stderr.contains("sluice: config sluice.toml"), "{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    assert!(error[0].contains("unknown tenant \"nobody-here\"") && error[0].contains(&tenant.name), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A newcomer in the checkout types `target/debug/sluice status` (no
/// `--config`, no `SLUICE_CONFIG`, no `./sluice.toml`): `config/dev.toml` is
/// found and named, and the status table is printed, healthy or not (the
/// demo's roles may not be running).
#[tokio::test]
async fn sluice_status_in_the_checkout_finds_the_dev_config_and_prints_the_table() {
    require_stack().await;
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
    let (status, stdout, stderr) = sluice_in(checkout, &["status"]);
    assert!(stderr.contains("sluice: config config/dev.toml"), "{stderr}");
    for part in ["SERVER", "ADDRESS", "STATE", "acme / orders", "globex / orders", "status: "] {
        assert!(stdout.contains(part), "{part:?} in the table:\n{stdout}\n{stderr}");
    }
    assert!(matches!(status.code(), Some(0 | 1)), "0 healthy, 1 unhealthy: {status}\n{stderr}");
}

/// The `sluice` process turns transparent huge pages off for itself: with
/// them, the allocator's memory given back and touched again was zeroed by
/// the kernel 2 MiB at a time (a quarter of a rebuild's CPU). The kernel
/// says so in `/proc/<pid>/status` (`THP_enabled: 0`).
#[tokio::test]
async fn the_sluice_process_runs_without_transparent_huge_pages() {
    let tenant = TestTenant::new();
    let process = SluiceProcess::spawn(&test_settings(&[&tenant]), "processor");
    let status = format!("/proc/{}/status", process.child.id());
    eventually(Duration::from_secs(30), "THP_enabled: 0 in the process's status", || async {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        text.lines().any(|line| line.split_whitespace().eq(["THP_enabled:", "0"])).then_some(())
    })
    .await;
}
