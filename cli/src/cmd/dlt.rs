//! `sluice dlt`: the Kafka consumers' dead-letter topics and parked keys.
//! The work is in `sluice_cli::ops::dlt`; this module parses arguments and
//! prints.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::ops::dlt::{DeadRecord, Dlt, DltFilter, DltListing, ParkedKey, ReplayOutcome};
use sluice_cli::ops::parse_duration;
use sluice_cli::serve::connect_cql;
use sluice_cli::settings::Settings;

use super::{output, print_table, WhoArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(clap::Args)]
struct KeyArgs {
    /// The consumer: the orders projection's name, `patients` or
    /// `onboarding` (`sluice dlt list` shows them).
    #[arg(long)]
    consumer: String,
    /// The tenant whose topic the key is in.
    #[arg(long)]
    tenant: String,
    /// The parked key (an order id, a patient id).
    key: String,
}

#[derive(clap::Subcommand)]
enum Verb {
    /// Parked keys and dead-lettered records, by consumer. Reads the
    /// dead-letter topics from their start; changes nothing.
    List {
        /// Only this consumer's (see KeyArgs for the names).
        #[arg(long)]
        consumer: Option<String>,
        /// Only this tenant's topics.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Every dead-lettered record of one key: headers and payload.
    Show {
        #[command(flatten)]
        key: KeyArgs,
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// After a fix: apply a parked key's dead-lettered records in their
    /// original order, then unpark it (its held records follow). A record
    /// that still fails stops the replay and the key stays parked. Audited.
    Replay {
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        who: WhoArgs,
        /// How long to let dead-letter writes in flight land before reading
        /// the topic (longer than a dead-letter send can take).
        #[arg(long, default_value = "12s", value_parser = parse_duration)]
        grace: Duration,
        /// One JSON document instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Free a parked key without applying its dead letters (they stay in the
    /// topic): its next records apply as they come. Audited.
    Unpark {
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        who: WhoArgs,
        /// One JSON document instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let dlt = Dlt::new(settings.clone(), connect_cql(&settings).await?);
    match args.verb {
        Verb::List { consumer, tenant, key, json } => {
            let known = settings.tenant_names();
            if let Some(t) = tenant.as_deref().filter(|t| !known.is_empty() && !known.iter().any(|k| k == t)) {
                anyhow::bail!("unknown tenant {t:?} (configured: {})", known.join(", "));
            }
            let bar = spinner(json);
            let listing = dlt
                .list(&DltFilter { consumer, tenant, key }, |topic| {
                    if let Some(bar) = &bar {
                        bar.set_message(format!("reading {topic}"));
                    }
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            output(json, &listing, print_listing)
        }
        Verb::Show { key, json } => {
            let records = dlt.show(&key.consumer, &key.tenant, &key.key).await?;
            output(json, &records, |records| print_records(records))
        }
        Verb::Replay { key, who, grace, json } => {
            let (actor, reason) = (who.actor(), who.why);
            let bar = spinner(json);
            let outcome = dlt
                .replay(&key.consumer, &key.tenant, &key.key, (&actor, &reason), grace, |done, total| {
                    if let Some(bar) = &bar {
                        bar.set_message(format!("{done}/{total} applied"));
                    }
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            output(json, &outcome, print_outcome)?;
            if outcome.failed.is_some() {
                std::process::exit(1);
            }
            Ok(())
        }
        Verb::Unpark { key, who, json } => {
            let (actor, reason) = (who.actor(), who.why);
            let parked = dlt.unpark(&key.consumer, &key.tenant, &key.key, (&actor, &reason)).await?;
            output(json, &parked, |p| {
                println!("unparked {} in {} for {} (its dead letters were not applied)", p.key, p.topic, p.consumer)
            })
        }
    }
}

fn spinner(json: bool) -> Option<ProgressBar> {
    (!json).then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    })
}

fn print_listing(listing: &DltListing) {
    if listing.parked.is_empty() {
        println!("no parked key");
    } else {
        let rows: Vec<Vec<String>> = listing.parked.iter().map(parked_row).collect();
        print_table(&["CONSUMER", "TOPIC", "KEY", "POISON AT", "STATE", "REASON"], &rows);
    }
    println!();
    print_records(&listing.records);
}

fn parked_row(p: &ParkedKey) -> Vec<String> {
    let state = if p.releasing { "replaying" } else { "parked" };
    vec![p.consumer.clone(), p.topic.clone(), p.key.clone(), p.first_offset.to_string(), state.into(), p.reason.clone()]
}

fn print_records(records: &[DeadRecord]) {
    if records.is_empty() {
        println!("no dead-lettered record");
        return;
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.consumer.clone(),
                r.key.clone(),
                format!("{}/{}@{}", r.topic, r.partition, r.offset),
                r.class.clone(),
                r.event_type.clone().unwrap_or_else(|| "-".into()),
                r.reason.clone(),
            ]
        })
        .collect();
    print_table(&["CONSUMER", "KEY", "ORIGINAL", "CLASS", "TYPE", "REASON"], &rows);
    for r in records.iter().filter(|r| r.payload_hex.is_some()) {
        println!("\n{} {}/{}@{} ({} bytes)", r.key, r.dlt, r.dlt_partition, r.dlt_offset, r.payload_bytes);
        for (name, value) in &r.headers {
            println!("  {name}: {value}");
        }
        println!("  payload (hex, first 256 bytes): {}", r.payload_hex.as_deref().unwrap_or_default());
    }
}

fn print_outcome(o: &ReplayOutcome) {
    match &o.failed {
        None => {
            println!("{}: {} record(s) of {} applied in order from {}; unparked", o.consumer, o.applied, o.key, o.topic)
        }
        Some((offset, why)) => println!(
            "{}: {} record(s) of {} applied; offset {offset} still fails ({why}): the key stays parked",
            o.consumer, o.applied, o.key
        ),
    }
}
