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
//! [`find_hanging`] finds two kinds, neither of which can be a live
//! transaction, whoever asks and whenever:
//! - one of a producer at an epoch older than the one its coordinator holds
//!   (its transactional id found with `ListTransactions`) while that
//!   coordinator has nothing of an older epoch left to end: a coordinator
//!   moves a producer to a newer epoch only once it has ended the older
//!   epoch's transaction on every partition it knows;
//! - one whose producer last wrote to the partition longer ago than a
//!   transaction may live (its coordinator aborts it by then), whatever its
//!   producer id: found when the coordinator lost track of the producer
//!   itself. The caller tells whose it is from its first record.
//!
//! A relay asks when it has fenced its predecessors (`init_transactions`
//! returned), after it aborted, and on a timer, since a partition can come
//! to hang after the last look. Whether it ends in a commit or an abort is
//! the relay's call ([`crate::kafka`]): its records say which journal
//! entries they carry.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::write_txn_markers_request::{WritableTxnMarker, WritableTxnMarkerTopic};
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeTransactionsRequest, FindCoordinatorRequest, ListTransactionsRequest,
    MetadataRequest, ProducerId, RequestHeader, ResponseHeader, TopicName, TransactionalId, WriteTxnMarkersRequest,
};
use kafka_protocol::protocol::{encode_request_header_into_buffer, Decodable, HeaderVersion, Request, StrBytes};
use kafka_protocol::ResponseError;
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
    transaction_state(brokers, transactional_id)
        .await?
        .ok_or_else(|| format!("no transaction state for {transactional_id}"))
}

/// [`describe_transaction`]; `None` for an id the coordinator does not
/// know (its producer never began, or expired).
async fn transaction_state(brokers: &str, transactional_id: &str) -> Result<Option<TransactionState>, String> {
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
    if state.error_code.err() == Some(ResponseError::TransactionalIdNotFound) {
        return Ok(None);
    }
    kafka_code(state.error_code, "describing the transaction")?;
    Ok(Some(TransactionState {
        producer_id: state.producer_id.0,
        producer_epoch: state.producer_epoch,
        state: state.transaction_state.to_string(),
    }))
}

/// Each partition of `topic` with its leader's address, and every broker's
/// address.
async fn topic_metadata(brokers: &str, topic: &str) -> Result<(BTreeMap<i32, String>, Vec<String>), String> {
    let metadata = connect_any(brokers)
        .await?
        .send(
            MetadataRequest::default()
                .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic_name(topic)))])),
            12,
        )
        .await?;
    let addresses: BTreeMap<i32, String> =
        metadata.brokers.iter().map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port))).collect();
    let mut leaders = BTreeMap::new();
    for t in &metadata.topics {
        kafka_code(t.error_code, &format!("reading the metadata of {topic}"))?;
        for p in &t.partitions {
            let leader = addresses
                .get(&p.leader_id.0)
                .ok_or_else(|| format!("{topic}/{} has no leader now", p.partition_index))?;
            leaders.insert(p.partition_index, leader.clone());
        }
    }
    Ok((leaders, addresses.into_values().collect()))
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
    /// Found by its epoch (not live, whoever's it is); otherwise by its age.
    pub by_epoch: bool,
    /// Its producer's transactional id, when a coordinator still knows it.
    pub transactional_id: Option<String>,
}

/// The transactions open on a partition of `topic` that are hanging: of a
/// producer at an epoch older than the one its coordinator has moved it to,
/// or of any producer that last wrote to the partition more than
/// `stale_after` ago (longer than a transaction may live). The caller reads
/// their first record to tell whose they are.
pub async fn find_hanging(brokers: &str, topic: &str, stale_after: Duration) -> Result<Vec<Hanging>, String> {
    let (leaders, all) = topic_metadata(brokers, topic).await?;
    let mut by_leader: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (partition, leader) in &leaders {
        by_leader.entry(leader.as_str()).or_default().push(*partition);
    }
    // (partition, its leader, the producer) of every transaction open on a
    // partition.
    let mut open = Vec::new();
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
            for producer in partition.active_producers.iter().filter(|p| p.current_txn_start_offset >= 0) {
                open.push((partition.partition_index, leader.to_owned(), producer.clone()));
            }
        }
    }
    if open.is_empty() {
        return Ok(Vec::new());
    }
    let ids = transactional_ids(&all, open.iter().map(|(_, _, p)| p.producer_id.0).collect()).await?;
    let mut states: BTreeMap<&str, Option<TransactionState>> = BTreeMap::new();
    for id in ids.values() {
        // An epoch still being ended (`PrepareAbort`, `PrepareCommit`, a
        // fence) has its transaction open on partitions until its markers
        // are written, and cannot be told apart from a hanging one by its
        // epoch.
        let state = transaction_state(brokers, id)
            .await?
            .filter(|c| matches!(c.state.as_str(), "Empty" | "Ongoing" | "CompleteCommit" | "CompleteAbort"));
        states.insert(id, state);
    }
    let stale_before = chrono::Utc::now().timestamp_millis() - stale_after.as_millis() as i64;
    let mut hanging = Vec::new();
    for (partition, leader, producer) in open {
        let transactional_id = ids.get(&producer.producer_id.0).cloned();
        let current = transactional_id.as_deref().and_then(|id| states.get(id).cloned().flatten());
        let by_epoch = current.is_some_and(|c| {
            producer.producer_id.0 == c.producer_id && producer.producer_epoch < i32::from(c.producer_epoch)
        });
        // A producer whose last write time the broker does not know (-1)
        // is never taken for stale.
        let stale = (0..stale_before).contains(&producer.last_timestamp);
        if by_epoch || stale {
            hanging.push(Hanging {
                partition,
                leader,
                producer_id: producer.producer_id.0,
                producer_epoch: producer.producer_epoch as i16,
                coordinator_epoch: producer.coordinator_epoch,
                first_offset: producer.current_txn_start_offset,
                by_epoch,
                transactional_id,
            });
        }
    }
    Ok(hanging)
}

/// The transactional ids of `producer_ids`, as their coordinators (any of
/// the brokers `all`) list them; an id no coordinator knows is left out.
async fn transactional_ids(all: &[String], producer_ids: Vec<i64>) -> Result<BTreeMap<i64, String>, String> {
    let filter: Vec<ProducerId> = producer_ids.into_iter().map(ProducerId).collect();
    let mut ids = BTreeMap::new();
    for address in all {
        let listed = Broker::connect(address)
            .await?
            .send(ListTransactionsRequest::default().with_producer_id_filters(filter.clone()), 0)
            .await?;
        kafka_code(listed.error_code, "listing transactions")?;
        for state in listed.transaction_states {
            ids.insert(state.producer_id.0, state.transactional_id.0.to_string());
        }
    }
    Ok(ids)
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
