//! The sluice roles under test, each a child process of this executable
//! (`sluice --config <generated> serve --role <role>`): a process per role is
//! what production runs, and it gives each role a peak RSS of its own
//! (`VmHWM` in `/proc/<pid>/status`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::settings::Settings;

/// The generated configuration of the roles: the caller's settings with the
/// bench tenant only. It may hold secrets of the caller's configuration (the
/// operation secret), so it is private to the user and removed when dropped,
/// never written into the results folder.
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    pub fn write(settings: &Settings) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("sluice-bench-{}.toml", uuid::Uuid::new_v4().simple()));
        let text = toml::to_string(settings).context("serializing the roles' settings")?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One running role, killed (SIGKILL) if dropped while running.
pub struct RoleProcess {
    pub role: &'static str,
    child: Child,
    log: PathBuf,
}

impl RoleProcess {
    /// Starts `serve --role <role>` with `config`; its output goes to
    /// `<logs>/<role>.log`.
    pub fn spawn(config: &ConfigFile, role: &'static str, logs: &Path) -> anyhow::Result<Self> {
        Self::spawn_as(config, role, role, logs, &[])
    }

    /// As `spawn`, with its output in `<logs>/<name>.log` and `env` set on
    /// top of the configuration (`SLUICE_METRICS__ADDR`, for one more
    /// process of a role with an admin address of its own).
    pub fn spawn_as(
        config: &ConfigFile,
        role: &'static str,
        name: &str,
        logs: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the sluice executable")?;
        std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("--config")
            .arg(config.path())
            .args(["serve", "--role", role])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // The generated file already holds the resolved settings; `SLUICE_*`
        // variables of this environment would override it (the edge's
        // address, for one). The log filter is the exception.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("SLUICE_") && name != "SLUICE_LOG" {
                command.env_remove(name.as_ref());
            }
        }
        command.envs(env.iter().copied());
        let child = command.spawn().with_context(|| format!("starting the {role} role"))?;
        Ok(Self { role, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of the role's log, if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the {} role exited ({status}); end of {}:\n{}", self.role, self.log.display(), self.log_tail(20));
        }
        Ok(())
    }

    /// Stops the process where it stands (SIGSTOP), until [`Self::thaw`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        // No signal crate: `kill` is part of every Debian base system.
        let sent = Command::new("kill").args([signal, &self.pid().to_string()]).status().context("running kill")?;
        anyhow::ensure!(sent.success(), "could not send {signal} to the {} role (pid {})", self.role, self.pid());
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for the drain to finish; SIGKILL after.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        self.signal("-TERM")?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("the {} role did not stop within {grace:?} of SIGTERM; killed", self.role)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmHWM` of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_hwm(&status).with_context(|| format!("no VmHWM in {path}"))
}

/// Resets a process's peak RSS to its current RSS (`5` to `clear_refs`,
/// Linux ≥ 4.0), so the next reading is the peak of what came after. Best
/// effort: without it, readings are peaks since the process started.
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()
}

/// A free port on loopback for the edge (bound, read, released: another
/// process could take it in between, which a failed start would show).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peak_rss_line() {
        let status = "Name:\tsluice\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12345));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn reads_its_own_peak_rss() {
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
    }
}
