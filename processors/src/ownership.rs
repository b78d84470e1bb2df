//! Who owns which command partition.
//!
//! Every processor says it is alive by rewriting a membership row with a
//! short TTL ([`Membership`]); every processor reads the live members and
//! computes the same assignment ([`assign`]): each (tenant, context) family's
//! partitions spread evenly over the members in sorted order, offset per
//! family so that the partitions left over after an even split fall on
//! different members. A processor consumes the partitions assigned to it and
//! releases the others; a member that stops renewing its row (crashed,
//! frozen, cut off) loses its partitions to the others within
//! `ttl + interval`.
//!
//! The assignment only decides where consumers register. Exclusivity comes
//! from the broker: each partition queue has a single active consumer, so
//! while two processors disagree about the membership (one just joined, one
//! is frozen but its connection is still open), only one of them gets the
//! partition's commands, and the next one takes over when the first one's
//! consumer or connection goes.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use sluice_schemas::catalog;

use crate::amqp::consumer::PartitionRef;

/// The live processors.
pub trait Membership: Send + Sync {
    /// Says `instance` is alive for the next `ttl`.
    fn renew(&self, instance: &str, ttl: Duration) -> impl Future<Output = Result<(), String>> + Send;
    /// The processors alive now.
    fn members(&self) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// Says `instance` is gone (a clean stop): its partitions move at once.
    fn leave(&self, instance: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// Membership rows in the CQL store (`processor_members`).
pub struct CqlMembership {
    session: Arc<Session>,
    group: String,
    renew: PreparedStatement,
    select: PreparedStatement,
    leave: PreparedStatement,
}

impl CqlMembership {
    pub async fn new(session: Arc<Session>, group: &str) -> Result<Self, String> {
        let renew = session
            .prepare("INSERT INTO processor_members (member_group, instance, seen_at) VALUES (?, ?, ?) USING TTL ?")
            .await
            .map_err(|e| e.to_string())?;
        let select = session
            .prepare("SELECT instance FROM processor_members WHERE member_group = ?")
            .await
            .map_err(|e| e.to_string())?;
        let leave = session
            .prepare("DELETE FROM processor_members WHERE member_group = ? AND instance = ?")
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { session, group: group.to_owned(), renew, select, leave })
    }
}

impl Membership for CqlMembership {
    async fn renew(&self, instance: &str, ttl: Duration) -> Result<(), String> {
        let ttl = i32::try_from(ttl.as_secs().max(1)).unwrap_or(i32::MAX);
        let now = CqlTimestamp(chrono::Utc::now().timestamp_millis());
        self.session
            .execute_unpaged(&self.renew, (self.group.as_str(), instance, now, ttl))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn members(&self) -> Result<Vec<String>, String> {
        let rows = self
            .session
            .execute_unpaged(&self.select, (self.group.as_str(),))
            .await
            .map_err(|e| e.to_string())?
            .into_rows_result()
            .map_err(|e| e.to_string())?;
        rows.rows::<(String,)>()
            .map_err(|e| e.to_string())?
            .map(|row| row.map(|(instance,)| instance).map_err(|e| e.to_string()))
            .collect()
    }

    async fn leave(&self, instance: &str) -> Result<(), String> {
        self.session
            .execute_unpaged(&self.leave, (self.group.as_str(), instance))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// The membership group of processors serving `tenants`: processors share
/// partitions only with processors configured for the same tenants (any
/// other processor would be handed partitions it does not serve).
pub fn group_for(tenants: &[String]) -> String {
    let mut sorted: Vec<&str> = tenants.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    format!("processors-{:016x}", sluice_schemas::names::stable_hash(sorted.join("\u{1f}").bytes()))
}

/// The partitions `me` owns among `members` (`me` counts as a member
/// whatever the list says: it is alive, it is asking).
pub fn assign(members: &[String], me: &str, tenants: &[String], partitions: u16) -> BTreeSet<PartitionRef> {
    let mut live: Vec<&str> = members.iter().map(String::as_str).collect();
    live.push(me);
    live.sort_unstable();
    live.dedup();
    let mine = live.iter().position(|m| *m == me).expect("me was added");
    let n = live.len();
    let mut owned = BTreeSet::new();
    for tenant in tenants {
        for context in catalog::CONTEXTS {
            let offset = family_offset(tenant, context.name);
            for partition in 0..partitions {
                if (usize::from(partition) + offset) % n == mine {
                    owned.insert(PartitionRef { tenant: tenant.clone(), context: context.name, partition });
                }
            }
        }
    }
    owned
}

/// Spreads the remainder of each family's partitions over different members.
fn family_offset(tenant: &str, context: &str) -> usize {
    usize::from(sluice_schemas::names::command_partition(tenant, context, u16::MAX))
}

#[cfg(test)]
#[test]
fn processors_of_other_tenant_sets_are_in_other_groups() {
    let t = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(group_for(&t(&["acme", "globex"])), group_for(&t(&["globex", "acme"])));
    assert_ne!(group_for(&t(&["acme", "globex"])), group_for(&t(&["acme"])));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_the_shares_are_even() {
        let tenants = members(&["acme", "globex"]);
        let all = members(&["p-a", "p-b", "p-c"]);
        let shares: Vec<BTreeSet<PartitionRef>> = all.iter().map(|me| assign(&all, me, &tenants, 6)).collect();
        let total: usize = shares.iter().map(BTreeSet::len).sum();
        assert_eq!(total, tenants.len() * catalog::CONTEXTS.len() * 6, "no partition twice, none left out");
        let union: BTreeSet<_> = shares.iter().flatten().cloned().collect();
        assert_eq!(union.len(), total);
        for share in &shares {
            for tenant in &tenants {
                for context in catalog::CONTEXTS {
                    let n = share.iter().filter(|p| &p.tenant == tenant && p.context == context.name).count();
                    assert_eq!(n, 2, "6 partitions over 3 members: 2 of each family each");
                }
            }
        }
    }

    #[test]
    fn a_lone_processor_owns_everything_and_counts_itself_in() {
        let tenants = members(&["acme"]);
        let owned = assign(&[], "p-a", &tenants, 4);
        assert_eq!(owned.len(), catalog::CONTEXTS.len() * 4);
    }
}
