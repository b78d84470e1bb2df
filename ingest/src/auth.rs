//! Bearer API keys. Configuration holds only SHA-256 hashes of the keys; a
//! presented key is hashed and compared against every stored hash in constant
//! time, so neither timing nor logs reveal keys.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One API key of a tenant and what it may send.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Hex SHA-256 of the key (`sluice keys hash` or `sha256sum`).
    pub sha256: String,
    /// Command types this key may send; empty = all of the tenant's.
    #[serde(default)]
    pub commands: Vec<String>,
    /// A label for logs and audit (never the key).
    #[serde(default)]
    pub name: String,
}

/// A tenant: its sources, keys and, if it has one, its own broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Source prefixes the tenant may send as (`/acme/`).
    pub sources: Vec<String>,
    pub keys: Vec<KeyConfig>,
    /// The tenant's own RabbitMQ: a broker, or a vhost with its own user
    /// (`amqp://globex:${GLOBEX_AMQP_PASSWORD}@mq:5672/globex`; `${NAME}` is
    /// read from the environment when the configuration loads). Its
    /// commands, retries and dead letters live there. Unset: `amqp.url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// The tenant's own Kafka cluster (`host:port,...`): its events topics,
    /// their dead-letter topics and its relay positions live there, and
    /// every consumer of events reads them there. Unset: `kafka.brokers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_brokers: Option<String>,
}

/// What a configuration's tenants must satisfy, every problem named by its
/// entry: names `[a-z][a-z0-9-]{0,39}` (they become parts of queue, topic and
/// group names, which are read back by their structure: a dot would make
/// `acme.eu` read as `acme`), unique names, source prefixes that start and
/// end with `/` (so `/acme` cannot also cover `/acmecorp/…`) and that no two
/// tenants share or nest, and key hashes unique across all tenants.
pub fn validate_tenants(tenants: &[TenantConfig]) -> Vec<String> {
    let mut problems = Vec::new();
    let valid_name = |n: &str| {
        let mut bytes = n.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z'))
            && n.len() <= 40
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let mut names = std::collections::HashSet::new();
    let mut hashes: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, tenant) in tenants.iter().enumerate() {
        let entry = format!("tenants[{i}] ({:?})", tenant.name);
        if !valid_name(&tenant.name) {
            problems.push(format!(
                "{entry}: a tenant name is 1 to 40 of a-z, 0-9 and '-', starting with a letter (no dots)"
            ));
        }
        if !names.insert(tenant.name.as_str()) {
            problems.push(format!("{entry}: the name is used by an earlier tenant"));
        }
        for prefix in &tenant.sources {
            if !(prefix.starts_with('/') && prefix.ends_with('/') && prefix.len() > 1) {
                problems.push(format!("{entry}: source prefix {prefix:?} must start and end with '/'"));
            }
        }
        for key in &tenant.keys {
            let hash = key.sha256.to_ascii_lowercase();
            if let Some(other) = hashes.insert(hash, tenant.name.clone()) {
                problems.push(format!("{entry}: key {:?} has the same hash as a key of tenant {other:?}", key.name));
            }
        }
    }
    for (i, a) in tenants.iter().enumerate() {
        for b in &tenants[i + 1..] {
            for pa in &a.sources {
                for pb in b.sources.iter().filter(|pb| pa.starts_with(pb.as_str()) || pb.starts_with(pa.as_str())) {
                    problems.push(format!(
                        "tenants {:?} and {:?}: source prefixes {pa:?} and {pb:?} overlap (a source must name one tenant)",
                        a.name, b.name
                    ));
                }
            }
        }
    }
    problems
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub key_name: String,
    /// Position of the key among all keys: the rate limiter's bucket index,
    /// stable for the life of the process.
    key_index: usize,
    sources: Vec<String>,
    commands: Vec<String>,
}

impl Caller {
    pub fn may_send_as(&self, source: &str) -> bool {
        self.sources.iter().any(|prefix| source.starts_with(prefix.as_str()))
    }

    pub fn may_send(&self, command_type: &str) -> bool {
        self.commands.is_empty() || self.commands.iter().any(|c| c == command_type)
    }

    pub fn key_index(&self) -> usize {
        self.key_index
    }
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

struct StoredKey {
    hash: [u8; 32],
    caller: Caller,
}

pub struct Keys {
    keys: Vec<StoredKey>,
}

impl Keys {
    pub fn new(tenants: &[TenantConfig]) -> Result<Self, String> {
        let mut keys = Vec::new();
        for tenant in tenants {
            for (i, key) in tenant.keys.iter().enumerate() {
                let bytes = hex::decode(&key.sha256)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("tenants.{}.keys[{i}].sha256 is not 64 hex digits", tenant.name))?;
                let key_index = keys.len();
                keys.push(StoredKey {
                    hash: bytes,
                    caller: Caller {
                        tenant: tenant.name.clone(),
                        key_index,
                        key_name: if key.name.is_empty() { format!("{}#{i}", tenant.name) } else { key.name.clone() },
                        sources: tenant.sources.clone(),
                        commands: key.commands.clone(),
                    },
                });
            }
        }
        Ok(Self { keys })
    }

    /// How many keys there are; [`Caller::key_index`] is below this.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller a presented key belongs to. Every stored hash is compared,
    /// in constant time, whatever matches first.
    pub fn authenticate(&self, presented: &str) -> Option<&Caller> {
        let hash = hash_key(presented);
        let mut found = None;
        for stored in &self.keys {
            if constant_time_eq(&stored.hash, &hash) {
                found = Some(&stored.caller);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants() -> Vec<TenantConfig> {
        vec![TenantConfig {
            name: "acme".into(),
            sources: vec!["/acme/".into()],
            keys: vec![KeyConfig {
                sha256: hex::encode(hash_key("secret")),
                commands: vec!["a.B".into()],
                name: "k".into(),
            }],
            amqp_url: None,
            kafka_brokers: None,
        }]
    }

    #[test]
    fn finds_the_tenant_of_a_key() {
        let keys = Keys::new(&tenants()).unwrap();
        let caller = keys.authenticate("secret").unwrap();
        assert_eq!(caller.tenant, "acme");
        assert!(caller.may_send_as("/acme/shop"));
        assert!(!caller.may_send_as("/globex/shop"));
        assert!(caller.may_send("a.B") && !caller.may_send("a.C"));
        assert!(keys.authenticate("wrong").is_none());
    }

    fn tenant_config(name: &str, prefix: &str, key: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            sources: vec![prefix.into()],
            keys: vec![KeyConfig { sha256: hex::encode(hash_key(key)), commands: vec![], name: format!("{name}-k") }],
            amqp_url: None,
            kafka_brokers: None,
        }
    }

    #[test]
    fn tenant_names_prefixes_and_keys_are_checked_and_each_problem_names_its_entry() {
        let good = [tenant_config("acme", "/acme/", "a"), tenant_config("globex-2", "/globex/", "b")];
        assert!(validate_tenants(&good).is_empty());
        let cases: &[(&[TenantConfig], &str)] = &[
            (&[tenant_config("acme.eu", "/acme-eu/", "a")], "tenants[0] (\"acme.eu\"): a tenant name"),
            (&[tenant_config("Acme", "/acme/", "a")], "a tenant name is 1 to 40"),
            (
                &[tenant_config("acme", "/acme/", "a"), tenant_config("acme", "/other/", "b")],
                "used by an earlier tenant",
            ),
            (&[tenant_config("acme", "/acme", "a")], "must start and end with '/'"),
            (
                &[tenant_config("acme", "/acme/", "a"), tenant_config("globex", "/globex/", "a")],
                "same hash as a key of tenant \"acme\"",
            ),
            (&[tenant_config("acme", "/shop/", "a"), tenant_config("globex", "/shop/eu/", "b")], "overlap"),
        ];
        for (tenants, expected) in cases {
            let problems = validate_tenants(tenants);
            assert!(problems.iter().any(|p| p.contains(expected)), "{expected:?} in {problems:?}");
        }
    }
}
