//! What an operator sees of real members: Prometheus metrics that move
//! with the requests, a health check, a status page, and JSON logs.

mod common;

use std::time::Duration;

use common::{client_with_retries, runtime, sku_owned_by, Cluster};
use flashstock_client::{Client, Order, OrderLine, Quantity};

async fn client(cluster: &Cluster, identity: &str) -> Client {
    client_with_retries(cluster, identity, 40).await
}

/// The value of the first sample line of `metrics` that starts with `name`
/// and contains every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_health_and_status_follow_the_sale() {
    let cluster = Cluster::start("operations", 2);
    let members = cluster.members();
    let (on_one, on_two) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    assert_eq!(cluster.http_get(1, "/health"), (200, "ready\n".to_owned()));
    let (code, _) = cluster.http_get(1, "/nowhere");
    assert_eq!(code, 404);

    runtime().block_on(async {
        let admin = client(&cluster, "admin").await;
        admin.create_sku(&on_one, 10, None, 0).await.expect("created");
        admin.create_sku(&on_two, 10, None, 0).await.expect("created");
        let checkout = client(&cluster, "checkout").await;
        for index in 0..3 {
            // Orders whose home is member 1, whose metrics are read below.
            let order = Order {
                id: common::order_homed_on(1, &members, &format!("order-{index}")),
                buyer: format!("buyer-{index}"),
                lines: vec![OrderLine { sku: on_one.clone(), quantity: Quantity::Exactly(2) }],
                hold_ttl: Duration::from_secs(60),
            };
            let held = checkout.reserve(&order).await.expect("held");
            checkout.commit(&held.id).await.expect("sold");
        }
        // One more, spanning both members, left held.
        let spanning = Order {
            id: common::order_homed_on(1, &members, "spanning"),
            buyer: "buyer-spanning".to_owned(),
            lines: vec![
                OrderLine { sku: on_one.clone(), quantity: Quantity::Exactly(1) },
                OrderLine { sku: on_two.clone(), quantity: Quantity::Exactly(1) },
            ],
            hold_ttl: Duration::from_secs(60),
        };
        checkout.reserve(&spanning).await.expect("held on both");
    });

    let (code, metrics) = cluster.http_get(1, "/metrics");
    assert_eq!(code, 200);
    assert!(sample(&metrics, "flashstock_requests_total", &["kind=\"commit\"", "outcome=\"ok\""]) >= Some(3.0));
    assert!(sample(&metrics, "flashstock_request_seconds_count", &["kind=\"reserve\""]) >= Some(4.0), "{metrics}");
    assert_eq!(sample(&metrics, "flashstock_peer_up", &["member=\"2\""]), Some(1.0));
    assert!(sample(&metrics, "flashstock_log_fsyncs_total", &[]) > Some(0.0));
    assert_eq!(sample(&metrics, "flashstock_spanning_orders_open", &[]), Some(1.0));
    let sold: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("flashstock_partition_units") && line.contains("state=\"sold\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(sold, 6.0, "three orders of two units sold on member 1");
    // Member 2 answered the coordinator's reserve of its part.
    let (_, metrics_two) = cluster.http_get(2, "/metrics");
    // (At least once: a step the coordinator sent again counts again.)
    assert!(sample(&metrics_two, "flashstock_requests_total", &["kind=\"part\"", "outcome=\"ok\""]) >= Some(1.0));

    // Every series the Grafana dashboard reads is one the member exports
    // (the snapshot time appears once a snapshot was taken).
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../dashboards/flashstock.json")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for target in panels.iter().flat_map(|panel| panel["targets"].as_array().expect("targets")) {
        let expression = target["expr"].as_str().expect("an expression");
        for name in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            // (Replication's series come from replicated members: the
            // replication test checks those.)
            let replicated = REPLICATION_SERIES.iter().any(|prefix| name.starts_with(prefix));
            if name.starts_with("flashstock_") && name != "flashstock_last_snapshot_unix_seconds" && !replicated {
                assert!(metrics.contains(name), "the dashboard reads {name}, which no member exports");
            }
        }
    }

    let (code, status) = cluster.http_get(1, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["node"], 1);
    assert_eq!(status["sold"], 6);
    assert_eq!(status["held"], 1);
    assert_eq!(status["hottest_skus"][0]["sku"], on_one.as_str());
    assert_eq!(status["members"].as_array().map(Vec::len), Some(2));
}

/// Prefixes of the series only a replicated member exports.
const REPLICATION_SERIES: [&str; 3] = ["flashstock_group_", "flashstock_leader_", "flashstock_raft_"];

#[test]
fn a_member_logs_json_lines_when_asked() {
    use std::io::BufRead;
    let mut cluster = Cluster::start("json-logs", 1);
    cluster.terminate(1);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashstock-node"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cluster.config)
        .args(["--id", "1"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut recovered = None;
    while let Ok(line) = receiver.recv_timeout(Duration::from_secs(20)) {
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if entry["fields"]["message"] == "recovered" {
            recovered = Some(entry);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let recovered = recovered.expect("the member logged its recovery");
    assert_eq!(recovered["level"], "INFO");
    // The member's first start logged the limits in force and its
    // coordinator's first epoch, and nothing else happened before it stopped.
    assert_eq!(recovered["fields"]["records"], 2);
}
