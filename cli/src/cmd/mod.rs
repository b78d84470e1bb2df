//! One module per verb of the `sluice` binary (besides `serve`, which lives
//! in the library so tests can run the roles in-process).

pub mod replay;

/// Prints a value as one line of JSON (for `--json`).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
