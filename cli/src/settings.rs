//! Layered configuration: built-in defaults, then a TOML file, then `SLUICE_*`
//! environment variables (`SLUICE_INGEST__HTTP_ADDR`, or the short aliases
//! below). Unknown fields are refused, and every invalid field is reported.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use sluice_ingest::auth::TenantConfig;
use sluice_ingest::IngestConfig;
use sluice_processors::ProcessorConfig;
use sluice_projections::ProjectorConfig;

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
        let problems = sluice_ingest::auth::validate_tenants(&settings.tenants);
        if !problems.is_empty() {
            let lines: Vec<String> = problems.into_iter().map(|p| format!("  - {p}")).collect();
            return Err(format!("invalid configuration:\n{}", lines.join("\n")));
        }
        Ok(settings)
    }

    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants.iter().map(|t| t.name.clone()).collect()
    }
}
