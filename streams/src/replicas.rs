//! Which nodes hold a CQL write, so writes of many partitions can share an
//! unlogged batch without fan-out: every row of a batch grouped this way
//! lives on the batch's coordinator (bulk loaders group writes the same
//! way). One batch then costs the store one request instead of one per
//! partition. Both sides write this way: the read models' rows, the event
//! store's streams and the operation records.

use std::collections::HashMap;
use std::hash::Hash;

use scylla::cluster::ClusterState;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

/// The host ids of the nodes holding the partition `statement` writes with
/// `values`, sorted; `None` where the driver cannot tell (no token for the
/// statement, or no node known for it yet). On a cluster of one node, that
/// node, without working out the token.
pub fn of(cluster: &ClusterState, statement: &PreparedStatement, values: &impl SerializeRow) -> Option<Vec<u128>> {
    // One node holds everything: no token to work out (the driver
    // serializes all of a write's values for it, ~5 % of a rebuild's CPU).
    if let [node] = cluster.get_nodes_info() {
        return Some(vec![node.host_id.as_u128()]);
    }
    let token = statement.calculate_token(values).ok().flatten()?;
    let table = statement.get_table_spec()?;
    let mut nodes: Vec<u128> = cluster
        .get_token_endpoints(table.ks_name(), table.table_name(), token)
        .iter()
        .map(|(node, _)| node.host_id.as_u128())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    (!nodes.is_empty()).then_some(nodes)
}

/// Writes in unlogged batches by `key` (the replicas that hold a write, as
/// [`of`] tells): `units` are groups of writes that stay in one batch (a
/// stream's events, whose batch is then applied whole), each placed by its
/// first write's key; a batch holds at most `per_batch` writes, or one
/// larger unit alone.
pub fn batches<U, K: Eq + Hash>(
    units: impl IntoIterator<Item = Vec<U>>,
    per_batch: usize,
    key: impl Fn(&U) -> K,
) -> Vec<Vec<U>> {
    batches_by_weight(units, per_batch, |_| 1, key)
}

/// [`batches`] with a limit on the writes' summed `weight` (their bytes,
/// where a batch's size is what the store limits) instead of their count.
pub fn batches_by_weight<U, K: Eq + Hash>(
    units: impl IntoIterator<Item = Vec<U>>,
    per_batch: usize,
    weight: impl Fn(&U) -> usize,
    key: impl Fn(&U) -> K,
) -> Vec<Vec<U>> {
    // foldhash: a rebuild looks up a key for every row it writes.
    let mut open: HashMap<K, (Vec<U>, usize), foldhash::fast::RandomState> = HashMap::default();
    let mut full = Vec::new();
    for unit in units {
        let Some(first) = unit.first() else { continue };
        let unit_weight: usize = unit.iter().map(&weight).sum();
        let (batch, batch_weight) = open.entry(key(first)).or_default();
        if !batch.is_empty() && *batch_weight + unit_weight > per_batch {
            full.push(std::mem::take(batch));
            *batch_weight = 0;
        }
        batch.extend(unit);
        *batch_weight += unit_weight;
    }
    full.extend(open.into_values().map(|(batch, _)| batch).filter(|b| !b.is_empty()));
    full
}

/// A batch of `n` executions of one prepared `statement`, for `n` rows of
/// values (a stream's events, a group [`batches`] made).
pub fn batch_of(kind: BatchType, statement: &PreparedStatement, n: usize) -> Batch {
    let mut batch = Batch::new(kind);
    for _ in 0..n {
        batch.append_statement(statement.clone());
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_stay_whole_and_batches_hold_one_key_up_to_the_limit() {
        // (key, unit id) per write; units of 1, 2 and 5 writes.
        let units = vec![
            vec![("a", 1)],
            vec![("b", 2), ("b", 2)],
            vec![("a", 3), ("a", 3)],
            vec![("a", 4)],
            vec![("a", 5); 5],
            vec![("b", 6)],
        ];
        let mut made = batches(units, 4, |w: &(&str, i32)| w.0);
        made.sort();
        assert_eq!(
            made,
            vec![vec![("a", 1), ("a", 3), ("a", 3), ("a", 4)], vec![("a", 5); 5], vec![("b", 2), ("b", 2), ("b", 6)],],
            "a unit over the limit goes alone, whole"
        );
    }

    #[test]
    fn a_weight_limit_counts_the_writes_weights() {
        // (key, unit id, bytes) per write.
        let units = vec![vec![("a", 1, 10)], vec![("a", 2, 15), ("a", 2, 10)], vec![("a", 3, 40)], vec![("a", 4, 5)]];
        let mut made = batches_by_weight(units, 40, |w: &(&str, i32, usize)| w.2, |w| w.0);
        made.sort();
        assert_eq!(made, vec![vec![("a", 1, 10), ("a", 2, 15), ("a", 2, 10)], vec![("a", 3, 40)], vec![("a", 4, 5)]],);
    }
}
