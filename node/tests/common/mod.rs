//! Real member processes for the tests: a scratch directory, a
//! `cluster.toml` on free loopback ports, development certificates, and
//! start / kill / SIGTERM of members.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flashstock_client::exchange::exchange;
use flashstock_client::routing::{owner_of, partition_of};
use flashstock_client::wire::{Hello, Request, RequestBody, Response, Welcome, PROTOCOL_VERSION};
use flashstock_client::{Client, RetryPolicy};
use flashstock_node::tls;

pub const PARTITIONS: u32 = 16;

pub struct Cluster {
    pub root: PathBuf,
    pub config: PathBuf,
    pub addresses: Vec<(u32, SocketAddr)>,
    /// Each member's `/metrics`, `/health` and `/status` address.
    pub metrics_addresses: Vec<(u32, SocketAddr)>,
    /// The command each member's process runs under (empty: directly).
    pub launchers: Vec<(u32, Vec<String>)>,
    pub nodes: Vec<(u32, Child)>,
}

/// Where a member runs: its addresses, and the command that starts its
/// process (e.g. `ip netns exec <namespace>`; empty runs it directly).
pub struct Host {
    pub address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub launcher: Vec<String>,
}

/// Loopback ports the OS says are free now. Each test asks for its own, so
/// tests running in parallel never share one.
pub fn free_ports(count: usize) -> Vec<u16> {
    let sockets: Vec<UdpSocket> = (0..count).map(|_| UdpSocket::bind("127.0.0.1:0").expect("a free port")).collect();
    sockets.iter().map(|socket| socket.local_addr().expect("bound").port()).collect()
}

impl Cluster {
    pub fn start(name: &str, members: u32) -> Self {
        Self::start_with(name, members, "")
    }

    /// A cluster whose every partition is held by `factor` members.
    pub fn start_replicated(name: &str, members: u32, factor: u32) -> Self {
        Self::start_with(name, members, &format!("replication_factor = {factor}\n"))
    }

    /// A replicated cluster whose members start with extra environment
    /// variables (failpoints), by member.
    pub fn start_replicated_with(
        name: &str,
        members: u32,
        factor: u32,
        environment: &[(u32, &[(&str, &str)])],
    ) -> Self {
        let hosts = Self::loopback_hosts(members);
        Self::start_on_with(name, &format!("replication_factor = {factor}\n"), hosts, environment)
    }

    /// A cluster with `cluster_keys` added to its `[cluster]` section.
    pub fn start_with(name: &str, members: u32, cluster_keys: &str) -> Self {
        Self::start_on(name, cluster_keys, Self::loopback_hosts(members))
    }

    fn loopback_hosts(members: u32) -> Vec<Host> {
        let ports = free_ports(members as usize);
        let metrics_ports = free_tcp_ports(members as usize);
        ports
            .iter()
            .zip(&metrics_ports)
            .map(|(&port, &metrics_port)| Host {
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                metrics_address: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                launcher: Vec::new(),
            })
            .collect()
    }

    /// A cluster of one member per host (member `i + 1` on `hosts[i]`).
    pub fn start_on(name: &str, cluster_keys: &str, hosts: Vec<Host>) -> Self {
        Self::start_on_with(name, cluster_keys, hosts, &[])
    }

    fn start_on_with(name: &str, cluster_keys: &str, hosts: Vec<Host>, environment: &[(u32, &[(&str, &str)])]) -> Self {
        let root = std::env::temp_dir().join(format!("flashstock-cluster-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("scratch directory");
        let mut text = format!(
            "[cluster]\nname = \"{name}\"\npartitions = {PARTITIONS}\n{cluster_keys}\n[tls]\ndirectory = {:?}\n\n\
             [network]\nidle_timeout_ms = 3000\n",
            root.join("certs").display().to_string()
        );
        let (mut addresses, mut metrics_addresses, mut launchers) = (Vec::new(), Vec::new(), Vec::new());
        for (index, host) in hosts.into_iter().enumerate() {
            let id = index as u32 + 1;
            text.push_str(&format!(
                "\n[[members]]\nid = {id}\naddress = \"{}\"\nmetrics_address = \"{}\"\n\
                 data_directory = {:?}\n",
                host.address,
                host.metrics_address,
                root.join(format!("node-{id}")).display().to_string()
            ));
            addresses.push((id, host.address));
            metrics_addresses.push((id, host.metrics_address));
            launchers.push((id, host.launcher));
        }
        let config = root.join("cluster.toml");
        std::fs::write(&config, text).expect("config");
        let status = Command::new(env!("CARGO_BIN_EXE_flashstock-node"))
            .args(["dev-certs", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .status()
            .expect("dev-certs runs");
        assert!(status.success());
        let members = addresses.len() as u32;
        let mut cluster = Self { root, config, addresses, metrics_addresses, launchers, nodes: Vec::new() };
        for id in 1..=members {
            let extra = environment.iter().find(|(member, _)| *member == id).map_or(&[][..], |(_, extra)| *extra);
            cluster.start_node_with(id, extra);
        }
        cluster
    }

    /// Starts member `id` and waits (at most 20 s) until it serves.
    pub fn start_node(&mut self, id: u32) {
        self.start_node_with(id, &[]);
    }

    /// Starts member `id` with extra environment variables (failpoints).
    pub fn start_node_with(&mut self, id: u32, environment: &[(&str, &str)]) {
        let launcher = self.launchers.iter().find(|(member, _)| *member == id).map(|(_, launcher)| launcher.clone());
        let mut command = match launcher.as_deref() {
            Some([program, arguments @ ..]) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(env!("CARGO_BIN_EXE_flashstock-node"));
                command
            }
            _ => Command::new(env!("CARGO_BIN_EXE_flashstock-node")),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(["--id", &id.to_string()])
            // Members log at info by default; tests want only trouble.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .envs(environment.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node starts");
        let stdout = child.stdout.take().expect("piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("serving on") {
                    let _ = sender.send(());
                }
            }
        });
        receiver.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("node {id} did not start"));
        self.nodes.push((id, child));
    }

    pub fn kill(&mut self, id: u32) {
        let position = self.nodes.iter().position(|(node, _)| *node == id).expect("running");
        let (_, mut child) = self.nodes.remove(position);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// Sends member `id` a signal (`STOP` pauses it, `CONT` resumes it).
    pub fn signal(&self, id: u32, signal: &str) {
        let (_, child) = self.nodes.iter().find(|(node, _)| *node == id).expect("running");
        let status =
            Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Stops member `id` with SIGTERM and checks it exits cleanly.
    pub fn terminate(&mut self, id: u32) {
        let position = self.nodes.iter().position(|(node, _)| *node == id).expect("running");
        let (_, mut child) = self.nodes.remove(position);
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success());
        for _ in 0..200 {
            if let Some(status) = child.try_wait().expect("waits") {
                assert!(status.success(), "node {id} exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node {id} did not stop within 10 s of SIGTERM");
    }

    /// Waits (at most 10 s) for member `id` to exit by itself, and says
    /// whether it failed.
    pub fn wait_exit(&mut self, id: u32) -> std::process::ExitStatus {
        let position = self.nodes.iter().position(|(node, _)| *node == id).expect("running");
        for _ in 0..200 {
            if let Some(status) = self.nodes[position].1.try_wait().expect("waits") {
                self.nodes.remove(position);
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node {id} did not exit within 10 s");
    }

    /// `GET path` on member `id`'s operations address: the status code and
    /// the body (bounded: 5 s, whatever arrived by then).
    pub fn http_get(&self, id: u32, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let address = self.metrics_addresses.iter().find(|(node, _)| *node == id).expect("member").1;
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connects");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").expect("request written");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let code = answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let body = answer.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned());
        (code, body)
    }

    pub fn address(&self, id: u32) -> SocketAddr {
        self.addresses.iter().find(|(node, _)| *node == id).expect("member").1
    }

    pub fn members(&self) -> Vec<u32> {
        self.addresses.iter().map(|(id, _)| *id).collect()
    }

    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A SKU whose partition `owner` owns.
pub fn sku_owned_by(owner: u32, members: &[u32], skip: usize) -> String {
    (0..)
        .map(|index| format!("sku-{index}"))
        .filter(|sku| owner_of(partition_of(sku, PARTITIONS), members) == Some(owner))
        .nth(skip)
        .expect("every member owns some SKU")
}

/// An order id starting with `tag` whose home (the owner of the id's
/// partition, which coordinates it) is `home`.
#[allow(dead_code)]
pub fn order_homed_on(home: u32, members: &[u32], tag: &str) -> String {
    (0..)
        .map(|index| format!("{tag}-{index}"))
        .find(|order| owner_of(partition_of(order, PARTITIONS), members) == Some(home))
        .expect("every member is the home of some id")
}

/// TCP loopback ports the OS says are free now.
pub fn free_tcp_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    listeners.iter().map(|listener| listener.local_addr().expect("bound").port()).collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A client of `cluster` (seeded with members 1 and 2) as `identity`,
/// retrying up to `attempts_max` times, 20 ms to 250 ms apart.
pub async fn client_with_retries(cluster: &Cluster, identity: &str, attempts_max: u32) -> Client {
    let mut builder = Client::builder().seed(cluster.address(1));
    if cluster.addresses.len() > 1 {
        builder = builder.seed(cluster.address(2));
    }
    builder
        .tls_directory(&cluster.certs(), identity)
        .request_timeout(Duration::from_secs(3))
        .retry(RetryPolicy {
            attempts_max,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(250),
        })
        .connect()
        .await
        .expect("the client connects")
}

/// Waits (bounded) until every member reports every other one up.
pub async fn wait_all_up(client: &Client) {
    for _ in 0..300 {
        if client.cluster_status().await.is_ok_and(|status| status.members.iter().all(|member| member.up)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the members never all came up");
}

/// A bare connection to one node as `identity`, after the handshake.
pub struct Connection {
    pub connection: quinn::Connection,
    pub welcome: Welcome,
    _endpoint: quinn::Endpoint,
}

pub async fn connect(certs: &Path, identity: &str, node: u32, address: SocketAddr) -> anyhow::Result<Connection> {
    connect_speaking(certs, identity, node, address, vec![PROTOCOL_VERSION]).await
}

pub async fn connect_speaking(
    certs: &Path,
    identity: &str,
    node: u32,
    address: SocketAddr,
    versions: Vec<u32>,
) -> anyhow::Result<Connection> {
    let roots = tls::load_roots(certs)?;
    let crypto = tls::client_crypto(roots, tls::Identity::load(certs, identity)?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut endpoint = quinn::Endpoint::client(if address.ip().is_loopback() {
        "127.0.0.1:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    })?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint.connect(address, &tls::node_name(node))?.await?;
    let hello = Hello { versions, agent: "cluster-test".to_owned(), boot: None };
    let welcome: Welcome = exchange(&connection, &hello, Duration::from_secs(5)).await?;
    Ok(Connection { connection, welcome, _endpoint: endpoint })
}

impl Connection {
    /// Waits (at most 15 s) until the node sees every member up.
    pub async fn wait_all_up(&self) {
        for _ in 0..300 {
            if let Ok(Response::PartitionMap(map)) = self.call(RequestBody::PartitionMap).await {
                if map.members.iter().all(|member| member.up) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the members never all came up");
    }

    pub async fn call(&self, body: RequestBody) -> anyhow::Result<Response> {
        Ok(exchange(&self.connection, &Request { timeout_ms: 5_000, body }, Duration::from_secs(10)).await?)
    }
}
