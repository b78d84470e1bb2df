//! The demo read models of `orders`, as a [`Projection`]: pure functions
//! from an order event (and what the order's earlier events left behind) to
//! the writes it causes.
//!
//! Every write carries the event's stream version, which the runtime uses as
//! the CQL write timestamp: applying an event twice, or replaying the topic,
//! leaves exactly the same cells, and a later version always wins.

use sluice_schemas::codec::{Decoded, EventError};
use sluice_schemas::orders::{OrderEvent, OrderLine};

use crate::projection::{Cell, MemoRead, Projection, Table, Write};

/// What later events of an order need from its submission (read back from the
/// order read model before applying them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSnapshot {
    pub customer_id: String,
    pub submitted_at_ms: i64,
    pub total_cents: i64,
}

/// The orders projection, under its configured name (`orders` in the demo).
#[derive(Debug, Clone)]
pub struct Orders {
    pub name: String,
}

/// `by_id`: the whole order.
const BY_ID: &str = "by_id";
/// `by_customer`: a customer's orders, newest first, paged.
const BY_CUSTOMER: &str = "by_customer";
/// `sales_by_day`: orders and totals per day, pre-aggregated so a day reads a
/// bounded number of rows whatever its volume (a submission +1 and +total on
/// its day, a cancellation -1 and -total on its day).
const SALES_BY_DAY: &str = "sales_by_day";

const TABLES: &[Table] = &[
    Table::Rows {
        name: BY_ID,
        columns: &[
            ("order_id", "text"),
            ("customer_id", "text"),
            ("status", "text"),
            ("currency", "text"),
            ("lines", "text"),
            ("total_cents", "bigint"),
            ("version", "bigint"),
            ("submitted_at", "timestamp"),
            ("updated_at", "timestamp"),
            ("carrier", "text"),
            ("tracking_number", "text"),
            ("cancel_reason", "text"),
        ],
        partition: &["order_id"],
        clustering: &[],
        order: None,
    },
    Table::Rows {
        name: BY_CUSTOMER,
        columns: &[
            ("customer_id", "text"),
            ("submitted_at", "timestamp"),
            ("order_id", "text"),
            ("status", "text"),
            ("currency", "text"),
            ("total_cents", "bigint"),
            ("version", "bigint"),
        ],
        partition: &["customer_id"],
        clustering: &["submitted_at", "order_id"],
        order: Some("submitted_at DESC, order_id ASC"),
    },
    Table::Totals { name: SALES_BY_DAY, key: &[("day", "date")], sums: &["orders", "total_cents"] },
];

impl Orders {
    /// Its tables (the bench copies them).
    pub const TABLES: &'static [Table] = TABLES;
}

impl Projection for Orders {
    type Event = OrderEvent;
    type Memo = OrderSnapshot;

    fn name(&self) -> &str {
        &self.name
    }

    fn context(&self) -> &'static str {
        sluice_schemas::orders::CONTEXT
    }

    fn tables(&self) -> &'static [Table] {
        TABLES
    }

    /// `daily_sales` held one row per order and movement, summed on read
    /// (replaced by `sales_by_day`; a version created before it gets its
    /// sales by `sluice replay --rebuild`).
    fn former_tables(&self) -> &'static [&'static str] {
        &["daily_sales"]
    }

    fn decode(&self, decoded: Decoded<'_>) -> Result<OrderEvent, EventError> {
        OrderEvent::from_decoded(decoded)
    }

    fn memo_read(&self, event: &OrderEvent) -> Option<MemoRead> {
        needs_snapshot(event).then(|| MemoRead {
            table: BY_ID,
            key: vec![Cell::text(event.meta().order_id)],
            columns: &["customer_id", "submitted_at", "total_cents"],
        })
    }

    fn memo_of(&self, cells: &[Cell]) -> Option<OrderSnapshot> {
        match cells {
            [Cell::Text(customer_id), Cell::Timestamp(submitted_at_ms), Cell::BigInt(total_cents)] => {
                Some(OrderSnapshot {
                    customer_id: customer_id.clone(),
                    submitted_at_ms: *submitted_at_ms,
                    total_cents: *total_cents,
                })
            }
            _ => None,
        }
    }

    fn memo_after(&self, event: &OrderEvent, before: Option<OrderSnapshot>) -> Option<OrderSnapshot> {
        snapshot_after(event, before)
    }

    fn writes(&self, event: &OrderEvent, memo: Option<&OrderSnapshot>) -> Vec<Write> {
        apply(event, memo).into_iter().map(OrderWrite::into_write).collect()
    }
}

/// What an order event changes, by read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderWrite {
    /// `orders_by_id`: the whole order, at its submission.
    OrderSubmitted {
        order_id: String,
        customer_id: String,
        currency: String,
        lines: Vec<OrderLine>,
        total_cents: i64,
        at_ms: i64,
        version: i64,
    },
    /// `orders_by_id`: a later status.
    OrderStatus {
        order_id: String,
        status: &'static str,
        at_ms: i64,
        version: i64,
        cancel_reason: Option<String>,
        shipment: Option<(String, String)>,
    },
    /// `orders_by_customer`: the order's row in its customer's list.
    CustomerOrder {
        customer_id: String,
        submitted_at_ms: i64,
        order_id: String,
        status: &'static str,
        /// Set at submission; status changes leave them alone.
        currency_and_total: Option<(String, i64)>,
        version: i64,
    },
    /// `daily_sales`: one movement of one order on one day.
    Sale { day_ms: i64, order_id: String, movement: &'static str, orders: i32, total_cents: i64, version: i64 },
}

impl OrderWrite {
    pub fn version(&self) -> i64 {
        match self {
            OrderWrite::OrderSubmitted { version, .. }
            | OrderWrite::OrderStatus { version, .. }
            | OrderWrite::CustomerOrder { version, .. }
            | OrderWrite::Sale { version, .. } => *version,
        }
    }

    /// The row (or running total) it writes.
    pub fn into_write(self) -> Write {
        let version = self.version();
        match self {
            OrderWrite::OrderSubmitted { order_id, customer_id, currency, lines, total_cents, at_ms, version } => {
                let lines = serde_json::to_string(&lines).expect("order lines always serialize");
                let cells = vec![
                    ("order_id", Cell::Text(order_id)),
                    ("customer_id", Cell::Text(customer_id)),
                    ("status", Cell::text("submitted")),
                    ("currency", Cell::Text(currency)),
                    ("lines", Cell::Text(lines)),
                    ("total_cents", Cell::BigInt(total_cents)),
                    ("version", Cell::BigInt(version)),
                    ("submitted_at", Cell::Timestamp(at_ms)),
                    ("updated_at", Cell::Timestamp(at_ms)),
                ];
                Write::Row { table: BY_ID, cells, version }
            }
            OrderWrite::OrderStatus { order_id, status, at_ms, version, cancel_reason, shipment } => {
                let (carrier, tracking) = shipment.unzip();
                let cells = vec![
                    ("order_id", Cell::Text(order_id)),
                    ("status", Cell::text(status)),
                    ("version", Cell::BigInt(version)),
                    ("updated_at", Cell::Timestamp(at_ms)),
                    ("cancel_reason", cancel_reason.into()),
                    ("carrier", carrier.into()),
                    ("tracking_number", tracking.into()),
                ];
                Write::Row { table: BY_ID, cells, version }
            }
            OrderWrite::CustomerOrder {
                customer_id,
                submitted_at_ms,
                order_id,
                status,
                currency_and_total,
                version,
            } => {
                let mut cells = vec![
                    ("customer_id", Cell::Text(customer_id)),
                    ("submitted_at", Cell::Timestamp(submitted_at_ms)),
                    ("order_id", Cell::Text(order_id)),
                    ("status", Cell::text(status)),
                    ("version", Cell::BigInt(version)),
                ];
                // Set at submission; status changes leave them alone.
                if let Some((currency, total)) = currency_and_total {
                    cells.push(("currency", Cell::Text(currency)));
                    cells.push(("total_cents", Cell::BigInt(total)));
                }
                Write::Row { table: BY_CUSTOMER, cells, version }
            }
            OrderWrite::Sale { day_ms, order_id, movement, orders, total_cents, .. } => Write::Add {
                table: SALES_BY_DAY,
                key: vec![("day", Cell::day_of(day_ms))],
                id: format!("order {order_id} {movement}"),
                sums: vec![("orders", i64::from(orders)), ("total_cents", total_cents)],
                version,
            },
        }
    }
}

/// The writes one event causes. `snapshot` is the order as submitted, when
/// the read model has it (a rebuild that starts after an order's submission
/// does not: then only the order's own status is written).
pub fn apply(event: &OrderEvent, snapshot: Option<&OrderSnapshot>) -> Vec<OrderWrite> {
    match event {
        OrderEvent::Submitted(e) => vec![
            OrderWrite::OrderSubmitted {
                order_id: e.order_id.clone(),
                customer_id: e.customer_id.clone(),
                currency: e.currency.clone(),
                lines: e.lines.clone(),
                total_cents: e.total_cents,
                at_ms: e.occurred_at,
                version: e.version,
            },
            OrderWrite::CustomerOrder {
                customer_id: e.customer_id.clone(),
                submitted_at_ms: e.occurred_at,
                order_id: e.order_id.clone(),
                status: "submitted",
                currency_and_total: Some((e.currency.clone(), e.total_cents)),
                version: e.version,
            },
            OrderWrite::Sale {
                day_ms: e.occurred_at,
                order_id: e.order_id.clone(),
                movement: "submitted",
                orders: 1,
                total_cents: e.total_cents,
                version: e.version,
            },
        ],
        OrderEvent::Cancelled(e) => {
            let mut writes = vec![OrderWrite::OrderStatus {
                order_id: e.order_id.clone(),
                status: "cancelled",
                at_ms: e.occurred_at,
                version: e.version,
                cancel_reason: Some(e.reason.clone()),
                shipment: None,
            }];
            if let Some(s) = snapshot {
                writes.push(customer_status(s, &e.order_id, "cancelled", e.version));
                writes.push(OrderWrite::Sale {
                    day_ms: e.occurred_at,
                    order_id: e.order_id.clone(),
                    movement: "cancelled",
                    orders: -1,
                    total_cents: -s.total_cents,
                    version: e.version,
                });
            }
            writes
        }
        OrderEvent::Shipped(e) => {
            let mut writes = vec![OrderWrite::OrderStatus {
                order_id: e.order_id.clone(),
                status: "shipped",
                at_ms: e.occurred_at,
                version: e.version,
                cancel_reason: None,
                shipment: Some((e.carrier.clone(), e.tracking_number.clone())),
            }];
            if let Some(s) = snapshot {
                writes.push(customer_status(s, &e.order_id, "shipped", e.version));
            }
            writes
        }
    }
}

/// The snapshot a later event of the order needs, after `event` (whose
/// own snapshot was `before`).
pub fn snapshot_after(event: &OrderEvent, before: Option<OrderSnapshot>) -> Option<OrderSnapshot> {
    match event {
        OrderEvent::Submitted(e) => Some(OrderSnapshot {
            customer_id: e.customer_id.clone(),
            submitted_at_ms: e.occurred_at,
            total_cents: e.total_cents,
        }),
        _ => before,
    }
}

/// Whether applying `event` needs the order's snapshot.
pub fn needs_snapshot(event: &OrderEvent) -> bool {
    !matches!(event, OrderEvent::Submitted(_))
}

fn customer_status(s: &OrderSnapshot, order_id: &str, status: &'static str, version: i64) -> OrderWrite {
    OrderWrite::CustomerOrder {
        customer_id: s.customer_id.clone(),
        submitted_at_ms: s.submitted_at_ms,
        order_id: order_id.to_owned(),
        status,
        currency_and_total: None,
        version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::orders::{OrderCancelled, OrderSubmitted};

    fn submitted() -> OrderEvent {
        OrderEvent::Submitted(OrderSubmitted {
            event_id: "e1".into(),
            order_id: "o1".into(),
            version: 1,
            occurred_at: 86_400_000,
            customer_id: "c1".into(),
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "a".into(), quantity: 3, unit_price_cents: 100 }],
            total_cents: 300,
        })
    }

    fn cancelled() -> OrderEvent {
        OrderEvent::Cancelled(OrderCancelled {
            event_id: "e2".into(),
            order_id: "o1".into(),
            version: 2,
            occurred_at: 2 * 86_400_000,
            reason: "late".into(),
        })
    }

    #[test]
    fn a_submission_writes_the_order_the_customer_list_and_a_sale() {
        let writes = apply(&submitted(), None);
        assert_eq!(writes.len(), 3);
        assert!(matches!(&writes[2], OrderWrite::Sale { orders: 1, total_cents: 300, movement: "submitted", .. }));
        assert!(writes.iter().all(|w| w.version() == 1));
    }

    #[test]
    fn a_cancellation_subtracts_on_its_own_day() {
        let snapshot = OrderSnapshot { customer_id: "c1".into(), submitted_at_ms: 86_400_000, total_cents: 300 };
        let writes = apply(&cancelled(), Some(&snapshot));
        assert!(
            matches!(&writes[0], OrderWrite::OrderStatus { status: "cancelled", cancel_reason: Some(r), .. } if r == "late")
        );
        assert!(matches!(
            &writes[1],
            OrderWrite::CustomerOrder {
                status: "cancelled",
                submitted_at_ms: 86_400_000,
                currency_and_total: None,
                ..
            }
        ));
        assert!(matches!(&writes[2], OrderWrite::Sale { orders: -1, total_cents: -300, day_ms: 172_800_000, .. }));
    }

    #[test]
    fn sales_of_one_day_add_to_one_running_total_whatever_the_moment() {
        let sale = |day_ms| OrderWrite::Sale {
            day_ms,
            order_id: "o1".into(),
            movement: "submitted",
            orders: 1,
            total_cents: 300,
            version: 1,
        };
        let key = |w: Write| match w {
            Write::Add { key, .. } => key,
            other => panic!("not an addition: {other:?}"),
        };
        let (early, late) = (key(sale(86_400_000).into_write()), key(sale(2 * 86_400_000 - 1).into_write()));
        assert_eq!(early, late, "one day, one key");
        assert_ne!(early, key(sale(2 * 86_400_000).into_write()), "the next day has its own");
    }

    #[test]
    fn without_its_submission_only_the_status_is_written() {
        assert!(needs_snapshot(&cancelled()));
        assert_eq!(apply(&cancelled(), None).len(), 1);
    }

    mod batches {
        //! Batches write what one-by-one application writes: an event whose
        //! order's submission is earlier in the same batch takes the snapshot
        //! from it ([`snapshot_after`]); otherwise from the store as the
        //! batch found it. The store is modelled by what the submissions
        //! wrote to the order's row.

        use std::collections::HashMap;

        use proptest::prelude::*;
        use sluice_schemas::orders::{OrderCancelled, OrderShipped, OrderSubmitted};

        use super::super::*;

        /// The order row as a submission's write left it: the snapshot a
        /// later event reads back.
        fn read_back(store: &HashMap<String, OrderSnapshot>, order: &str) -> Option<OrderSnapshot> {
            store.get(order).cloned()
        }

        fn write_back(store: &mut HashMap<String, OrderSnapshot>, writes: &[OrderWrite]) {
            for w in writes {
                if let OrderWrite::OrderSubmitted { order_id, customer_id, total_cents, at_ms, .. } = w {
                    let row = OrderSnapshot {
                        customer_id: customer_id.clone(),
                        submitted_at_ms: *at_ms,
                        total_cents: *total_cents,
                    };
                    store.insert(order_id.clone(), row);
                }
            }
        }

        /// One partition's log: orders submitted, then some shipped or
        /// cancelled, interleaved.
        fn log() -> impl Strategy<Value = Vec<OrderEvent>> {
            prop::collection::vec((0..5usize, 0..3u8, 1..50i64), 1..40).prop_map(|picks| {
                let mut versions = [0i64; 5];
                let mut out = Vec::new();
                for (order, kind, cents) in picks {
                    let (order_id, v) = (format!("o{order}"), versions[order] + 1);
                    let event_id = format!("{order_id}-{v}");
                    let at = v * 3_600_000 * 7;
                    let event = match (versions[order], kind) {
                        (0, _) => OrderEvent::Submitted(OrderSubmitted {
                            event_id,
                            order_id,
                            version: v,
                            occurred_at: at,
                            customer_id: format!("c{}", order % 2),
                            currency: "EUR".into(),
                            lines: vec![],
                            total_cents: cents,
                        }),
                        (1, 0) => continue,
                        (1, 1) => OrderEvent::Shipped(OrderShipped {
                            event_id,
                            order_id,
                            version: v,
                            occurred_at: at,
                            carrier: "ups".into(),
                            tracking_number: "1Z".into(),
                        }),
                        (1, _) => OrderEvent::Cancelled(OrderCancelled {
                            event_id,
                            order_id,
                            version: v,
                            occurred_at: at,
                            reason: "r".into(),
                        }),
                        _ => continue,
                    };
                    versions[order] = v;
                    out.push(event);
                }
                out
            })
        }

        fn sorted(mut writes: Vec<OrderWrite>) -> Vec<String> {
            let mut out: Vec<String> = writes.drain(..).map(|w| format!("{w:?}")).collect();
            out.sort();
            out
        }

        proptest! {
            #[test]
            fn any_batching_writes_what_one_by_one_writes(events in log(), cuts in prop::collection::vec(1..12usize, 1..8)) {
                let mut store = HashMap::new();
                let mut one_by_one = Vec::new();
                for e in &events {
                    let snapshot = if needs_snapshot(e) { read_back(&store, e.meta().order_id) } else { None };
                    let writes = apply(e, snapshot.as_ref());
                    write_back(&mut store, &writes);
                    one_by_one.extend(writes);
                }

                let mut store = HashMap::new();
                let mut batched = Vec::new();
                let (mut rest, mut cut) = (&events[..], cuts.iter().cycle());
                while !rest.is_empty() {
                    let (batch, later) = rest.split_at((*cut.next().unwrap()).min(rest.len()));
                    // Within a batch each order keeps what its earlier events left.
                    let mut known: HashMap<&str, Option<OrderSnapshot>> = HashMap::new();
                    let mut writes = Vec::new();
                    for e in batch {
                        let order = e.meta().order_id;
                        let snapshot = if needs_snapshot(e) {
                            known.get(order).cloned().unwrap_or_else(|| read_back(&store, order))
                        } else {
                            None
                        };
                        writes.extend(apply(e, snapshot.as_ref()));
                        let before = known.get(order).cloned().unwrap_or_else(|| read_back(&store, order));
                        known.insert(order, snapshot_after(e, before));
                    }
                    // The batch's rows land together, after it.
                    write_back(&mut store, &writes);
                    batched.extend(writes);
                    rest = later;
                }
                prop_assert_eq!(sorted(batched), sorted(one_by_one));
            }
        }
    }
}
