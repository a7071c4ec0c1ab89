//! Real node processes on loopback, spoken to over QUIC with mutual TLS:
//! routing to the owner, typed refusals, identities, bad frames, and a
//! member killed with SIGKILL that comes back with its sales.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flashstock_client::routing::partition_of;
use flashstock_client::wire::{
    self, Hello, Refusal, Request, RequestBody, Response, Welcome, WireLine, WireQuantity, PROTOCOL_VERSION,
};
use flashstock_node::tls;

mod common;

use common::{connect, connect_speaking, runtime, sku_owned_by, Cluster, PARTITIONS};

fn reserve(order: &str, lines: &[&str]) -> RequestBody {
    RequestBody::Reserve {
        order: order.to_owned(),
        buyer: format!("buyer-{order}"),
        lines: lines
            .iter()
            .map(|sku| WireLine { sku: (*sku).to_owned(), quantity: WireQuantity::Exactly(1) })
            .collect(),
        ttl_ms: 60_000,
    }
}

#[test]
fn a_two_node_cluster_routes_refuses_and_survives_a_kill() {
    let mut cluster = Cluster::start("routing", 2);
    let members = cluster.members();
    let (mine, theirs) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    let order_one = common::order_homed_on(1, &members, "order-1");
    let runtime = runtime();
    runtime.block_on(async {
        let admin = connect(&cluster.certs(), "admin", 1, cluster.address(1)).await.expect("admin connects");
        let Welcome::Accepted { node, map, .. } = &admin.welcome else { panic!("{:?}", admin.welcome) };
        assert_eq!((*node, map.partition_count, map.members.len()), (1, PARTITIONS, 2));
        admin.wait_all_up().await;

        let create = |sku: &str| RequestBody::CreateSku {
            sku: sku.to_owned(),
            initial_units: 3,
            units_per_buyer_max: None,
            opens_at_ms: 0,
            operation: format!("create-{sku}"),
        };
        assert!(matches!(admin.call(create(&mine)).await.expect("answered"), Response::Stock { .. }));
        assert_eq!(
            admin.call(create(&theirs)).await.expect("answered"),
            Response::Refused(Refusal::WrongNode { owner: 2 })
        );
        // The same operation again is a retry, answered with the counts;
        // another operation creating the same SKU is refused.
        assert!(matches!(admin.call(create(&mine)).await.expect("answered"), Response::Stock { .. }));
        let mut other = create(&mine);
        if let RequestBody::CreateSku { operation, .. } = &mut other {
            *operation = "another-creation".to_owned();
        }
        assert!(matches!(admin.call(other).await.expect("answered"), Response::Refused(Refusal::SkuExists { .. })));

        let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects");
        assert_eq!(
            checkout.call(create("sku-x")).await.expect("answered"),
            Response::Refused(Refusal::Forbidden),
            "checkout clients cannot change stock"
        );
        let Response::Reserved { home_partition, lines, .. } =
            checkout.call(reserve(&order_one, &[&mine])).await.expect("answered")
        else {
            panic!("not reserved")
        };
        assert_eq!(lines[0].stock.held, 1);
        let settled = checkout
            .call(RequestBody::Commit { order: order_one.clone(), home_partition, fewer: vec![] })
            .await
            .expect("answered");
        assert!(matches!(&settled, Response::Settled { replayed: false, .. }), "{settled:?}");
        for index in 2..=3 {
            let order = common::order_homed_on(1, &members, &format!("order-{index}"));
            let Response::Reserved { home_partition, .. } =
                checkout.call(reserve(&order, &[&mine])).await.expect("answered")
            else {
                panic!("not reserved")
            };
            checkout.call(RequestBody::Commit { order, home_partition, fewer: vec![] }).await.expect("answered");
        }
        assert!(matches!(
            checkout.call(reserve(&common::order_homed_on(1, &members, "order-4"), &[&mine])).await.expect("answered"),
            Response::Refused(Refusal::SoldOut { line: 0, available: 0, .. })
        ));
        // An order's home is the owner of its id's partition, whatever its
        // lines: one homed on member 2 is sent there.
        assert_eq!(
            checkout.call(reserve(&common::order_homed_on(2, &members, "order-5"), &[&mine])).await.expect("answered"),
            Response::Refused(Refusal::WrongNode { owner: 2 })
        );
        // An order spanning both members is coordinated by its home: its
        // first line (sold out) refuses it whole.
        let spanning = common::order_homed_on(1, &members, "order-6");
        assert!(matches!(
            checkout.call(reserve(&spanning, &[&mine, &theirs])).await.expect("answered"),
            Response::Refused(Refusal::SoldOut { line: 0, .. })
        ));
        assert!(matches!(
            checkout.call(reserve("", &[&mine])).await.expect("answered"),
            Response::Refused(Refusal::Invalid { .. })
        ));

        // A frame that is not a request gets a typed refusal, not a hang.
        let (mut send, mut receive) = checkout.connection.open_bi().await.expect("stream");
        tokio::io::AsyncWriteExt::write_all(&mut send, &[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await.expect("written");
        send.finish().expect("finished");
        let refused: Response = wire::read_message(&mut receive).await.expect("answered");
        assert!(matches!(refused, Response::Refused(Refusal::Invalid { .. })), "{refused:?}");
        // So does a frame declaring more than the limit.
        let (mut send, mut receive) = checkout.connection.open_bi().await.expect("stream");
        tokio::io::AsyncWriteExt::write_all(&mut send, &[0xff, 0xff, 0xff, 0xff]).await.expect("written");
        send.finish().expect("finished");
        let refused: Response = wire::read_message(&mut receive).await.expect("answered");
        assert!(matches!(refused, Response::Refused(Refusal::Invalid { .. })), "{refused:?}");
    });

    // SIGKILL, restart: the sales are back and the stock still adds up.
    cluster.kill(1);
    cluster.start_node(1);
    runtime.block_on(async {
        let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("reconnects");
        match checkout.call(RequestBody::Availability { sku: mine.clone() }).await.expect("answered") {
            Response::Stock { stock, .. } => assert_eq!((stock.available, stock.held, stock.sold), (0, 0, 3)),
            other => panic!("{other:?}"),
        }
        let replayed = checkout
            .call(RequestBody::Commit {
                order: order_one.clone(),
                home_partition: partition_of(&order_one, PARTITIONS),
                fewer: vec![],
            })
            .await
            .expect("answered");
        assert!(matches!(replayed, Response::Settled { replayed: true, .. }), "{replayed:?}");
    });
    cluster.terminate(1);
    cluster.terminate(2);
}

/// With every member up, node 1 sends `request` (for node 2's SKU) to node 2.
async fn sent_to_the_owner(cluster: &Cluster, request: &RequestBody) {
    let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects");
    checkout.wait_all_up().await;
    assert_eq!(
        checkout.call(request.clone()).await.expect("answered"),
        Response::Refused(Refusal::WrongNode { owner: 2 })
    );
}

/// A member that dies is reported down and its partitions answer
/// `Unavailable` quickly (never a hang); once it is back, clients are sent
/// to it again.
#[test]
fn a_member_that_is_down_is_unavailable_quickly_until_it_returns() {
    let mut cluster = Cluster::start("liveness", 2);
    let theirs = sku_owned_by(2, &cluster.members(), 0);
    let runtime = runtime();
    let availability = RequestBody::Availability { sku: theirs.clone() };
    runtime.block_on(sent_to_the_owner(&cluster, &availability));
    cluster.kill(2);
    runtime.block_on(async {
        let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects");
        // Seen as down within the idle timeout (3 s here); every answer meanwhile is immediate.
        let started = std::time::Instant::now();
        let mut unavailable = false;
        for _ in 0..200 {
            let asked = std::time::Instant::now();
            let answer = checkout.call(availability.clone()).await.expect("answered");
            assert!(asked.elapsed() < Duration::from_secs(1), "an answer took {:?}", asked.elapsed());
            if matches!(answer, Response::Refused(Refusal::Unavailable { .. })) {
                unavailable = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(unavailable, "node 2 still counted as up after {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(6), "took {:?} to notice", started.elapsed());
        let Response::PartitionMap(map) = checkout.call(RequestBody::PartitionMap).await.expect("answered") else {
            panic!("no map")
        };
        assert_eq!(
            map.members.iter().map(|member| (member.id, member.up)).collect::<Vec<_>>(),
            vec![(1, true), (2, false)]
        );
    });
    cluster.start_node(2);
    runtime.block_on(sent_to_the_owner(&cluster, &availability));
}

/// SIGTERM in the middle of a stream of sales: the node answers what is in
/// flight, refuses the rest as `Unavailable` (or the connection closes),
/// exits 0, and after a restart every commit it acknowledged is there.
#[test]
fn sigterm_under_load_loses_no_acknowledged_sale() {
    let mut cluster = Cluster::start("drain", 1);
    let skus: Vec<String> = (0..4).map(|index| sku_owned_by(1, &cluster.members(), index)).collect();
    let runtime = runtime();
    let acknowledged = runtime.block_on(async {
        let admin = connect(&cluster.certs(), "admin", 1, cluster.address(1)).await.expect("connects");
        for sku in &skus {
            let create = RequestBody::CreateSku {
                sku: sku.clone(),
                initial_units: 1_000_000,
                units_per_buyer_max: None,
                opens_at_ms: 0,
                operation: format!("create-{sku}"),
            };
            assert!(matches!(admin.call(create).await.expect("answered"), Response::Stock { .. }));
        }
        let checkout = Arc::new(connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects"));
        let buyers: Vec<_> = (0..16)
            .map(|buyer| {
                let (checkout, skus) = (checkout.clone(), skus.clone());
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    for attempt in 0..100_000 {
                        let order = format!("b{buyer}-{attempt}");
                        let reserved = match checkout.call(reserve(&order, &[&skus[attempt % skus.len()]])).await {
                            Ok(Response::Reserved { home_partition, .. }) => home_partition,
                            Ok(Response::Refused(Refusal::Unavailable { .. })) | Err(_) => break,
                            Ok(other) => panic!("unexpected answer while stopping: {other:?}"),
                        };
                        let commit =
                            RequestBody::Commit { order: order.clone(), home_partition: reserved, fewer: vec![] };
                        match checkout.call(commit).await {
                            Ok(Response::Settled { .. }) => acknowledged.push((order, reserved)),
                            Ok(Response::Refused(Refusal::Unavailable { .. })) | Err(_) => break,
                            Ok(other) => panic!("unexpected answer while stopping: {other:?}"),
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = cluster.nodes[0].1.id();
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill runs");
        assert!(status.success());
        let mut acknowledged = Vec::new();
        for buyer in buyers {
            let finished = tokio::time::timeout(Duration::from_secs(20), buyer).await.expect("buyers stop");
            acknowledged.extend(finished.expect("buyer"));
        }
        acknowledged
    });
    assert!(acknowledged.len() > 10, "the load barely ran: {}", acknowledged.len());
    let (_, mut child) = cluster.nodes.remove(0);
    let status = child.wait().expect("reaped");
    assert!(status.success(), "exit after SIGTERM: {status}");
    cluster.start_node(1);
    runtime.block_on(async {
        let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("reconnects");
        for (order, home_partition) in &acknowledged {
            let commit = RequestBody::Commit { order: order.clone(), home_partition: *home_partition, fewer: vec![] };
            let answer = checkout.call(commit).await.expect("answered");
            assert!(matches!(answer, Response::Settled { replayed: true, .. }), "{order}: {answer:?}");
        }
    });
}

#[test]
fn peers_without_a_certificate_from_the_cluster_ca_are_refused() {
    let cluster = Cluster::start("identity", 1);
    // A second CA's "admin": valid certificate, wrong issuer.
    let stranger = cluster.root.join("stranger");
    tls::create_development_certificates(&stranger, &[1]).expect("stranger's certificates");
    let runtime = runtime();
    runtime.block_on(async {
        let roots = tls::load_roots(&cluster.certs()).expect("cluster CA");
        let crypto = tls::client_crypto(roots, tls::Identity::load(&stranger, "admin").expect("loads")).expect("tls");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic tls");
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let attempt = async {
            let connection = endpoint.connect(cluster.address(1), &tls::node_name(1))?.await?;
            let (mut send, mut receive) = connection.open_bi().await?;
            let hello = Hello { versions: vec![PROTOCOL_VERSION], agent: "stranger".to_owned(), boot: None };
            wire::write_message(&mut send, &hello).await?;
            send.finish()?;
            let welcome: Welcome = wire::read_message(&mut receive).await?;
            anyhow::Ok(welcome)
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("answered in time");
        assert!(outcome.is_err(), "a stranger was welcomed: {outcome:?}");

        // A version the node does not speak is refused with the versions it does.
        let certs = cluster.certs();
        let refused = connect_speaking(&certs, "checkout", 1, cluster.address(1), vec![99]).await.expect("answered");
        assert_eq!(refused.welcome, Welcome::Refused { supported: vec![PROTOCOL_VERSION] });

        let node = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects");
        assert!(matches!(node.welcome, Welcome::Accepted { version: PROTOCOL_VERSION, .. }));
        let (mut send, mut receive) = node.connection.open_bi().await.expect("stream");
        wire::write_message(&mut send, &Request { timeout_ms: 1_000, body: RequestBody::PartitionMap })
            .await
            .expect("written");
        send.finish().expect("finished");
        assert!(matches!(
            wire::read_message::<Response, _>(&mut receive).await.expect("answered"),
            Response::PartitionMap(_)
        ));
    });
}

/// The operator's commands: errors print the reason and exit non-zero.
#[test]
fn the_admin_commands_change_and_show_stock() {
    let cluster = Cluster::start("admin-cli", 2);
    let admin = |arguments: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_flashstock-node"))
            .args(["admin", "--config"])
            .arg(&cluster.config)
            .args(arguments)
            .output()
            .expect("admin runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let csv = cluster.root.join("skus.csv");
    std::fs::write(&csv, "sku,units,buyer_limit\nmug,40,2\nposter,7,\n").expect("csv");
    let (ok, stdout, stderr) = admin(&["create-skus", "--file", csv.to_str().expect("utf-8 path")]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("created 2 SKUs"), "{stdout}");
    let (ok, stdout, _) = admin(&["add-stock", "--sku", "poster", "--units", "3"]);
    assert!(ok && stdout.contains("poster: 10 available, 0 held, 0 sold"), "{stdout}");
    let (ok, stdout, _) = admin(&["availability", "--sku", "mug"]);
    assert!(ok && stdout.contains("mug: 40 available"), "{stdout}");
    let (ok, stdout, _) = admin(&["status"]);
    assert!(ok && stdout.contains("16 partitions") && stdout.contains("node 2 at"), "{stdout}");
    let totals: Vec<&str> = stdout.lines().filter(|line| line.contains("SKUs:")).collect();
    assert_eq!(totals.len(), 2, "{stdout}");
    // mug (40) and poster (10) live somewhere: the members' totals add up to 50 units.
    let available: u64 =
        totals.iter().filter_map(|line| line.split("SKUs: ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    assert_eq!(available, 50, "{stdout}");

    let (ok, _, stderr) = admin(&["availability", "--sku", "nothing-here"]);
    assert!(!ok && stderr.contains("no SKU nothing-here"), "{stderr}");
    let (ok, _, stderr) = admin(&["remove-stock", "--sku", "mug", "--units", "41"]);
    assert!(!ok && stderr.contains("40"), "{stderr}");
    std::fs::write(&csv, "sku,units\nlamp,many\n").expect("csv");
    let (ok, _, stderr) = admin(&["create-skus", "--file", csv.to_str().expect("utf-8 path")]);
    assert!(!ok && stderr.contains("skus.csv:2"), "{stderr}");
}

/// A session whose client sends and does not read: the member stops
/// taking its frames once its bound of requests in flight (answered but
/// not yet sent back included) is reached, and when the client reads at
/// last, every request has exactly one answer: none was dropped for want
/// of room.
#[test]
fn a_session_that_does_not_read_its_answers_is_held_back_and_loses_none() {
    /// Far more than a session's bound, its answer queue and the
    /// stream's window together hold.
    const REQUESTS: u64 = 20_000;
    let cluster = Cluster::start("unread", 1);
    let runtime = runtime();
    runtime.block_on(async {
        let checkout = connect(&cluster.certs(), "checkout", 1, cluster.address(1)).await.expect("connects");
        let (mut send, mut receive) = checkout.connection.open_bi().await.expect("a stream");
        let open = Request { timeout_ms: 5_000, body: RequestBody::OpenSession };
        wire::write_message(&mut send, &open).await.expect("sent");
        let opened: Response = wire::read_message(&mut receive).await.expect("opened");
        assert!(matches!(opened, Response::SessionOpened { .. }), "{opened:?}");
        // Refused at once by the member (the prefix is the cluster's own),
        // so the answers come as fast as the member can give them.
        let writer = tokio::spawn(async move {
            let mut id = 0;
            while id < REQUESTS {
                let mut frame = wire::BatchEncoder::new(wire::BATCH_REQUESTS_MAX);
                while id < REQUESTS && frame.len() < wire::BATCH_REQUESTS_MAX {
                    let request = Request { timeout_ms: 5_000, body: reserve(&format!("~unread-{id}"), &["sku"]) };
                    frame.push(id, &request).expect("fits");
                    id += 1;
                }
                send.write_all(&frame.finish()).await.expect("the member reads on");
            }
            send
        });
        // Not reading for a while: the member must hold the rest back.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(!writer.is_finished(), "the member took every frame without its answers being read");
        let mut answered = vec![0u32; REQUESTS as usize];
        let mut count = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while count < REQUESTS {
            let payload = tokio::time::timeout_at(deadline, wire::read_payload(&mut receive))
                .await
                .unwrap_or_else(|_| panic!("only {count} of {REQUESTS} answers arrived"))
                .expect("reads")
                .expect("the member keeps the session open");
            for (id, bytes) in wire::decode_batch(&payload).expect("a batch") {
                let response: Response = wire::decode_payload(bytes).expect("an answer");
                assert!(matches!(response, Response::Refused(Refusal::Invalid { .. })), "{response:?}");
                answered[usize::try_from(id).expect("small")] += 1;
                count += 1;
            }
        }
        assert!(answered.iter().all(|&answers| answers == 1), "every request answered exactly once");
        let mut send = tokio::time::timeout(Duration::from_secs(10), writer).await.expect("sent").expect("writer");
        send.finish().expect("finished");
    });
}
