//! Hanging transactions: a partition holding records of a transaction that
//! its coordinator no longer counts as open there.
//!
//! A transaction's coordinator writes its commit or abort marker to every
//! partition it knows the transaction wrote to. If it forgets one (seen
//! after a Kafka restart: the coordinator aborted a relay's transaction
//! on every partition but one), that partition's last stable offset stays
//! at the transaction's first record for ever, and every `read_committed`
//! reader of the partition (the projector, the process managers, a data
//! team's consumer) stops there, whoever wrote the records after it.
//! Nothing in the producer can end it: `init_transactions` only ends what
//! the coordinator knows.
//!
//! What ends it is what Kafka's own `kafka-transactions.sh abort` does
//! (KIP-664): a marker written to the partition directly. The requests
//! involved are not in librdkafka, so this module speaks them itself.
//! [`find_hanging`] runs when a relay has just fenced its predecessors
//! (`init_transactions` returned) or aborted its own transaction: then no
//! transaction of the relay's producer at an older epoch can still be open
//! anywhere, so one found open on a partition is hanging by definition, and
//! ending it takes nothing from a live transaction. Whether it ends in a
//! commit or an abort is the relay's call ([`crate::kafka`]): its records
//! say which journal entries they carry, and the relay position committed
//! with the transaction says whether the coordinator committed it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::write_txn_markers_request::{WritableTxnMarker, WritableTxnMarkerTopic};
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeTransactionsRequest, FindCoordinatorRequest, ProducerId, RequestHeader,
    ResponseHeader, TopicName, TransactionalId, WriteTxnMarkersRequest,
};
use kafka_protocol::protocol::{encode_request_header_into_buffer, Decodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to one broker, requests answered in order.
pub struct Broker {
    stream: TcpStream,
    correlation: i32,
}

impl Broker {
    pub async fn connect(address: &str) -> Result<Self, String> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting to {address} timed out"))?
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        Ok(Self { stream, correlation: 0 })
    }

    /// Sends `request` at `version` and reads its response.
    pub async fn send<R: Request>(&mut self, request: R, version: i16) -> Result<R::Response, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request, version))
            .await
            .map_err(|_| format!("request {} timed out", R::KEY))?
    }

    async fn exchange<R: Request>(&mut self, request: R, version: i16) -> Result<R::Response, String> {
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("sluice")));
        let mut frame = BytesMut::new();
        frame.put_i32(0);
        encode_request_header_into_buffer(&mut frame, &header).map_err(|e| e.to_string())?;
        request.encode(&mut frame, version).map_err(|e| e.to_string())?;
        let length = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&length.to_be_bytes());
        let io = |e: std::io::Error| format!("request {}: {e}", R::KEY);
        self.stream.write_all(&frame).await.map_err(io)?;
        let length = self.stream.read_i32().await.map_err(io)?;
        let mut body = vec![0; length.max(0) as usize];
        self.stream.read_exact(&mut body).await.map_err(io)?;
        let mut body = bytes::Bytes::from(body);
        let header =
            ResponseHeader::decode(&mut body, R::Response::header_version(version)).map_err(|e| e.to_string())?;
        if header.correlation_id != self.correlation {
            return Err(format!("response {} answers another request", header.correlation_id));
        }
        let response = R::Response::decode(&mut body, version).map_err(|e| e.to_string())?;
        if body.has_remaining() {
            return Err(format!("response to request {} has {} bytes left over", R::KEY, body.remaining()));
        }
        Ok(response)
    }
}

/// `Err` with the name of a Kafka error code, `Ok` for no error.
fn kafka_code(code: i16, what: &str) -> Result<(), String> {
    match code.err() {
        None => Ok(()),
        Some(error) => Err(format!("{what}: {error:?}")),
    }
}

/// What a transactional id's coordinator says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionState {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Kafka's name: `Empty`, `Ongoing`, `PrepareCommit`, `CompleteAbort`, ...
    pub state: String,
}

/// Asks the coordinator of `transactional_id` for its state (`brokers`: a
/// bootstrap list; the coordinator is found through the first that answers).
pub async fn describe_transaction(brokers: &str, transactional_id: &str) -> Result<TransactionState, String> {
    let mut any = connect_any(brokers).await?;
    let found = any
        .send(
            FindCoordinatorRequest::default()
                .with_key_type(1)
                .with_coordinator_keys(vec![StrBytes::from_string(transactional_id.to_owned())]),
            4,
        )
        .await?;
    let coordinator = found.coordinators.first().ok_or("no transaction coordinator in the answer")?;
    kafka_code(coordinator.error_code, "finding the transaction coordinator")?;
    let mut coordinator = Broker::connect(&format!("{}:{}", coordinator.host, coordinator.port)).await?;
    let described = coordinator
        .send(
            DescribeTransactionsRequest::default()
                .with_transactional_ids(vec![TransactionalId(StrBytes::from_string(transactional_id.to_owned()))]),
            0,
        )
        .await?;
    let state = described.transaction_states.first().ok_or("no transaction state in the answer")?;
    kafka_code(state.error_code, "describing the transaction")?;
    Ok(TransactionState {
        producer_id: state.producer_id.0,
        producer_epoch: state.producer_epoch,
        state: state.transaction_state.to_string(),
    })
}

async fn connect_any(brokers: &str) -> Result<Broker, String> {
    let mut last = "no broker given".to_owned();
    for address in brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match Broker::connect(address).await {
            Ok(broker) => return Ok(broker),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A transaction open on a partition that its coordinator no longer counts
/// as open there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hanging {
    pub partition: i32,
    /// The partition leader's address.
    pub leader: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub coordinator_epoch: i32,
    /// The offset of its first record: the partition's last stable offset
    /// until it ends.
    pub first_offset: i64,
}

/// The transactions of `transactional_id`'s producer that are open on a
/// partition of `topic` although its coordinator has moved that producer to
/// a newer epoch with no transaction open. `leaders` maps each partition of
/// the topic to its leader's address. Meaningful only right after
/// `init_transactions` (or an abort) of that id returned, before the next
/// transaction begins.
pub async fn find_hanging(
    brokers: &str,
    transactional_id: &str,
    topic: &str,
    leaders: &BTreeMap<i32, String>,
) -> Result<Vec<Hanging>, String> {
    let current = describe_transaction(brokers, transactional_id).await?;
    if !matches!(current.state.as_str(), "Empty" | "CompleteCommit" | "CompleteAbort") {
        // A transaction of a newer owner (this one is fenced) or one still
        // being ended: nothing here can be told apart from a live one.
        return Ok(Vec::new());
    }
    let mut by_leader: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (partition, leader) in leaders {
        by_leader.entry(leader.as_str()).or_default().push(*partition);
    }
    let mut hanging = Vec::new();
    for (leader, partitions) in by_leader {
        let described = Broker::connect(leader)
            .await?
            .send(
                DescribeProducersRequest::default().with_topics(vec![TopicRequest::default()
                    .with_name(topic_name(topic))
                    .with_partition_indexes(partitions)]),
                0,
            )
            .await?;
        for partition in described.topics.iter().flat_map(|t| &t.partitions) {
            kafka_code(
                partition.error_code,
                &format!("describing the producers of {topic}/{}", partition.partition_index),
            )?;
            for producer in &partition.active_producers {
                let older = i64::from(producer.producer_epoch) < i64::from(current.producer_epoch);
                if producer.producer_id.0 == current.producer_id && older && producer.current_txn_start_offset >= 0 {
                    hanging.push(Hanging {
                        partition: partition.partition_index,
                        leader: leader.to_owned(),
                        producer_id: producer.producer_id.0,
                        producer_epoch: producer.producer_epoch as i16,
                        coordinator_epoch: producer.coordinator_epoch,
                        first_offset: producer.current_txn_start_offset,
                    });
                }
            }
        }
    }
    Ok(hanging)
}

/// Ends a hanging transaction on its partition: its records become visible
/// (`commit`) or are dropped, as a coordinator's marker would have done.
pub async fn end(topic: &str, hanging: &Hanging, commit: bool) -> Result<(), String> {
    let marker = WritableTxnMarker::default()
        .with_producer_id(ProducerId(hanging.producer_id))
        .with_producer_epoch(hanging.producer_epoch)
        .with_transaction_result(commit)
        .with_coordinator_epoch(hanging.coordinator_epoch.max(0))
        .with_topics(vec![WritableTxnMarkerTopic::default()
            .with_name(topic_name(topic))
            .with_partition_indexes(vec![hanging.partition])]);
    let written = Broker::connect(&hanging.leader)
        .await?
        .send(WriteTxnMarkersRequest::default().with_markers(vec![marker]), 1)
        .await?;
    for result in written.markers.iter().flat_map(|m| &m.topics).flat_map(|t| &t.partitions) {
        kafka_code(result.error_code, &format!("ending the hanging transaction on {topic}/{}", hanging.partition))?;
    }
    Ok(())
}

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}
