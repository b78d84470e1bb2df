//! Layered configuration: built-in defaults, then a TOML file, then `SLUICE_*`
//! environment variables (`SLUICE_INGEST__HTTP_ADDR`, or the short aliases
//! below). Unknown fields are refused, and every invalid field is reported.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use sluice_ingest::auth::TenantConfig;
use sluice_ingest::IngestConfig;
use sluice_processors::amqp::{Broker, Brokers};
use sluice_processors::ProcessorConfig;
use sluice_projections::ProjectorConfig;
use sluice_streams::clusters::{Cluster, Clusters};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub processor: ProcessorConfig,
    #[serde(default)]
    pub projector: ProjectorConfig,
    #[serde(default)]
    pub amqp: AmqpSettings,
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub registry: RegistrySettings,
    #[serde(default)]
    pub cql: CqlSettings,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub traces: TracesSettings,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesSettings {
    /// An OTLP/HTTP collector (`http://127.0.0.1:4318`): the serving roles
    /// export their spans to `<endpoint>/v1/traces` as JSON. Unset: none.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// The admin address: where every role of this process serves
    /// `GET /metrics` (Prometheus), apart from the public edge, whose
    /// metrics carry tenant labels. Keep it on loopback or an internal
    /// network. Unset: not served.
    pub addr: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Partitions of each tenant's context commands (default 6): work
    /// queues `<tenant>.<context>.commands.<p>`, each with one owning
    /// processor at a time. The edge and every processor must agree;
    /// changing it re-routes streams, so drain the queues first.
    pub partitions: u16,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self { url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(), partitions: 6 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Replicas of each topic sluice creates (events, dead letters, relay
    /// positions). Default 1 (one dev broker); 3 in production.
    pub replication_factor: i32,
    /// `min.insync.replicas` of those topics. Default 1; 2 in production
    /// (with `acks=all`, a write survives one lost broker).
    pub min_insync_replicas: i32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self { brokers: "127.0.0.1:9092".into(), replication_factor: 1, min_insync_replicas: 1 }
    }
}

impl KafkaSettings {
    pub fn replication(&self) -> sluice_processors::kafka::Replication {
        sluice_processors::kafka::Replication { factor: self.replication_factor, min_insync: self.min_insync_replicas }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Confluent-compatible base URL, no trailing slash.
    pub url: String,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self { url: "http://127.0.0.1:8081/apis/ccompat/v7".into() }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CqlSettings {
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Used only when the keyspace does not exist yet (SimpleStrategy).
    pub replication_factor: u32,
}

impl Default for CqlSettings {
    fn default() -> Self {
        Self { nodes: vec!["127.0.0.1:9042".into()], keyspace: "sluice".into(), replication_factor: 1 }
    }
}

/// Short environment names for the settings people change most.
pub const ALIASES: &[(&str, &str)] = &[
    ("HTTP_ADDR", "ingest.http_addr"),
    ("AMQP_URL", "amqp.url"),
    ("KAFKA_BROKERS", "kafka.brokers"),
    ("REGISTRY_URL", "registry.url"),
    ("CQL_KEYSPACE", "cql.keyspace"),
    ("OTLP_ENDPOINT", "traces.otlp_endpoint"),
];

impl Settings {
    /// Defaults ← `file` (if given) ← environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, String> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(format!("config file {} does not exist", file.display()));
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only nested names (`A__B`) and the aliases are ours: the stack
        // scripts' SLUICE_*_PORT variables share the prefix.
        let env = Env::prefixed("SLUICE_")
            .filter(|key| {
                key.as_str().contains("__") || ALIASES.iter().any(|(a, _)| key.as_str().eq_ignore_ascii_case(a))
            })
            .map(|key| {
                ALIASES
                    .iter()
                    .find(|(a, _)| key.as_str().eq_ignore_ascii_case(a))
                    .map(|(_, path)| (*path).into())
                    .unwrap_or_else(|| key.as_str().replace("__", ".").into())
            });
        figment = figment.merge(env);
        let settings = figment.extract::<Settings>().map_err(|errors| {
            let lines: Vec<String> = errors.into_iter().map(|e| format!("  - {e}")).collect();
            format!("invalid configuration:\n{}", lines.join("\n"))
        })?;
        let mut settings = settings;
        let mut problems = sluice_ingest::auth::validate_tenants(&settings.tenants);
        problems.extend(settings.resolve_amqp_urls(&|name| std::env::var(name).ok()));
        if !problems.is_empty() {
            let lines: Vec<String> = problems.into_iter().map(|p| format!("  - {p}")).collect();
            return Err(format!("invalid configuration:\n{}", lines.join("\n")));
        }
        Ok(settings)
    }

    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants.iter().map(|t| t.name.clone()).collect()
    }

    /// The AMQP URL of `tenant`: its own, else `amqp.url`.
    pub fn amqp_url_for(&self, tenant: &str) -> &str {
        self.tenants.iter().find(|t| t.name == tenant).and_then(|t| t.amqp_url.as_deref()).unwrap_or(&self.amqp.url)
    }

    /// The distinct AMQP connections and the tenants on each, the default
    /// connection first (with every tenant that names no URL of its own, or
    /// the same one). A connection no tenant uses is not listed.
    pub fn amqp_connections(&self) -> Brokers {
        Brokers::new(
            self.group_tenants(&self.amqp.url, |t| t.amqp_url.as_deref())
                .into_iter()
                .map(|(url, tenants)| Broker { url, tenants })
                .collect(),
        )
    }

    /// The brokers of `tenant`'s Kafka cluster: its own, else `kafka.brokers`.
    pub fn kafka_brokers_for(&self, tenant: &str) -> &str {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.kafka_brokers.as_deref())
            .unwrap_or(&self.kafka.brokers)
    }

    /// The distinct Kafka clusters and the tenants on each, the default
    /// cluster first (as [`Settings::amqp_connections`]).
    pub fn kafka_clusters(&self) -> Clusters {
        Clusters::new(
            self.group_tenants(&self.kafka.brokers, |t| t.kafka_brokers.as_deref())
                .into_iter()
                .map(|(brokers, tenants)| Cluster { brokers, tenants })
                .collect(),
        )
    }

    /// Tenants grouped by the address `own` names (else `default`), the
    /// default's group first; groups without tenants left out.
    fn group_tenants(&self, default: &str, own: impl Fn(&TenantConfig) -> Option<&str>) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = vec![(default.to_owned(), vec![])];
        for tenant in &self.tenants {
            let address = own(tenant).unwrap_or(default);
            match groups.iter_mut().find(|(a, _)| a == address) {
                Some((_, tenants)) => tenants.push(tenant.name.clone()),
                None => groups.push((address.to_owned(), vec![tenant.name.clone()])),
            }
        }
        groups.retain(|(_, tenants)| !tenants.is_empty());
        groups
    }

    /// Expands `${NAME}` in every AMQP URL from `env`, then checks the URLs:
    /// each parses as `amqp://` or `amqps://`, and two URLs that reach the
    /// same broker and vhost use the same user (one vhost, one set of
    /// credentials: a second user there is a copy-paste mistake, or a
    /// tenant given another's vhost). Returns the problems, each naming
    /// its tenant.
    fn resolve_amqp_urls(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let mut problems = Vec::new();
        match expand(&self.amqp.url, env) {
            Ok(url) => self.amqp.url = url,
            Err(name) => problems.push(format!("amqp.url: ${{{name}}} is not set in the environment")),
        }
        for tenant in &mut self.tenants {
            let name = tenant.name.clone();
            for (field, value) in [("amqp_url", &mut tenant.amqp_url), ("kafka_brokers", &mut tenant.kafka_brokers)] {
                let Some(value) = value.as_mut() else { continue };
                match expand(value, env) {
                    Ok(expanded) => *value = expanded,
                    Err(var) => problems.push(format!(
                        "tenants ({name:?}): {field} names ${{{var}}}, which is not set in the environment"
                    )),
                }
            }
        }
        // (broker and vhost) → (user, who uses it first)
        let mut users: std::collections::HashMap<String, (String, String)> = std::collections::HashMap::new();
        let named = std::iter::once(("amqp.url".to_owned(), self.amqp.url.clone())).chain(
            self.tenants
                .iter()
                .filter_map(|t| t.amqp_url.clone().map(|url| (format!("tenants ({:?}): amqp_url", t.name), url))),
        );
        for (who, url) in named.filter(|(_, url)| !url.contains("${")) {
            let parsed = match reqwest::Url::parse(&url) {
                Ok(parsed) if matches!(parsed.scheme(), "amqp" | "amqps") => parsed,
                Ok(parsed) => {
                    problems.push(format!("{who}: an AMQP URL starts amqp:// or amqps://, not {}://", parsed.scheme()));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("{who}: not a URL ({e})"));
                    continue;
                }
            };
            let vhost = match parsed.path().trim_start_matches('/') {
                "" => "/".to_owned(),
                v => v.to_owned(),
            };
            let place = format!(
                "{}:{}/{vhost}",
                parsed.host_str().unwrap_or_default(),
                parsed.port().unwrap_or(if parsed.scheme() == "amqps" { 5671 } else { 5672 })
            );
            let user = parsed.username().to_owned();
            match users.get(&place) {
                Some((first_user, first)) if *first_user != user => problems.push(format!(
                    "{who}: reaches {place} as user {user:?}, but {first} reaches it as {first_user:?}: \
                     tenants that share a vhost share its URL; give a tenant of its own a vhost of its own"
                )),
                Some(_) => {}
                None => {
                    users.insert(place, (user, who));
                }
            }
        }
        problems
    }
}

/// `text` with every `${NAME}` replaced by `env(NAME)`, and every
/// `${NAME:-default}` by `env(NAME)` or else `default` (as in a shell);
/// the first name that is not set and has no default is the error.
pub fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(end) = rest[start..].find('}') else { break };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        let value = env(name).filter(|v| !v.is_empty()).or(default.map(str::to_owned));
        out.push_str(&rest[..start]);
        out.push_str(&value.ok_or_else(|| name.to_owned())?);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tenants(urls: &[(&str, Option<&str>)]) -> Settings {
        let mut settings = Settings::load(None).expect("defaults load");
        settings.tenants = urls
            .iter()
            .map(|(name, url)| TenantConfig {
                name: (*name).into(),
                sources: vec![format!("/{name}/")],
                keys: vec![],
                amqp_url: url.map(str::to_owned),
                kafka_brokers: None,
            })
            .collect();
        settings
    }

    #[test]
    fn tenants_are_grouped_by_connection_default_first() {
        let own = "amqp://globex:pw@127.0.0.1:5672/globex";
        let settings = with_tenants(&[
            ("acme", None),
            ("globex", Some(own)),
            ("initech", Some("amqp://guest:guest@127.0.0.1:5672/%2f")),
        ]);
        assert_eq!(settings.amqp_url_for("globex"), own);
        assert_eq!(settings.amqp_url_for("acme"), settings.amqp.url);
        assert_eq!(
            settings.amqp_connections().connections(),
            [
                Broker { url: settings.amqp.url.clone(), tenants: vec!["acme".into(), "initech".into()] },
                Broker { url: own.into(), tenants: vec!["globex".into()] },
            ]
        );
        let mut settings = with_tenants(&[("acme", None), ("globex", None)]);
        settings.tenants[1].kafka_brokers = Some("kafka-globex:9092".into());
        assert_eq!(settings.kafka_brokers_for("globex"), "kafka-globex:9092");
        assert_eq!(settings.kafka_brokers_for("acme"), settings.kafka.brokers);
        assert_eq!(
            settings.kafka_clusters().iter().map(|c| c.tenants.clone()).collect::<Vec<_>>(),
            [["acme"], ["globex"]]
        );
        // No tenant on the default connection: it is not listed.
        let settings = with_tenants(&[("globex", Some(own))]);
        assert_eq!(
            settings.amqp_connections().connections(),
            [Broker { url: own.into(), tenants: vec!["globex".into()] }]
        );
    }

    #[test]
    fn urls_take_secrets_from_the_environment_and_one_vhost_has_one_user() {
        let env = |name: &str| (name == "GLOBEX_PW").then(|| "s3cret".to_owned());
        let mut settings = with_tenants(&[("globex", Some("amqp://globex:${GLOBEX_PW}@mq:5672/globex"))]);
        assert!(settings.resolve_amqp_urls(&env).is_empty());
        assert_eq!(settings.amqp_url_for("globex"), "amqp://globex:s3cret@mq:5672/globex");
        assert_eq!(expand("amqp://${HOST:-127.0.0.1:5672}/v", &env).unwrap(), "amqp://127.0.0.1:5672/v");
        assert_eq!(expand("${GLOBEX_PW:-x}", &env).unwrap(), "s3cret");

        let mut settings = with_tenants(&[
            ("globex", Some("amqp://globex:${MISSING}@mq/globex")),
            ("initech", Some("http://mq/initech")),
            ("hooli", Some("amqp://hooli:pw@127.0.0.1:5672/%2f")),
            ("umbrella", Some("amqp://a:pw@mq:5672/shared")),
            ("soylent", Some("amqp://a:pw@mq:5672/shared")),
        ]);
        let problems = settings.resolve_amqp_urls(&env);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("\"globex\"") && problems[0].contains("${MISSING}"), "{}", problems[0]);
        assert!(problems[1].contains("\"initech\"") && problems[1].contains("not http://"), "{}", problems[1]);
        // hooli reaches the default vhost as another user than amqp.url.
        assert!(problems[2].contains("\"hooli\"") && problems[2].contains("\"guest\""), "{}", problems[2]);
    }
}
