//! `sluice schemas apply`: the keyspace, tables and columns the code needs,
//! created where missing. Nothing else creates them (a role or an ops verb
//! that finds them missing says to run this), so a mistyped keyspace name
//! fails instead of starting an empty store of its own.

use sluice_cli::serve::apply_schema;
use sluice_cli::settings::Settings;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(clap::Subcommand)]
enum Verb {
    /// Create what is missing (idempotent; safe while the roles run).
    Apply {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    match args.verb {
        Verb::Apply { json } => {
            let report = apply_schema(&settings).await?;
            super::output(json, &report, |r| {
                let list = |items: &[String]| if items.is_empty() { "none".to_owned() } else { items.join(", ") };
                println!("keyspace {}", r.keyspace);
                println!("tables created: {}", list(&r.tables_created));
                println!("columns added: {}", list(&r.columns_added));
            })
        }
    }
}
