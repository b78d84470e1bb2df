//! `compose/docker-compose.yml` is the native stack (`compose/native`) for
//! machines with Docker. No Docker engine runs it here, so this test keeps it
//! from drifting: the published ports are the native defaults of
//! `compose/native/lib.sh`, the sluice roles reach each server by its service
//! name and container port, every environment variable given to a role is one
//! the config code reads (proven by loading it through `Settings::load`), the
//! servers have health checks the roles wait for, and the roles' image builds
//! from the repo's `Dockerfile`. It needs no server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_yaml::Value;
use sluice_cli::settings::{Settings, ALIASES};

/// The one-shot sluice service that creates the CQL schema.
const SCHEMA_SERVICE: &str = "sluice-schema";
const SLUICE_SERVICES: [(&str, &str); 3] =
    [("sluice-ingest", "ingest"), ("sluice-processor", "processor"), ("sluice-projector", "projector")];

// Each server is found by its image, so a renamed service is still checked.
const RABBITMQ_IMAGE: &str = "rabbitmq";
const KAFKA_IMAGE: &str = "apache/kafka";
const REGISTRY_IMAGE: &str = "apicurio/apicurio-registry";
const CQL_IMAGE: &str = "scylladb/scylla";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn compose_dir() -> PathBuf {
    root().join("compose")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ------------------------------------------------------------ the compose file

/// The compose file with YAML merge keys (`<<: *anchor`) applied, as Compose
/// applies them.
fn compose() -> Value {
    let path = compose_dir().join("docker-compose.yml");
    let mut doc: Value =
        serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    doc.apply_merge().expect("merge keys apply");
    doc
}

fn services(doc: &Value) -> BTreeMap<String, Value> {
    let services = doc.get("services").and_then(Value::as_mapping).expect("a `services` mapping");
    services.iter().map(|(k, v)| (k.as_str().expect("service names are strings").to_owned(), v.clone())).collect()
}

fn service(doc: &Value, name: &str) -> Value {
    services(doc).remove(name).unwrap_or_else(|| panic!("compose has no service `{name}`"))
}

fn is_sluice(service: &Value) -> bool {
    service.get("build").is_some()
}

/// The one service running an image whose name (before the tag) is `image`.
fn server(doc: &Value, image: &str) -> (String, Value) {
    let found: Vec<(String, Value)> = services(doc)
        .into_iter()
        .filter(|(_, s)| s.get("image").and_then(Value::as_str).map(image_name) == Some(image.to_owned()))
        .collect();
    assert_eq!(found.len(), 1, "exactly one service must run the image {image}, found {:?}", names(&found));
    found.into_iter().next().unwrap()
}

fn names(services: &[(String, Value)]) -> Vec<&str> {
    services.iter().map(|(n, _)| n.as_str()).collect()
}

fn image_name(image: &str) -> String {
    image.rsplit_once(':').map_or(image, |(name, _)| name).to_owned()
}

fn image_tag(service: &Value) -> String {
    let image = service.get("image").and_then(Value::as_str).expect("an image");
    image.rsplit_once(':').map(|(_, tag)| tag.to_owned()).unwrap_or_else(|| panic!("image {image} has no tag"))
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// A service's `environment`, in either of Compose's two forms.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment must be a mapping or a list, found {other:?}"),
    }
}

/// `${NAME:-default}` / `${NAME-default}` / `${NAME}` references in `text`.
fn variables(text: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {text}"));
        let body = &after[..end];
        let (name, default) = match body.split_once(":-").or_else(|| body.split_once('-')) {
            Some((name, default)) => (name, Some(default.to_owned())),
            None => (body, None),
        };
        found.push((name.to_owned(), default));
        rest = &after[end + 1..];
    }
    found
}

/// `text` as Compose would see it with none of its variables set.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {text}"));
        let (_, default) = &variables(&rest[start..start + 2 + end + 1])[0];
        out.push_str(default.as_deref().unwrap_or_else(|| panic!("{text}: a variable without a default")));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.replace("$$", "$")
}

#[derive(Debug)]
struct Published {
    host_ip: Option<String>,
    /// The host port as written, e.g. `${SLUICE_KAFKA_PORT:-9092}` or `8088`.
    host: String,
    container: u16,
}

impl Published {
    fn host_port(&self) -> u16 {
        interpolate(&self.host).parse().unwrap_or_else(|_| panic!("host port {:?} is not a number", self.host))
    }

    fn host_variable(&self) -> Option<(String, Option<String>)> {
        variables(&self.host).into_iter().next()
    }
}

/// The service's `ports`, short (`[ip:]host:container[/proto]`) or long form.
fn published(service: &Value) -> Vec<Published> {
    let Some(ports) = service.get("ports") else {
        return Vec::new();
    };
    let ports = ports.as_sequence().expect("ports is a list");
    ports
        .iter()
        .map(|port| match port {
            Value::Mapping(_) => Published {
                host_ip: port.get("host_ip").map(scalar),
                host: port.get("published").map(scalar).expect("a long-form port with `published`"),
                container: scalar(port.get("target").expect("`target`")).parse().expect("numeric target"),
            },
            _ => {
                let text = scalar(port);
                let text = text.split_once('/').map_or(text.as_str(), |(p, _)| p);
                let (left, container) =
                    text.rsplit_once(':').unwrap_or_else(|| panic!("port {text} publishes nothing"));
                // The host part may be `${VAR:-N}`, which has a colon of its own.
                let (host_ip, host) = match left.find("${") {
                    Some(i) => (left[..i].strip_suffix(':').map(str::to_owned), left[i..].to_owned()),
                    None => match left.rsplit_once(':') {
                        Some((ip, host)) => (Some(ip.to_owned()), host.to_owned()),
                        None => (None, left.to_owned()),
                    },
                };
                Published { host_ip, host, container: container.parse().expect("numeric container port") }
            }
        })
        .collect()
}

/// The mapping of `service` whose host port is `${variable:-...}`.
fn published_as(service_name: &str, service: &Value, variable: &str) -> Published {
    published(service)
        .into_iter()
        .find(|p| p.host_variable().is_some_and(|(name, _)| name == variable))
        .unwrap_or_else(|| panic!("{service_name} publishes no port as ${{{variable}:-...}}"))
}

// --------------------------------------------------------------- the natives

/// `: "${SLUICE_X_PORT:=N}"` lines of compose/native/lib.sh.
fn native_ports() -> BTreeMap<String, u16> {
    let lib = read(&compose_dir().join("native/lib.sh"));
    let ports: BTreeMap<String, u16> = lib
        .lines()
        .filter_map(|line| {
            let body = line.trim().strip_prefix(": \"${")?.strip_suffix("}\"")?;
            let (name, default) = body.split_once(":=")?;
            Some((name.to_owned(), default.parse().ok()?))
        })
        .collect();
    assert!(!ports.is_empty(), "no `: \"${{SLUICE_X_PORT:=N}}\"` lines found in compose/native/lib.sh");
    ports
}

fn native_port(name: &str) -> u16 {
    *native_ports().get(name).unwrap_or_else(|| panic!("compose/native/lib.sh has no default for {name}"))
}

/// `NAME=value` assigned at the start of a line of a native script.
fn native_assignment(script: &str, name: &str) -> String {
    let text = read(&compose_dir().join("native").join(script));
    let prefix = format!("{name}=");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("compose/native/{script} assigns no {name}"))
}

// ------------------------------------------------------------- the settings

/// The top-level fields of `Settings`: the sections `SLUICE_<SECTION>__<FIELD>`
/// can name.
fn settings_sections() -> BTreeSet<String> {
    let source = read(&root().join("cli/src/settings.rs"));
    let body = source.split_once("pub struct Settings {").expect("cli/src/settings.rs defines Settings").1;
    let body = &body[..body.find("\n}").expect("end of Settings")];
    let sections: BTreeSet<String> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub ")?.split_once(':').map(|(name, _)| name.trim().to_owned()))
        .collect();
    assert!(
        sections.contains("amqp") && sections.contains("cql"),
        "could not read the fields of Settings: {sections:?}"
    );
    sections
}

/// Why `name` is not a variable the sluice config reads, or `None` if it is.
fn unknown_variable(name: &str, sections: &BTreeSet<String>) -> Option<String> {
    let Some(rest) = name.strip_prefix("SLUICE_") else {
        return Some("sluice reads only SLUICE_* variables".into());
    };
    if ALIASES.iter().any(|(alias, _)| rest.eq_ignore_ascii_case(alias)) {
        return None;
    }
    // Anything else without `__` is dropped silently by Settings::load.
    let Some((section, field)) = rest.split_once("__") else {
        return Some(format!(
            "neither a short name ({}) nor SLUICE_<SECTION>__<FIELD>",
            ALIASES.iter().map(|(a, _)| format!("SLUICE_{a}")).collect::<Vec<_>>().join(", ")
        ));
    };
    if field.is_empty() {
        return Some("no field after `__`".into());
    }
    if !sections.contains(&section.to_ascii_lowercase()) {
        return Some(format!("`{section}` is not a section of Settings ({sections:?})"));
    }
    None
}

/// Serializes the tests that change this process's environment.
static ENV: Mutex<()> = Mutex::new(());

/// Puts back the SLUICE_* variables the process had, even after a panic.
struct RestoreEnv(Vec<(String, String)>);

impl Drop for RestoreEnv {
    fn drop(&mut self) {
        clear_sluice_env();
        for (k, v) in &self.0 {
            std::env::set_var(k, v);
        }
    }
}

fn clear_sluice_env() {
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") {
            std::env::remove_var(k);
        }
    }
}

/// `Settings::load(file)` with exactly `vars` as the SLUICE_* environment,
/// as in a container started with them.
fn load_with_env(file: &Path, vars: &BTreeMap<String, String>) -> Result<Settings, String> {
    let _lock = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _restore = RestoreEnv(std::env::vars().filter(|(k, _)| k.starts_with("SLUICE_")).collect());
    clear_sluice_env();
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    Settings::load(Some(file))
}

// ----------------------------------------------------------- the Dockerfile

/// The Dockerfile's instructions: comment lines left out, so that no check
/// of it can be satisfied by a comment.
fn dockerfile() -> String {
    read(&root().join("Dockerfile")).lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n")
}

fn command(service: &Value) -> Vec<String> {
    match service.get("command") {
        Some(Value::Sequence(words)) => words.iter().map(scalar).collect(),
        Some(Value::String(line)) => line.split_whitespace().map(str::to_owned).collect(),
        other => panic!("expected a command, found {other:?}"),
    }
}

/// What a service mounts at `inside` (a named volume, or a host path).
fn mounted_at(service: &Value, inside: &str) -> Option<String> {
    service.get("volumes").and_then(Value::as_sequence).into_iter().flatten().map(scalar).find_map(|v| {
        let mut parts = v.split(':');
        let source = parts.next()?.to_owned();
        (parts.next()?.trim_end_matches('/') == inside.trim_end_matches('/')).then_some(source)
    })
}

/// A service's bind mounts: (host path under compose/, container path).
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    service
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .map(scalar)
        .filter(|v| v.starts_with('.') || v.starts_with('/'))
        .map(|v| {
            let mut parts = v.split(':');
            (compose_dir().join(parts.next().unwrap()), parts.next().unwrap_or_default().to_owned())
        })
        .collect()
}

/// The repo file a sluice service's `--config` path names inside its
/// container: the image has none, so it must come through a bind mount.
fn config_file(name: &str, service: &Value) -> PathBuf {
    let words = command(service);
    let path = words
        .iter()
        .position(|w| w == "--config" || w == "-c")
        .and_then(|i| words.get(i + 1))
        .unwrap_or_else(|| panic!("{name} runs without --config: {words:?}"));
    let file = bind_mounts(service)
        .into_iter()
        .find_map(|(host, inside)| {
            let rest = path.strip_prefix(&format!("{}/", inside.trim_end_matches('/')))?;
            Some(host.join(rest))
        })
        .unwrap_or_else(|| panic!("{name}: --config {path} is in no directory the service mounts"));
    assert!(file.is_file(), "{name}: --config {path} is {} on the host, which does not exist", file.display());
    file
}

/// The `ENV` defaults of the image (`ENV KEY=value ...` or `ENV KEY value`).
fn image_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for line in dockerfile().lines() {
        let Some(rest) = line.trim().strip_prefix("ENV ") else { continue };
        if rest.split_whitespace().next().is_some_and(|w| w.contains('=')) {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("Dockerfile: ENV {rest}"));
                env.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        } else if let Some((k, v)) = rest.split_once(' ') {
            env.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    env
}

/// What a sluice container sees: the image's `ENV`, then the service's.
fn container_env(service: &Value) -> BTreeMap<String, String> {
    let mut env = image_env();
    env.extend(environment(service));
    env
}

/// The settings a sluice container runs with: its config file and environment.
fn service_settings(name: &str, service: &Value) -> Settings {
    load_with_env(&config_file(name, service), &container_env(service))
        .unwrap_or_else(|e| panic!("{name}'s configuration does not load: {e}"))
}

fn split_host_port(address: &str) -> (String, u16) {
    let (host, port) = address.rsplit_once(':').unwrap_or_else(|| panic!("{address} has no port"));
    (host.to_owned(), port.parse().unwrap_or_else(|_| panic!("{address}: port is not a number")))
}

/// `scheme://[user[:password]@]host:port[/path]` → (host, port, path).
fn split_url(url: &str) -> (String, u16, String) {
    let rest = url.split_once("://").unwrap_or_else(|| panic!("{url} has no scheme")).1;
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = split_host_port(authority);
    (host, port, path.to_owned())
}

// ==================================================================== tests

#[test]
fn the_compose_file_has_the_servers_and_the_sluice_roles() {
    let doc = compose();
    for image in [RABBITMQ_IMAGE, KAFKA_IMAGE, REGISTRY_IMAGE, CQL_IMAGE] {
        server(&doc, image);
    }
    for (name, role) in SLUICE_SERVICES {
        let service = service(&doc, name);
        assert!(is_sluice(&service), "{name} must build the sluice image");
        let words = command(&service);
        assert!(
            words.windows(3).any(|w| w == ["serve", "--role", role]),
            "{name} must run `serve --role {role}`, runs {words:?}"
        );
    }
    // And the one-shot task that creates the CQL schema (the roles create
    // none), which every role waits for.
    let schema = service(&doc, SCHEMA_SERVICE);
    assert!(is_sluice(&schema), "{SCHEMA_SERVICE} must build the sluice image");
    assert!(command(&schema).windows(2).any(|w| w == ["schemas", "apply"]), "{SCHEMA_SERVICE} runs `schemas apply`");
    for (name, _) in SLUICE_SERVICES {
        let condition = service(&doc, name)
            .get("depends_on")
            .and_then(|d| d.get(SCHEMA_SERVICE))
            .and_then(|d| d.get("condition"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        assert_eq!(condition.as_deref(), Some("service_completed_successfully"), "{name} must wait for the schema");
    }
    let sluice: Vec<String> = services(&doc).into_iter().filter(|(_, s)| is_sluice(s)).map(|(n, _)| n).collect();
    assert_eq!(sluice.len(), SLUICE_SERVICES.len() + 1, "unexpected sluice services: {sluice:?}");
}

#[test]
fn published_ports_are_the_native_defaults() {
    let doc = compose();
    let expected = [
        (RABBITMQ_IMAGE, "SLUICE_RABBITMQ_PORT"),
        (RABBITMQ_IMAGE, "SLUICE_RABBITMQ_MGMT_PORT"),
        (KAFKA_IMAGE, "SLUICE_KAFKA_PORT"),
        (REGISTRY_IMAGE, "SLUICE_REGISTRY_PORT"),
        (CQL_IMAGE, "SLUICE_CQL_PORT"),
    ];
    for (image, variable) in expected {
        let (name, service) = server(&doc, image);
        let port = published_as(&name, &service, variable);
        assert_eq!(
            port.host_port(),
            native_port(variable),
            "{name} publishes ${{{variable}}} with another default than compose/native/lib.sh"
        );
    }

    // Any other port variable in the file is one of lib.sh's, with its default.
    let text = read(&compose_dir().join("docker-compose.yml"));
    let natives = native_ports();
    for (variable, default) in variables(&text) {
        let Some(native) = natives.get(&variable) else {
            panic!("docker-compose.yml uses ${{{variable}}}, which compose/native/lib.sh does not define");
        };
        let default = default.unwrap_or_else(|| panic!("${{{variable}}} needs a default (:-{native})"));
        assert_eq!(default, native.to_string(), "${{{variable}}} defaults to {default}, lib.sh to {native}");
    }

    // Like the native servers, nothing is published beyond loopback.
    for (name, service) in services(&doc) {
        for port in published(&service) {
            assert_eq!(port.host_ip.as_deref(), Some("127.0.0.1"), "{name} publishes {port:?} beyond loopback");
        }
    }
}

#[test]
fn the_edge_is_published_where_the_config_puts_it() {
    let doc = compose();
    let (name, _) = SLUICE_SERVICES[0];
    let ingest = service(&doc, name);
    let config = config_file(name, &ingest);
    let defaults = load_with_env(&config, &BTreeMap::new()).expect("the config file loads");
    let (config_ip, config_port) = split_host_port(&defaults.ingest.http_addr);

    let settings = service_settings(name, &ingest);
    let (listen_ip, listen_port) = split_host_port(&settings.ingest.http_addr);
    assert_eq!(listen_ip, "0.0.0.0", "{name} must listen on all interfaces inside its container");

    let ports = published(&ingest);
    assert_eq!(ports.len(), 1, "{name} publishes {ports:?}");
    assert_eq!(ports[0].container, listen_port, "{name} publishes a port it does not listen on");
    assert_eq!(ports[0].host_port(), config_port, "the host port is not the one of {}", config.display());
    assert_eq!(ports[0].host_ip.as_deref(), Some(config_ip.as_str()));

    // Only the edge listens; the other roles publish nothing.
    for (name, _) in &SLUICE_SERVICES[1..] {
        assert!(published(&service(&doc, name)).is_empty(), "{name} publishes ports");
    }
}

#[test]
fn sluice_environment_names_are_ones_the_code_reads() {
    let doc = compose();
    let sections = settings_sections();
    for (_, path) in ALIASES {
        let section = path.split_once('.').expect("alias paths are section.field").0;
        assert!(sections.contains(section), "alias target {path} is not in Settings");
    }
    let mut checked = 0;
    for (name, service) in services(&doc).into_iter().filter(|(_, s)| is_sluice(s)) {
        let env = environment(&service);
        // Variables the config file names in `${NAME}` (tenant URLs) are read too.
        let config = read(&config_file(&name, &service));
        let named: Vec<String> = variables(&config).into_iter().map(|(v, _)| v).collect();
        for key in env.keys() {
            if named.contains(key) {
                assert!(config.contains(&format!("${{{key}")), "{key} is named in the config file");
            } else if let Some(why) = unknown_variable(key, &sections) {
                panic!("{name} sets {key}, which sluice does not read: {why}");
            }
            checked += 1;
        }
        // Unknown fields and values of the wrong type fail here.
        service_settings(&name, &service);
    }
    assert!(checked > 0, "no sluice service sets any variable");

    // The image's own defaults too.
    for key in image_env().keys().filter(|k| k.starts_with("SLUICE_")) {
        if let Some(why) = unknown_variable(key, &sections) {
            panic!("the Dockerfile sets {key}, which sluice does not read: {why}");
        }
    }
}

#[test]
fn sluice_roles_reach_each_server_by_service_name_and_container_port() {
    let doc = compose();
    let (rabbitmq, rabbitmq_service) = server(&doc, RABBITMQ_IMAGE);
    let (kafka, kafka_service) = server(&doc, KAFKA_IMAGE);
    let (registry, registry_service) = server(&doc, REGISTRY_IMAGE);
    let (cql, cql_service) = server(&doc, CQL_IMAGE);
    let amqp_port = published_as(&rabbitmq, &rabbitmq_service, "SLUICE_RABBITMQ_PORT").container;
    let registry_port = published_as(&registry, &registry_service, "SLUICE_REGISTRY_PORT").container;
    let cql_port = published_as(&cql, &cql_service, "SLUICE_CQL_PORT").container;
    let kafka_env = environment(&kafka_service);
    let listeners = kafka_listeners(&kafka_env, "KAFKA_LISTENERS");
    let advertised = kafka_listeners(&kafka_env, "KAFKA_ADVERTISED_LISTENERS");

    for (name, service) in services(&doc).into_iter().filter(|(_, s)| is_sluice(s)) {
        let settings = service_settings(&name, &service);

        for connection in settings.amqp_connections() {
            let (host, port, _) = split_url(&connection.url);
            let tenants = connection.tenants.join(", ");
            assert_eq!((host.as_str(), port), (rabbitmq.as_str(), amqp_port), "{name}: AMQP URL of {tenants}");
        }

        for broker in settings.kafka.brokers.split(',') {
            let (host, port) = split_host_port(broker.trim());
            assert_eq!(host, kafka, "{name}: Kafka broker {broker} is not the kafka service");
            // The broker must advertise that very address, or clients that
            // bootstrap there are sent elsewhere.
            let (listener, _) = advertised
                .iter()
                .find(|(_, (h, p))| *h == host && *p == port)
                .unwrap_or_else(|| panic!("{name}: kafka advertises no listener at {broker}: {advertised:?}"));
            assert_eq!(listeners[listener].1, port, "{name}: listener {listener} does not listen on {port}");
        }

        let (host, port, path) = split_url(&settings.registry.url);
        assert_eq!(
            (host.as_str(), port),
            (registry.as_str(), registry_port),
            "{name}: registry URL {}",
            settings.registry.url
        );
        let (_, _, native_path) = split_url(&sluice_cli::settings::RegistrySettings::default().url);
        assert_eq!(path, native_path, "{name}: the registry's Confluent-compatible API is at {native_path}");

        assert!(!settings.cql.nodes.is_empty(), "{name}: no CQL nodes");
        for node in &settings.cql.nodes {
            assert_eq!(split_host_port(node), (cql.clone(), cql_port), "{name}: CQL node {node}");
        }
    }

    // Clients on the host bootstrap at 127.0.0.1:$SLUICE_KAFKA_PORT (as with the
    // native broker), so the broker must advertise that and listen on the
    // container port it is published to.
    let host_port = published_as(&kafka, &kafka_service, "SLUICE_KAFKA_PORT");
    let (listener, _) = advertised
        .iter()
        .find(|(_, (h, p))| (h == "127.0.0.1" || h == "localhost") && *p == host_port.host_port())
        .unwrap_or_else(|| {
            panic!("kafka advertises no listener at 127.0.0.1:{} for the host: {advertised:?}", host_port.host_port())
        });
    assert_eq!(listeners[listener].1, host_port.container, "the host listener {listener} is not the published port");
}

/// `NAME://host:port,...` → name → (host, port), with defaults interpolated.
fn kafka_listeners(env: &BTreeMap<String, String>, key: &str) -> BTreeMap<String, (String, u16)> {
    let value = env.get(key).unwrap_or_else(|| panic!("kafka sets no {key}"));
    interpolate(value)
        .split(',')
        .map(|listener| {
            let (name, address) = listener.trim().split_once("://").unwrap_or_else(|| panic!("{key}: {listener}"));
            (name.to_owned(), split_host_port(address))
        })
        .collect()
}

#[test]
fn the_processor_runs_three_replicas() {
    let processor = service(&compose(), "sluice-processor");
    let replicas = processor.get("deploy").and_then(|d| d.get("replicas")).and_then(Value::as_u64);
    assert_eq!(replicas, Some(3), "sluice-processor must have deploy.replicas: 3");
    // Either would stop Compose from starting more than one.
    assert!(processor.get("container_name").is_none(), "a container_name allows one replica only");
    assert!(published(&processor).is_empty(), "a published port allows one replica only");
}

#[test]
fn servers_are_the_native_versions_and_settings() {
    let doc = compose();
    let (name, registry) = server(&doc, REGISTRY_IMAGE);
    assert_eq!(
        environment(&registry).get("APICURIO_RULES_GLOBAL_COMPATIBILITY").map(String::as_str),
        Some("BACKWARD"),
        "{name} must set APICURIO_RULES_GLOBAL_COMPATIBILITY=BACKWARD"
    );
    assert!(read(&compose_dir().join("native/registry.sh")).contains("apicurio.rules.global.compatibility=BACKWARD"));
    assert_eq!(image_tag(&registry), native_assignment("registry.sh", "VERSION"), "{name}: Apicurio version");

    let (name, kafka) = server(&doc, KAFKA_IMAGE);
    assert_eq!(image_tag(&kafka), native_assignment("kafka.sh", "KAFKA_VERSION"), "{name}: Kafka version");
    let env = environment(&kafka);
    let roles: BTreeSet<&str> = env.get("KAFKA_PROCESS_ROLES").expect("KRaft roles").split(',').collect();
    assert_eq!(roles, BTreeSet::from(["broker", "controller"]), "{name}: one KRaft node, broker and controller");
    // sluice creates its topics; like the native broker, nothing else may.
    assert_eq!(env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE").map(String::as_str), Some("false"));
}

#[test]
fn every_server_has_a_healthcheck_the_roles_wait_for() {
    let doc = compose();
    let all = services(&doc);
    // `<server>-setup` services are one-shot tasks (the demo vhost): the
    // roles wait for them to have completed, not to be healthy.
    let is_task = |name: &str| name.ends_with("-setup");
    let servers: Vec<&String> = all.iter().filter(|(n, s)| !is_sluice(s) && !is_task(n)).map(|(n, _)| n).collect();
    let tasks: Vec<&String> = all.iter().filter(|(n, s)| !is_sluice(s) && is_task(n)).map(|(n, _)| n).collect();
    for name in &servers {
        let check = all[*name].get("healthcheck").unwrap_or_else(|| panic!("{name} has no healthcheck"));
        assert_ne!(check.get("disable").and_then(Value::as_bool), Some(true), "{name}'s healthcheck is disabled");
        let test = check.get("test").unwrap_or_else(|| panic!("{name}'s healthcheck has no test"));
        let words: Vec<String> = match test {
            Value::Sequence(words) => words.iter().map(scalar).collect(),
            other => vec!["CMD-SHELL".into(), scalar(other)],
        };
        assert!(
            matches!(words.first().map(String::as_str), Some("CMD" | "CMD-SHELL")),
            "{name}'s healthcheck: {words:?}"
        );
        // What the check runs must exercise the server itself, the way its
        // clients use it (a check such as `true` or `exit 0` proves nothing).
        let command = words[1..].join(" ");
        let exercises: &[&str] = match name.as_str() {
            "rabbitmq" => &["rabbitmq-diagnostics", "check_port_connectivity"],
            "kafka" => &["kafka-topics.sh", "--bootstrap-server", "--list"],
            "registry" => &["GET /apis/ccompat/v7/", " 200 "],
            "scylla" => &["cqlsh", "SELECT"],
            other => panic!("say what the healthcheck of server {other} must exercise"),
        };
        for needle in exercises {
            assert!(command.contains(needle), "{name}'s healthcheck must run {needle:?}: {command}");
        }
    }
    for (name, service) in all.iter().filter(|(_, s)| is_sluice(s)) {
        let depends = service.get("depends_on").unwrap_or_else(|| panic!("{name} has no depends_on"));
        for server in &servers {
            let condition = depends.get(server.as_str()).and_then(|d| d.get("condition")).and_then(Value::as_str);
            assert_eq!(condition, Some("service_healthy"), "{name} must wait for {server} to be healthy");
        }
        for task in &tasks {
            let condition = depends.get(task.as_str()).and_then(|d| d.get("condition")).and_then(Value::as_str);
            assert_eq!(condition, Some("service_completed_successfully"), "{name} must wait for {task} to complete");
        }
    }
}

#[test]
fn rabbitmq_enables_the_native_plugins() {
    let doc = compose();
    let (name, rabbitmq) = server(&doc, RABBITMQ_IMAGE);
    let mount = mounted_at(&rabbitmq, "/etc/rabbitmq/enabled_plugins")
        .unwrap_or_else(|| panic!("{name} mounts no /etc/rabbitmq/enabled_plugins"));
    let source = compose_dir().join(mount);
    let plugins = plugin_list(&read(&source));

    let native = read(&compose_dir().join("native/rabbitmq.sh"));
    let native_line = native
        .lines()
        .find(|l| l.contains("RABBITMQ_ENABLED_PLUGINS_FILE") && l.contains('['))
        .expect("compose/native/rabbitmq.sh writes an enabled_plugins file");
    let wanted = plugin_list(native_line);
    assert!(wanted.contains("rabbitmq_shovel"), "could not read the native plugin list: {wanted:?}");
    let missing: Vec<_> = wanted.difference(&plugins).collect();
    assert!(missing.is_empty(), "{} lacks the native plugins {missing:?}", source.display());
}

/// The names in an Erlang list `[a,b,c].` somewhere in `text`.
fn plugin_list(text: &str) -> BTreeSet<String> {
    let start = text.find('[').expect("a plugin list");
    let end = start + text[start..].find(']').expect("a closed plugin list");
    text[start + 1..end].split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect()
}

/// The image must not fall back to the demo's published secret and keys:
/// its final stage copies nothing from config/ (the build stage sees the
/// whole repo, which does not reach the image), and its default command
/// names no file.
#[test]
fn the_image_carries_no_configuration() {
    let dockerfile = dockerfile();
    let final_stage = dockerfile.rsplit_once("\nFROM ").map(|(_, stage)| stage).expect("a multi-stage Dockerfile");
    for line in final_stage.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"COPY") {
            let sources: Vec<&&str> =
                words[1..words.len().saturating_sub(1)].iter().filter(|w| !w.starts_with("--")).collect();
            assert!(
                !sources.iter().any(|s| s.trim_end_matches('/') == "config" || s.starts_with("config/") || **s == "."),
                "the image must not carry config/: {line}"
            );
        }
        if words.first() == Some(&"CMD") || words.first() == Some(&"ENTRYPOINT") {
            assert!(!line.contains(".toml") && !line.contains("--config"), "the image names a config file: {line}");
        }
    }
    assert!(dockerfile.contains("CMD"), "the Dockerfile has a CMD");
    assert!(!image_env().contains_key("SLUICE_CONFIG"), "the image names a config file in SLUICE_CONFIG");
}

/// Each server's data survives a new container: a named volume declared at
/// the top level, mounted where the server writes.
#[test]
fn every_server_keeps_its_data_in_a_named_volume() {
    let doc = compose();
    let declared: BTreeSet<String> = doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .expect("a top-level `volumes` mapping")
        .keys()
        .map(scalar)
        .collect();
    let data_dir = |name: &str, service: &Value| -> String {
        let env = environment(service);
        match name {
            "rabbitmq" => "/var/lib/rabbitmq".into(),
            "kafka" => env.get("KAFKA_LOG_DIRS").expect("KAFKA_LOG_DIRS").clone(),
            "registry" => {
                let url = env.get("APICURIO_DATASOURCE_URL").expect("APICURIO_DATASOURCE_URL");
                let file = url.strip_prefix("jdbc:h2:file:").expect("a file-backed H2").split(';').next().unwrap();
                file.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("/").to_owned()
            }
            "scylla" => "/var/lib/scylla".into(),
            other => panic!("say where server {other} keeps its data"),
        }
    };
    let mut checked = Vec::new();
    for (name, service) in services(&doc).into_iter().filter(|(n, s)| !is_sluice(s) && !n.ends_with("-setup")) {
        let dir = data_dir(&name, &service);
        let volume =
            mounted_at(&service, &dir).unwrap_or_else(|| panic!("{name} mounts nothing at its data directory {dir}"));
        assert!(declared.contains(&volume), "{name}: {volume} is not a named volume declared under `volumes`");
        checked.push(name);
    }
    assert_eq!(checked.len(), 4, "four servers checked: {checked:?}");
}

#[test]
fn bind_mounts_exist() {
    let mut checked = Vec::new();
    for (name, service) in services(&compose()) {
        for volume in service.get("volumes").and_then(Value::as_sequence).into_iter().flatten() {
            let volume = scalar(volume);
            let source = volume.split(':').next().unwrap();
            if source.starts_with('.') || source.starts_with('/') {
                assert!(compose_dir().join(source).exists(), "{name} mounts {source}, which does not exist");
                checked.push(format!("{name}: {source}"));
            }
        }
    }
    // RabbitMQ's plugins and settings come from the repo: not a vacuous pass.
    for file in ["enabled_plugins", "20-sluice.conf"] {
        assert!(
            checked.iter().any(|c| c.starts_with("rabbitmq:") && c.ends_with(file)),
            "rabbitmq mounts {file}: {checked:?}"
        );
    }
}

#[test]
fn sluice_images_build_from_the_repo_dockerfile() {
    let doc = compose();
    let root = root().canonicalize().unwrap();
    let mut images = BTreeSet::new();
    for (name, service) in services(&doc).into_iter().filter(|(_, s)| is_sluice(s)) {
        let build = service.get("build").unwrap();
        let (context, dockerfile) = match build {
            Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
            _ => (
                build.get("context").map(scalar).unwrap_or_else(|| ".".into()),
                build.get("dockerfile").map(scalar).unwrap_or_else(|| "Dockerfile".into()),
            ),
        };
        let context = compose_dir().join(&context).canonicalize().unwrap();
        assert_eq!(context, root, "{name} builds from {}, not the repo root", context.display());
        assert_eq!(context.join(&dockerfile), root.join("Dockerfile"), "{name} builds from another Dockerfile");
        images.insert(service.get("image").map(scalar));
    }
    assert_eq!(images.len(), 1, "the sluice roles must share one image: {images:?}");

    let dockerfile = dockerfile();
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2 && froms[0].starts_with("FROM rust:"), "a multi-stage build from rust: {froms:?}");
    assert!(froms.last().unwrap().starts_with("FROM debian:bookworm-slim"), "the runtime stage: {froms:?}");
    assert!(
        dockerfile.contains("cargo build --release") && dockerfile.contains("-p sluice-cli"),
        "the Dockerfile must build sluice-cli in release mode"
    );
    assert!(dockerfile.contains("target/release/sluice"), "the Dockerfile must take the `sluice` binary");
    assert!(dockerfile.contains("ENTRYPOINT [\"sluice\"]"), "the image must run `sluice`");
    // The binary is the `sluice` bin target of sluice-cli.
    let cli = read(&root.join("cli/Cargo.toml"));
    assert!(cli.contains("name = \"sluice-cli\"") && cli.contains("[[bin]]\nname = \"sluice\""), "cli/Cargo.toml");

    let ignore = read(&root.join(".dockerignore"));
    for dir in ["target", ".state"] {
        assert!(
            ignore.lines().any(|l| l.trim().trim_start_matches('/').trim_end_matches('/') == dir),
            ".dockerignore must leave out {dir}/"
        );
    }
}
