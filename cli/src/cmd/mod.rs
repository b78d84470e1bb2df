//! One module per verb of the `sluice` binary (besides `serve`, which lives
//! in the library so tests can run the roles in-process).

pub mod bench;
pub mod dlq;
pub mod dlt;
pub mod replay;
pub mod schema;
pub mod status;

/// Who acts and why, for the verbs the audit log records. `--why` is the
/// justification everywhere; `--reason` is always a filter on the failure
/// reason (so `purge --reason timeout` cannot pass for a justification).
#[derive(Clone, clap::Args)]
pub struct WhoArgs {
    /// Why: required, kept in the audit log.
    #[arg(long)]
    pub why: String,
    /// Who acts (default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
}

/// How a destructive verb gets its operator's intent: it shows what will go
/// and asks, unless told `--yes`; `--dry-run` shows and stops.
#[derive(Clone, clap::Args)]
pub struct IntentArgs {
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (needed when not run at a terminal).
    #[arg(long)]
    pub yes: bool,
}

impl IntentArgs {
    /// Asks on the terminal whether to go on with `what`; `--yes` answers
    /// for the operator, and without a terminal nothing goes without it.
    pub fn confirm(&self, what: &str) -> anyhow::Result<bool> {
        use std::io::{BufRead, IsTerminal, Write};
        if self.yes {
            return Ok(true);
        }
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "{what}: not confirmed (not run at a terminal: pass --yes to go on, --dry-run to look first)"
            );
        }
        eprint!("{what}. Type yes to go on: ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        Ok(answer.trim() == "yes")
    }
}

impl WhoArgs {
    /// The actor (the OS user when not given).
    pub fn actor(&self) -> String {
        self.actor.clone().unwrap_or_else(sluice_cli::ops::audit::default_actor)
    }
}

/// Prints a value as one line of JSON (for `--json`).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// `--json`: the report as one JSON document; else `table` prints it for people.
fn output<T: serde::Serialize>(json: bool, report: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    table(report);
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
