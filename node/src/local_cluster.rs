//! Members of a cluster as child processes of this one, for development
//! and the demo: started, watched, stopped with SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

/// Longest wait for a member to recover and serve.
const START_TIMEOUT_MS: u64 = 60_000;
/// Longest wait for a member to stop after SIGTERM before it is killed.
const STOP_TIMEOUT_MS: u64 = 30_000;

/// Running members, each a `serve` child process.
#[derive(Debug)]
pub struct LocalCluster {
    children: Vec<(u32, tokio::process::Child)>,
}

impl LocalCluster {
    /// Starts `serve` for each of `members` with `config` and waits until
    /// every one says it serves. The members' output goes to this
    /// process's; `quiet` members log only warnings (unless `RUST_LOG`
    /// says otherwise), so that the demo's own report stays readable.
    pub async fn start(config: &Path, members: &[u32], quiet: bool) -> anyhow::Result<Self> {
        let executable = std::env::current_exe().context("locating this program")?;
        Self::start_with(&executable, config, members, quiet).await
    }

    /// As [`Self::start`], with `executable` as the `flashstock-node` binary
    /// (for other programs, such as the load benchmark).
    pub async fn start_with(executable: &Path, config: &Path, members: &[u32], quiet: bool) -> anyhow::Result<Self> {
        let mut cluster = Self { children: Vec::with_capacity(members.len()) };
        let (ready_sender, mut ready) = tokio::sync::mpsc::channel::<u32>(members.len().max(1));
        for id in members {
            let mut command = tokio::process::Command::new(executable);
            command.args(["serve", "--config"]).arg(config).args(["--id", &id.to_string()]);
            if quiet && std::env::var_os("RUST_LOG").is_none() {
                command.env("RUST_LOG", "warn");
            }
            let mut child = command
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting member {id}"))?;
            let stdout = child.stdout.take().context("member output")?;
            let (id, ready_sender) = (*id, ready_sender.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("serving on") {
                        let _ = ready_sender.send(id).await;
                    }
                    println!("  [node {id}] {line}");
                }
            });
            cluster.children.push((id, child));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        let mut waiting: Vec<u32> = members.to_vec();
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, ready.recv()).await {
                Ok(Some(id)) => waiting.retain(|waiting_id| *waiting_id != id),
                _ => {
                    cluster.stop().await;
                    anyhow::bail!("members {waiting:?} did not start within {START_TIMEOUT_MS} ms");
                }
            }
        }
        Ok(cluster)
    }

    /// Resolves when a member exits on its own: its id and how it ended.
    pub async fn first_exit(&mut self) -> (u32, String) {
        loop {
            for (id, child) in &mut self.children {
                match child.try_wait() {
                    Ok(Some(status)) => return (*id, status.to_string()),
                    Ok(None) => {}
                    Err(error) => return (*id, error.to_string()),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to every member (each answers what is in flight, flushes its
    /// log and exits 0), then waits; a member that does not stop in time is
    /// killed.
    pub async fn stop(&mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
        }
        for (id, child) in &mut self.children {
            match tokio::time::timeout(Duration::from_millis(STOP_TIMEOUT_MS), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("member {id} exited with {status}"),
                Ok(Err(error)) => eprintln!("member {id}: {error}"),
                Err(_) => {
                    eprintln!("member {id} did not stop within {STOP_TIMEOUT_MS} ms; killing it");
                    let _ = child.kill().await;
                }
            }
        }
        self.children.clear();
    }
}

/// Waits (at most `timeout`) until every member answers and sees every
/// other one up (orders that span members need every link) and, in a
/// replicated cluster, every group has elected a leader. Returns whether
/// that happened.
pub async fn wait_until_linked(client: &flashstock_client::Client, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let linked = |member: &flashstock_client::MemberStatus| {
            member.up && member.sees_down.as_ref().is_some_and(Vec::is_empty)
        };
        let ready = |status: &flashstock_client::ClusterStatus| {
            status.members.iter().all(linked)
                && status.groups.iter().all(|group| group.leader.is_some())
                && (status.replication_factor == 1 || !status.groups.is_empty())
        };
        if client.cluster_status().await.is_ok_and(|status| ready(&status)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits (at most `timeout`) until every replication group is led by its
/// preferred leader (see `routing::preferred_leaders`): the first
/// elections go to whichever member started first, and leaders move to
/// their preferred members a few seconds later. A sale started before
/// that would see every group hand over in its middle. Returns whether
/// that happened (at once for a single copy).
pub async fn wait_until_leaders_spread(client: &flashstock_client::Client, members: &[u32], timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(status) = client.cluster_status().await {
            if status.groups.is_empty() {
                return status.replication_factor == 1;
            }
            let group_count = u32::try_from(status.groups.len()).unwrap_or(u32::MAX);
            let factor = status.replication_factor as usize;
            let preferred = flashstock_client::routing::preferred_leaders(group_count, members, factor);
            let spread = status.groups.iter().all(|group| {
                group.leader.is_some() && group.leader == preferred.get(group.group as usize - 1).copied()
            });
            if spread {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
