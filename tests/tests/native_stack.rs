//! The native stack (compose/native) as a machine's other users see it: every
//! server listens on loopback only, and the scripts never signal a process
//! they did not start.

use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::*;

/// Whether a listening address (as `ss` prints it) is on loopback.
fn loopback(local: &str) -> bool {
    ["127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"].iter().any(|prefix| local.starts_with(prefix))
}

#[tokio::test]
async fn the_native_stack_listens_on_loopback_only() {
    require_stack().await;
    let out = Command::new("ss").args(["-ltnpH"]).output().expect("ss (iproute2)");
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // The stack's servers: RabbitMQ (beam.smp) and Erlang's port mapper,
    // Kafka, the registry and Cassandra (java).
    let ours: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, process) = (*fields.get(3)?, fields.get(5).copied().unwrap_or(""));
            ["\"beam.smp\"", "\"epmd\"", "\"java\""].iter().any(|p| process.contains(p)).then_some((local, process))
        })
        .collect();
    for port in [5672, 15672, 9092, 8081, 9042] {
        assert!(
            ours.iter().any(|(local, _)| local.ends_with(&format!(":{port}"))),
            "port {port} of the stack is not in ss's listing:\n{listing}"
        );
    }
    let open: Vec<&(&str, &str)> = ours.iter().filter(|(local, _)| !loopback(local)).collect();
    assert!(open.is_empty(), "listening beyond loopback: {open:?}");
}

/// Runs `script` in bash with compose/native/lib.sh sourced and the stack's
/// state in `state_dir`.
fn with_lib(state_dir: &std::path::Path, script: &str) -> std::process::Output {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/native/lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!("source {}; {script}", lib.display()))
        .env("SLUICE_STATE_DIR", state_dir)
        .output()
        .expect("bash")
}

fn alive(pid: u32) -> bool {
    // A reaped child is gone; a zombie still has a /proc entry, so look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn a_stale_pid_file_never_gets_its_pid_signalled() {
    let state = std::env::temp_dir().join(format!("sluice-stack-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(state.join("run")).unwrap();
    // An unrelated process that happens to have the pid a pid file names.
    let mut bystander = Command::new("sleep").arg("600").spawn().expect("sleep");
    let pid = bystander.id();
    let pid_file = state.join("run/fake.pid");

    // A file from before start times were recorded, and one whose start time
    // is not the process's (the pid was given to another process since).
    for stale in [format!("{pid}\n"), format!("{pid} 1\n")] {
        std::fs::write(&pid_file, stale).unwrap();
        let out = with_lib(&state, "if is_running fake; then echo running; fi; stop_bg fake 1");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("running"), "a stale file is not our process");
        assert!(String::from_utf8_lossy(&out.stderr).contains("stale"), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(alive(pid), "the bystander was signalled");
        assert!(!pid_file.exists(), "the stale file is removed");
    }

    // Recorded as ours (pid and start time): that one is stopped.
    let out = with_lib(&state, &format!("track_pid fake {pid} && is_running fake && stop_bg fake 5"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while bystander.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the tracked process was not stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = bystander.kill();
    let _ = std::fs::remove_dir_all(&state);
}

/// A server on a port the stack is about to take (e.g. the RabbitMQ that
/// Debian's package starts on 5672) is reported with its pid and not taken
/// for ours: each script's `start` refuses, before it starts anything.
#[test]
fn a_server_the_stack_did_not_start_is_reported_not_adopted() {
    let script =
        |name: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../compose/native/{name}.sh"));
    for (name, port_variable) in [
        ("rabbitmq", "SLUICE_RABBITMQ_PORT"),
        ("kafka", "SLUICE_KAFKA_PORT"),
        ("registry", "SLUICE_REGISTRY_PORT"),
        ("cassandra", "SLUICE_CQL_PORT"),
    ] {
        // Someone else's server, on a port of its own.
        let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = foreign.local_addr().unwrap().port();
        let state = std::env::temp_dir().join(format!("sluice-stack-{}", uuid::Uuid::new_v4().simple()));
        let out = Command::new(script(name))
            .arg("start")
            .env("SLUICE_STATE_DIR", &state)
            .env(port_variable, port.to_string())
            // Another node name: the stack's own node (running now) is not asked.
            .env("SLUICE_RABBITMQ_NODENAME", format!("foreign-test-{port}@localhost"))
            .output()
            .expect("stack script");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name}.sh start went ahead on a taken port {port}: {err}");
        let me = format!("pid {}", std::process::id());
        assert!(
            err.contains(&format!("port {port} is taken")) && err.contains(&me) && err.contains("did not start"),
            "{name}.sh must name the port and who holds it ({me}): {err}"
        );
        let _ = std::fs::remove_dir_all(&state);
    }
}

/// What the stack downloads runs as root: a jar that is not the one pinned
/// (changed by a byte) or not pinned at all is refused before it runs.
#[test]
fn downloads_run_only_if_they_match_their_pinned_checksums() {
    let cache = std::env::var("SLUICE_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice"));
    let libs = cache.join("kafka/libs");
    let state = std::env::temp_dir().join(format!("sluice-stack-{}", uuid::Uuid::new_v4().simple()));
    let copy = state.join("libs");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&libs).unwrap_or_else(|e| panic!("{} (make up installs Kafka): {e}", libs.display()))
    {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let verify = || with_lib(&state, &format!("verify_download {} kafka", copy.display()));

    let out = verify();
    assert!(out.status.success(), "the installed jars are the pinned ones: {}", String::from_utf8_lossy(&out.stderr));

    // One byte changed in one jar.
    let victim = copy.join("kafka-clients-4.4.0.jar");
    let mut bytes = std::fs::read(&victim).expect("kafka-clients is installed");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let out = verify();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("kafka-clients-4.4.0.jar") && err.contains("not run"), "{err}");
    bytes[last] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();

    // A jar nobody pinned, which the classpath would pick up.
    std::fs::write(copy.join("extra.jar"), b"PK").unwrap();
    let out = verify();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("extra.jar") && err.contains("does not pin"), "{err}");
    let _ = std::fs::remove_dir_all(&state);
}
