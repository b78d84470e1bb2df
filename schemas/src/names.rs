//! Names of exchanges, queues, topics and registry subjects. One place, so the
//! edge, the consumers, the CLI and the tests can never disagree.

/// The one exchange every command is published to (direct).
pub const COMMAND_EXCHANGE: &str = "sluice.commands";

/// Routing key of one partition of a tenant's commands for a bounded context.
pub fn routing_key(tenant: &str, context: &str, partition: u16) -> String {
    format!("{tenant}.{context}.{partition}")
}

/// The quorum work queue of one partition of a tenant's context.
pub fn command_queue(tenant: &str, context: &str, partition: u16) -> String {
    format!("{tenant}.{context}.commands.{partition}")
}

/// Where commands go when they cannot be processed, with the reason in
/// headers: one per context, whatever the partition.
pub fn dead_letter_queue(tenant: &str, context: &str) -> String {
    format!("{tenant}.{context}.commands.dlq")
}

/// The partition (0…`partitions`-1) of a stream's commands: FNV-1a (64 bit)
/// of tenant and stream key, modulo the partition count. Stable across
/// processes, versions and machines: the edge, the processors, the process
/// managers and the ops tools must all agree.
pub fn command_partition(tenant: &str, stream_key: &str, partitions: u16) -> u16 {
    let hash = stable_hash(tenant.bytes().chain(std::iter::once(0x1f)).chain(stream_key.bytes()));
    // u16 partitions: the remainder always fits.
    (hash % u64::from(partitions.max(1))) as u16
}

/// FNV-1a, 64 bit: the same value in every process, version and machine.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.into_iter().fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The sources the platform's process managers send their commands as:
/// reserved, so no client can send a (source, id) a process step will use.
pub fn process_source_prefix(tenant: &str) -> String {
    format!("/{tenant}/processes/")
}

/// Whether `source` lies in the tenant's reserved process namespace
/// (without building the prefix: the edge asks for every command).
pub fn is_process_source(tenant: &str, source: &str) -> bool {
    source
        .strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(tenant))
        .is_some_and(|rest| rest.starts_with("/processes/"))
}

/// The CloudEvent `source` of one process manager's commands.
pub fn process_source(tenant: &str, process: &str) -> String {
    format!("{}{process}", process_source_prefix(tenant))
}

/// The Kafka topic holding a tenant's domain events of one context.
pub fn events_topic(tenant: &str, context: &str) -> String {
    format!("{tenant}.{context}.events")
}

/// Tenant and context of an events topic, read by its structure
/// (`<tenant>.<context>.events`: the context is the segment before
/// `.events`), never by splitting at the first dot.
pub fn parse_events_topic(topic: &str) -> Option<(&str, &str)> {
    let (tenant, context) = topic.strip_suffix(".events")?.rsplit_once('.')?;
    (!tenant.is_empty() && !context.is_empty()).then_some((tenant, context))
}

/// Registry subject under TopicRecordNameStrategy: each event type of a topic
/// evolves on its own.
pub fn event_subject(topic: &str, record_full_name: &str) -> String {
    format!("{topic}-{record_full_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(command_queue("acme", "orders", 3), "acme.orders.commands.3");
        assert_eq!(routing_key("acme", "orders", 3), "acme.orders.3");
        assert_eq!(dead_letter_queue("acme", "orders"), "acme.orders.commands.dlq");
        assert_eq!(events_topic("acme", "orders"), "acme.orders.events");
        assert_eq!(
            event_subject("acme.orders.events", "com.example.orders.OrderSubmitted"),
            "acme.orders.events-com.example.orders.OrderSubmitted"
        );
    }

    #[test]
    fn process_sources_are_recognised_without_building_them() {
        assert!(is_process_source("acme", &process_source("acme", "onboarding")));
        assert!(!is_process_source("acme", "/acme/shop"));
        assert!(!is_process_source("acme", "/acmeco/processes/x"));
        assert!(!is_process_source("acme", "/globex/processes/onboarding"));
    }

    #[test]
    fn events_topics_are_read_by_their_structure() {
        assert_eq!(parse_events_topic("acme.orders.events"), Some(("acme", "orders")));
        assert_eq!(parse_events_topic("acme.eu.patients.events"), Some(("acme.eu", "patients")));
        assert_eq!(parse_events_topic("acme.orders.events.onboarding.dlt"), None);
        assert_eq!(parse_events_topic(".orders.events"), None);
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a change here re-routes every stream in flight.
        assert_eq!(command_partition("acme", "o1", 6), command_partition("acme", "o1", 6));
        assert_eq!(command_partition("acme", "o1", 1), 0);
        let pinned: Vec<u16> = ["o1", "o2", "o3", "o4"].iter().map(|k| command_partition("acme", k, 6)).collect();
        assert_eq!(pinned, PINNED);
        let mut counts = [0u32; 6];
        for i in 0..6_000 {
            counts[usize::from(command_partition("acme", &format!("order-{i}"), 6))] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1_200).contains(&c)), "{counts:?}");
        assert_ne!(command_partition("acme", "o1", 1 << 15), command_partition("globex", "o1", 1 << 15));
    }
    const PINNED: [u16; 4] = [2, 5, 4, 5];
}
