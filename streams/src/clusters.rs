//! Which Kafka cluster holds each tenant's topics: the default brokers, or
//! the ones a tenant names (`kafka_brokers` in its configuration). Every
//! consumer of events runs once per cluster, over that cluster's tenants'
//! topics; every producer writes to its tenant's cluster.

/// One cluster and the tenants whose topics it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `host:port,...` (bootstrap servers).
    pub brokers: String,
    pub tenants: Vec<String>,
}

/// Every cluster in use; each tenant is on exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clusters(Vec<Cluster>);

impl Clusters {
    pub fn new(clusters: Vec<Cluster>) -> Self {
        Self(clusters)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cluster> {
        self.0.iter()
    }

    /// The brokers of `tenant`'s cluster.
    pub fn brokers_for(&self, tenant: &str) -> Option<&str> {
        self.0.iter().find(|c| c.tenants.iter().any(|t| t == tenant)).map(|c| c.brokers.as_str())
    }

    /// The clusters that hold any of `tenants`, each with only those of
    /// `tenants` that are on it (clusters none of them is on are left out).
    pub fn of(&self, tenants: &[String]) -> Vec<Cluster> {
        self.0
            .iter()
            .map(|c| Cluster {
                brokers: c.brokers.clone(),
                tenants: c.tenants.iter().filter(|t| tenants.contains(t)).cloned().collect(),
            })
            .filter(|c| !c.tenants.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_find_their_cluster_and_subsets_keep_only_theirs() {
        let clusters = Clusters::new(vec![
            Cluster { brokers: "a:9092".into(), tenants: vec!["acme".into(), "initech".into()] },
            Cluster { brokers: "b:9092".into(), tenants: vec!["globex".into()] },
        ]);
        assert_eq!(clusters.brokers_for("globex"), Some("b:9092"));
        assert_eq!(clusters.brokers_for("hooli"), None);
        assert_eq!(
            clusters.of(&["initech".into()]),
            [Cluster { brokers: "a:9092".into(), tenants: vec!["initech".into()] }]
        );
        assert_eq!(clusters.of(&["acme".into(), "globex".into()]).len(), 2);
    }
}
