//! The client crate against real member processes: it routes to owners by
//! itself, retries safely with the same idempotency key, follows a member
//! that restarts, and turns every refusal into a typed error.

mod common;

use std::time::Duration;

use common::{client_with_retries, runtime, sku_owned_by, wait_all_up, Cluster};
use flashstock_client::{Client, Error, Order, OrderLine, Quantity, RetryPolicy};

async fn client(cluster: &Cluster, identity: &str) -> Client {
    client_with_retries(cluster, identity, 40).await
}

fn order(id: &str, sku: &str, units: u32) -> Order {
    Order {
        id: id.to_owned(),
        buyer: format!("buyer-of-{id}"),
        lines: vec![OrderLine { sku: sku.to_owned(), quantity: Quantity::Exactly(units) }],
        hold_ttl: Duration::from_secs(60),
    }
}

#[test]
fn a_checkout_flow_across_two_members() {
    let cluster = Cluster::start("client-flow", 2);
    let members = cluster.members();
    let (on_one, on_two) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    runtime().block_on(async {
        let admin = client(&cluster, "admin").await;
        wait_all_up(&admin).await;
        let status = admin.cluster_status().await.expect("status");
        assert_eq!(status.members.iter().map(|member| member.partitions).sum::<u32>(), status.partition_count);
        // Admin requests go to each SKU's owner without the caller knowing it.
        admin.create_sku(&on_one, 2, Some(1), 0).await.expect("created on node 1");
        admin.create_sku(&on_two, 5, None, 0).await.expect("created on node 2");
        assert!(matches!(admin.create_sku(&on_two, 5, None, 0).await, Err(Error::SkuExists { .. })));

        let checkout = client(&cluster, "checkout").await;
        assert_eq!(checkout.create_sku("another", 1, None, 0).await, Err(Error::Forbidden));

        let held = checkout.reserve(&order("a", &on_two, 2)).await.expect("held");
        assert_eq!(held.lines[0].stock.held, 2);
        // The same order again is the same reservation, not a second hold.
        let again = checkout.reserve(&order("a", &on_two, 2)).await.expect("same reservation");
        assert_eq!(again.id, held.id);
        assert_eq!(checkout.availability(&on_two).await.expect("counts").held, 2);
        assert_eq!(checkout.reserve(&order("a", &on_two, 3)).await, Err(Error::IdempotencyConflict));

        let sold = checkout.commit(&held.id).await.expect("committed");
        assert_eq!((sold.lines[0].units, sold.replayed), (2, false));
        assert!(checkout.commit(&held.id).await.expect("replayed").replayed);
        assert_eq!(checkout.release(&held.id).await, Err(Error::AlreadyCommitted));

        let cancelled = checkout.reserve(&order("b", &on_two, 1)).await.expect("held");
        checkout.release(&cancelled.id).await.expect("released");
        assert_eq!(checkout.availability(&on_two).await.expect("counts").available, 3);

        // Typed refusals.
        match checkout.reserve(&order("c", &on_two, 4)).await {
            Err(Error::SoldOut { line: 0, sku, available: 3 }) => assert_eq!(sku, on_two),
            other => panic!("{other:?}"),
        }
        checkout.reserve(&order("d", &on_one, 1)).await.expect("held");
        assert!(matches!(
            checkout.reserve(&Order { buyer: "buyer-of-d".to_owned(), ..order("e", &on_one, 1) }).await,
            Err(Error::LimitExceeded { units_per_buyer_max: 1, .. })
        ));
        assert!(matches!(checkout.availability("no-such-sku").await, Err(Error::UnknownSku { .. })));
        assert!(matches!(checkout.reserve(&order("", &on_one, 1)).await, Err(Error::Invalid { .. })));
        let home_partition = flashstock_client::routing::partition_of("never", common::PARTITIONS);
        let unknown = flashstock_client::ReservationId { order: "never".to_owned(), home_partition };
        assert_eq!(checkout.commit(&unknown).await, Err(Error::UnknownReservation));
        // A deadline too short for any answer is a typed error, after the retries.
        let impatient = Client::builder()
            .seed(cluster.address(1))
            .tls_directory(&cluster.certs(), "checkout")
            .retry(RetryPolicy { attempts_max: 1, ..RetryPolicy::default() })
            .connect()
            .await
            .expect("connects");
        let held_before = checkout.availability(&on_two).await.expect("counts").held;
        let hurried = impatient.with_request_timeout(Duration::from_micros(1));
        assert_eq!(hurried.reserve(&order("hurried", &on_two, 1)).await, Err(Error::DeadlineExceeded));
        // The work may or may not have happened; the same order again (with
        // time to answer) is held exactly once.
        impatient.reserve(&order("hurried", &on_two, 1)).await.expect("held");
        impatient.reserve(&order("hurried", &on_two, 1)).await.expect("still the same hold");
        assert_eq!(checkout.availability(&on_two).await.expect("counts").held, held_before + 1);

        let short = Order { hold_ttl: Duration::from_millis(1_000), ..order("f", &on_one, 1) };
        let short = checkout.reserve(&Order { buyer: "buyer-f".to_owned(), ..short }).await.expect("held");
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert!(matches!(checkout.commit(&short.id).await, Err(Error::Expired { .. })));
    });
}

/// A member restarts under the client: calls for its partitions are
/// retried (same idempotency key) until it is back, the reservation made
/// before the crash is found, and nothing is held twice.
#[test]
fn retries_survive_a_member_restart_without_holding_twice() {
    let mut cluster = Cluster::start("client-restart", 2);
    let on_two = sku_owned_by(2, &cluster.members(), 0);
    let runtime = runtime();
    let (checkout, held) = runtime.block_on(async {
        let admin = client(&cluster, "admin").await;
        wait_all_up(&admin).await;
        admin.create_sku(&on_two, 10, None, 0).await.expect("created");
        let checkout = client(&cluster, "checkout").await;
        let held = checkout.reserve(&order("kept", &on_two, 3)).await.expect("held");
        (checkout, held)
    });
    cluster.kill(2);
    // Restart node 2 a moment later, while the client is already retrying.
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cluster.start_node(2);
        cluster
    });
    runtime.block_on(async {
        let again = checkout.reserve(&order("kept", &on_two, 3)).await.expect("the retried reserve succeeds");
        assert_eq!(again.id, held.id);
        let counts = checkout.availability(&on_two).await.expect("counts");
        assert_eq!((counts.available, counts.held, counts.sold), (7, 3, 0), "held once, not twice");
        checkout.commit(&held.id).await.expect("committed after the restart");
    });
    let _cluster = restart.join().expect("restarted");
}

/// A rolling restart under load: each member in turn gets SIGTERM and is
/// started again while buyers keep buying through the client. The client
/// retries what the restarting member cannot answer; afterwards every
/// acknowledged sale is there and every SKU adds up.
#[test]
fn a_rolling_restart_under_load_loses_no_acknowledged_sale() {
    const UNITS: u64 = 100_000;
    let mut cluster = Cluster::start("client-rolling", 3);
    let members = cluster.members();
    let skus: Vec<String> =
        members.iter().flat_map(|id| (0..2).map(|index| sku_owned_by(*id, &members, index))).collect();
    let runtime = runtime();
    let checkout = runtime.block_on(async {
        let admin = client(&cluster, "admin").await;
        wait_all_up(&admin).await;
        for sku in &skus {
            admin.create_sku(sku, UNITS, None, 0).await.expect("created");
        }
        client(&cluster, "checkout").await
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let buyers: Vec<_> = (0..8)
        .map(|buyer| {
            let (checkout, skus, stop) = (checkout.clone(), skus.clone(), stop.clone());
            runtime.spawn(async move {
                let mut acknowledged = Vec::new();
                for attempt in 0..1_000_000usize {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let sku = &skus[(buyer + attempt) % skus.len()];
                    let held = match checkout.reserve(&order(&format!("r{buyer}-{attempt}"), sku, 1)).await {
                        Ok(held) => held,
                        // Retries ran out while a member was down: the buyer tries again later.
                        Err(error) if error.is_retryable() => continue,
                        Err(other) => panic!("unexpected refusal: {other}"),
                    };
                    // A commit is retried until it is answered: the buyer has paid.
                    for _ in 0..100 {
                        match checkout.commit(&held.id).await {
                            Ok(_) => {
                                acknowledged.push(held.id.clone());
                                break;
                            }
                            Err(error) if error.is_retryable() => continue,
                            Err(other) => panic!("unexpected refusal of a commit: {other}"),
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();
    for id in members.clone() {
        std::thread::sleep(Duration::from_millis(400));
        cluster.terminate(id);
        cluster.start_node(id);
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged: Vec<_> = runtime.block_on(async {
        let mut all = Vec::new();
        for buyer in buyers {
            let finished = tokio::time::timeout(Duration::from_secs(60), buyer).await.expect("buyers stop");
            all.extend(finished.expect("buyer"));
        }
        all
    });
    assert!(acknowledged.len() > 50, "the load barely ran: {}", acknowledged.len());
    eprintln!("{} sales acknowledged across the rolling restart", acknowledged.len());
    runtime.block_on(async {
        let mut sold = 0;
        for sku in &skus {
            let counts = checkout.availability(sku).await.expect("counts");
            assert_eq!(counts.available + counts.held + counts.sold, UNITS, "{sku}: {counts:?}");
            sold += counts.sold;
        }
        assert!(sold >= acknowledged.len() as u64, "{sold} sold, {} acknowledged", acknowledged.len());
        for id in &acknowledged {
            let replayed = checkout.commit(id).await.unwrap_or_else(|error| panic!("{id}: {error}"));
            assert!(replayed.replayed, "{id} was not committed before");
        }
    });
}

/// The scenario: `add_stock(sku, 2)` sent while the owner was
/// paused for 2.5 s was retried by the client after its 1 s timeout, both
/// copies were applied when the owner resumed, 4 units were added, and the
/// member then sold units the warehouse never had. The client now keeps one
/// operation id across the retries of a call, and the owner applies an
/// operation once.
#[test]
fn an_admin_change_retried_across_a_paused_owner_is_applied_once() {
    let cluster = Cluster::start("client-admin-paused", 1);
    let sku = sku_owned_by(1, &cluster.members(), 0);
    let runtime = runtime();
    let admin = runtime.block_on(async {
        let admin = Client::builder()
            .seed(cluster.address(1))
            .tls_directory(&cluster.certs(), "admin")
            .request_timeout(Duration::from_secs(1))
            .retry(RetryPolicy {
                attempts_max: 20,
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_millis(250),
            })
            .connect()
            .await
            .expect("the client connects");
        admin.create_sku(&sku, 5, None, 0).await.expect("created");
        admin
    });
    cluster.signal(1, "STOP");
    let adding = {
        let (admin, sku) = (admin.clone(), sku.clone());
        runtime.spawn(async move { admin.add_stock(&sku, 2).await })
    };
    std::thread::sleep(Duration::from_millis(2_500));
    cluster.signal(1, "CONT");
    runtime.block_on(async {
        let added = adding.await.expect("the call ends").expect("added");
        assert_eq!(added.available, 7, "{added:?}");
        // Whatever copies of the retried call were still in flight are
        // answered by now, and none added anything.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counts = admin.availability(&sku).await.expect("counts");
        assert_eq!((counts.available, counts.held, counts.sold), (7, 0, 0), "added once, not per retry");
        let checkout = client(&cluster, "checkout").await;
        for buyer in 0..7 {
            checkout.reserve(&order(&format!("buyer-{buyer}"), &sku, 1)).await.expect("in stock");
        }
        let oversold = checkout.reserve(&order("one-too-many", &sku, 1)).await;
        assert!(matches!(oversold, Err(Error::SoldOut { .. })), "{oversold:?}");
    });
}

/// An operation id given by the caller is remembered by the owner across a
/// kill -9 and restart: the same change again is answered as done and
/// changes nothing; the same id with another change is refused.
#[test]
fn an_admin_operation_is_remembered_across_an_owner_restart() {
    let mut cluster = Cluster::start("client-admin-restart", 1);
    let sku = sku_owned_by(1, &cluster.members(), 0);
    let runtime = runtime();
    runtime.block_on(async {
        let admin = client(&cluster, "admin").await;
        admin.admin("create-it").create_sku(&sku, 5, None, 0).await.expect("created");
        admin.admin("restock-1").add_stock(&sku, 2).await.expect("added");
        admin.admin("clearance-1").remove_stock(&sku, 3).await.expect("removed");
    });
    cluster.kill(1);
    cluster.start_node(1);
    runtime.block_on(async {
        let admin = client(&cluster, "admin").await;
        let again = admin.admin("create-it").create_sku(&sku, 5, None, 0).await.expect("the creation's retry");
        assert_eq!(again.available, 4);
        let other = admin.admin("create-again").create_sku(&sku, 5, None, 0).await;
        assert!(matches!(other, Err(Error::SkuExists { .. })), "{other:?}");
        assert_eq!(admin.admin("restock-1").add_stock(&sku, 2).await.expect("a retry").available, 4);
        assert_eq!(admin.admin("clearance-1").remove_stock(&sku, 3).await.expect("a retry").available, 4);
        let conflict = admin.admin("restock-1").add_stock(&sku, 3).await;
        assert!(matches!(conflict, Err(Error::IdempotencyConflict)), "{conflict:?}");
        let counts = admin.availability(&sku).await.expect("counts");
        assert_eq!((counts.available, counts.held, counts.sold), (4, 0, 0), "5 + 2 - 3, each once");
        assert_eq!(admin.admin("restock-2").add_stock(&sku, 1).await.expect("a new operation").available, 5);
    });
}
