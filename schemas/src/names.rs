//! Names of exchanges, queues, topics and registry subjects. One place, so the
//! edge, the consumers, the CLI and the tests can never disagree.

/// The one exchange every command is published to (direct).
pub const COMMAND_EXCHANGE: &str = "sluice.commands";

/// Routing key of a tenant's commands for one bounded context.
pub fn routing_key(tenant: &str, context: &str) -> String {
    format!("{tenant}.{context}")
}

/// The quorum work queue of a tenant's context.
pub fn command_queue(tenant: &str, context: &str) -> String {
    format!("{tenant}.{context}.commands")
}

/// Where commands go when they cannot be processed, with the reason in headers.
pub fn dead_letter_queue(tenant: &str, context: &str) -> String {
    format!("{}.dlq", command_queue(tenant, context))
}

/// The Kafka topic holding a tenant's domain events of one context.
pub fn events_topic(tenant: &str, context: &str) -> String {
    format!("{tenant}.{context}.events")
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
        assert_eq!(command_queue("acme", "orders"), "acme.orders.commands");
        assert_eq!(dead_letter_queue("acme", "orders"), "acme.orders.commands.dlq");
        assert_eq!(events_topic("acme", "orders"), "acme.orders.events");
        assert_eq!(
            event_subject("acme.orders.events", "com.example.orders.OrderSubmitted"),
            "acme.orders.events-com.example.orders.OrderSubmitted"
        );
    }
}
