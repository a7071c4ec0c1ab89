//! Orders whose lines live on several members, against real member
//! processes: all or nothing on reserve, commit and release, and a
//! coordinator that dies in the middle of a commit (a failpoint aborts the
//! process) finishes the order after its restart: every line sold, or every
//! line back, never some of each.

mod common;

use std::time::{Duration, Instant};

use common::{client_with_retries, runtime, sku_owned_by, wait_all_up, Cluster};
use flashstock_client::{Client, Error, Order, OrderLine, Quantity, ReservationId, Stock};

async fn client(cluster: &Cluster, identity: &str, attempts_max: u32) -> Client {
    client_with_retries(cluster, identity, attempts_max).await
}

fn order(id: &str, lines: &[(&str, u32)]) -> Order {
    Order {
        id: id.to_owned(),
        buyer: format!("buyer-of-{id}"),
        lines: lines
            .iter()
            .map(|(sku, units)| OrderLine { sku: (*sku).to_owned(), quantity: Quantity::Exactly(*units) })
            .collect(),
        hold_ttl: Duration::from_secs(60),
    }
}

fn counts(stock: Stock) -> (u64, u64, u64) {
    (stock.available, stock.held, stock.sold)
}

#[test]
fn an_order_across_members_is_all_or_nothing() {
    let cluster = Cluster::start("spanning-flow", 2);
    let members = cluster.members();
    let (a, b, c) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0), sku_owned_by(2, &members, 1));
    runtime().block_on(async {
        let admin = client(&cluster, "admin", 40).await;
        wait_all_up(&admin).await;
        admin.create_sku(&a, 5, None, 0).await.expect("created");
        admin.create_sku(&b, 5, None, 0).await.expect("created");
        admin.create_sku(&c, 1, None, 0).await.expect("created");
        let checkout = client(&cluster, "checkout", 40).await;

        let held = checkout.reserve(&order("o1", &[(&a, 2), (&b, 3)])).await.expect("held on both members");
        assert_eq!(
            held.lines.iter().map(|line| (line.sku.as_str(), line.units)).collect::<Vec<_>>(),
            [(a.as_str(), 2), (b.as_str(), 3)]
        );
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")), (2, 3, 0));
        let again = checkout.reserve(&order("o1", &[(&a, 2), (&b, 3)])).await.expect("the same reservation");
        assert_eq!(again.id, held.id);
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")), (2, 3, 0), "held once");
        let sold = checkout.commit(&held.id).await.expect("committed");
        assert_eq!(sold.lines.iter().map(|line| line.units).sum::<u32>(), 5);
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (3, 0, 2));
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")), (2, 0, 3));
        assert!(checkout.commit(&held.id).await.expect("the first answer again").replayed);
        assert_eq!(checkout.release(&held.id).await, Err(Error::AlreadyCommitted));

        // One part refused: nothing stays held, the refusal names the line
        // of the whole order, and the id may be used again.
        match checkout.reserve(&order("o2", &[(&a, 1), (&c, 2)])).await {
            Err(Error::SoldOut { line: 1, sku, available: 1 }) => assert_eq!(sku, c),
            other => panic!("{other:?}"),
        }
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (3, 0, 2), "the held part was undone");
        let retried = checkout.reserve(&order("o2", &[(&a, 1), (&c, 1)])).await.expect("held");
        let released = checkout.release(&retried.id).await.expect("released on both members");
        assert_eq!(released.lines.len(), 2);
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (3, 0, 2));
        assert_eq!(counts(checkout.availability(&c).await.expect("counts")), (1, 0, 0));

        // Coordinated by member 2 this time (the home of its id), with fewer units on one line.
        let o3 = common::order_homed_on(2, &members, "o3");
        let held = checkout.reserve(&order(&o3, &[(&b, 2), (&a, 2)])).await.expect("held");
        let sold = checkout.commit_fewer(&held.id, &[(a.as_str(), 1)]).await.expect("committed");
        assert_eq!(sold.lines.iter().map(|line| line.units).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (2, 0, 3));
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")), (0, 0, 5));

        // A part cannot be settled on its own: its member knows it under a
        // cluster-only id, which clients may not use.
        let held = checkout.reserve(&order("o5", &[(&a, 1), (&b, 1)])).await;
        assert!(matches!(held, Err(Error::SoldOut { line: 1, .. })), "b is sold out: {held:?}");
        let held = checkout.reserve(&order("o5", &[(&a, 1), (&c, 1)])).await.expect("held");
        let part_home = flashstock_client::routing::partition_of(&c, common::PARTITIONS);
        for order_id in ["o5", "~o5"] {
            let part = ReservationId { order: order_id.to_owned(), home_partition: part_home };
            let refused = checkout.commit(&part).await;
            assert!(matches!(refused, Err(Error::UnknownReservation | Error::Invalid { .. })), "{refused:?}");
        }
        assert_eq!(counts(checkout.availability(&c).await.expect("counts")), (0, 1, 0), "still held, not sold");
        checkout.release(&held.id).await.expect("released");

        // Too late: the order expired as a whole.
        let short = Order { hold_ttl: Duration::from_millis(1_000), ..order("o4", &[(&a, 1), (&c, 1)]) };
        let short = checkout.reserve(&short).await.expect("held");
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert!(matches!(checkout.commit(&short.id).await, Err(Error::Expired { .. })));
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (2, 0, 3));
        assert_eq!(counts(checkout.availability(&c).await.expect("counts")), (1, 0, 0));
    });
}

type Counts = (u64, u64, u64);

/// Kills the coordinator at `failpoint` during the commit of an order with
/// a line on each member, restarts it, and returns the two SKUs' counts
/// once the line on the other member has settled one way or the other,
/// and again after the client retried its commit.
fn commit_interrupted_at(name: &str, failpoint: &str) -> [(Counts, Counts); 2] {
    let mut cluster = Cluster::start(name, 2);
    let members = cluster.members();
    let (a, b) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    let runtime = runtime();
    cluster.terminate(1);
    cluster.start_node_with(1, &[("FLASHSTOCK_FAILPOINT", failpoint)]);
    let held = runtime.block_on(async {
        let admin = client(&cluster, "admin", 40).await;
        wait_all_up(&admin).await;
        admin.create_sku(&a, 5, None, 0).await.expect("created");
        admin.create_sku(&b, 5, None, 0).await.expect("created");
        let checkout = client(&cluster, "checkout", 2).await;
        // Coordinated by member 1, the one with the failpoint.
        let split_me = common::order_homed_on(1, &members, "split-me");
        let held = checkout.reserve(&order(&split_me, &[(&a, 2), (&b, 3)])).await.expect("held");
        let interrupted = checkout.commit(&held.id).await;
        assert!(matches!(interrupted, Err(ref error) if error.is_retryable()), "{interrupted:?}");
        // Member 2 still holds its line (prepared: it does not expire).
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")).1, 3);
        held
    });
    assert!(!cluster.wait_exit(1).success(), "the failpoint stopped member 1 dead");
    cluster.start_node(1);
    let checkout = runtime.block_on(client(&cluster, "checkout", 40));
    let (on_a, on_b) = runtime.block_on(async {
        wait_all_up(&checkout).await;
        // The other member's line settles once the coordinator is back.
        for _ in 0..200 {
            let on_b = counts(checkout.availability(&b).await.expect("counts"));
            let on_a = counts(checkout.availability(&a).await.expect("counts"));
            if on_b.2 == 3 || on_a.2 == 0 {
                return (on_a, on_b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the order never settled after the coordinator came back");
    });
    // Whatever the crash left, the client's retried commit finishes it.
    let settled = runtime.block_on(checkout.commit(&held.id)).expect("the commit completes");
    assert_eq!(settled.lines.iter().map(|line| line.units).sum::<u32>(), 5);
    let after = runtime.block_on(async {
        let on_a = counts(checkout.availability(&a).await.expect("counts"));
        (on_a, counts(checkout.availability(&b).await.expect("counts")))
    });
    [(on_a, on_b), after]
}

#[test]
fn a_coordinator_killed_between_line_commits_sells_every_line_after_restart() {
    let [recovered, retried] = commit_interrupted_at("spanning-between", "between-commits");
    // Decided before the crash: both lines sold, by recovery alone.
    assert_eq!(recovered, ((3, 0, 2), (2, 0, 3)));
    assert_eq!(retried, recovered, "the retried commit only answers");
}

#[test]
fn a_coordinator_killed_before_deciding_leaves_every_line_held() {
    let [recovered, retried] = commit_interrupted_at("spanning-before", "before-decision");
    // Not decided: nothing sold anywhere, both lines held again (with
    // their TTL), and the client's retried commit sold them together.
    assert_eq!(recovered, ((3, 2, 0), (2, 3, 0)));
    assert_eq!(retried, ((3, 0, 2), (2, 0, 3)));
}

/// A participant that dies: a commit of a spanning order is refused as
/// retryable while it is down (nothing sold anywhere), its part survives
/// its restart, and the order then commits on both members. An order left
/// to expire is released on every member by its coordinator.
#[test]
fn a_participant_restart_keeps_its_part_and_expired_spanning_orders_are_swept() {
    let mut cluster = Cluster::start("spanning-participant", 2);
    let members = cluster.members();
    let (a, b) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    let runtime = runtime();
    let (checkout, held) = runtime.block_on(async {
        let admin = client(&cluster, "admin", 40).await;
        wait_all_up(&admin).await;
        admin.create_sku(&a, 5, None, 0).await.expect("created");
        admin.create_sku(&b, 5, None, 0).await.expect("created");
        let checkout = client(&cluster, "checkout", 3).await;
        let kept = common::order_homed_on(1, &members, "kept");
        let held = checkout.reserve(&order(&kept, &[(&a, 1), (&b, 2)])).await.expect("held");
        let swept = common::order_homed_on(1, &members, "swept");
        let short = Order { hold_ttl: Duration::from_millis(1_000), ..order(&swept, &[(&a, 1), (&b, 1)]) };
        checkout.reserve(&short).await.expect("held");
        (checkout, held)
    });
    let open_orders = |cluster: &Cluster| {
        let (_, status) = cluster.http_get(1, "/status");
        let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
        status["spanning_orders_open"].as_u64().expect("a count")
    };
    assert_eq!(open_orders(&cluster), 2);

    cluster.kill(2);
    runtime.block_on(async {
        // Member 1 sees member 2 down within the idle timeout (3 s here).
        let mut refused = None;
        for _ in 0..100 {
            match checkout.commit(&held.id).await {
                Err(Error::Unavailable { reason }) => {
                    refused = Some(reason);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(refused.is_some(), "a commit needing a dead member is refused");
        let on_a = checkout.availability(&a).await.expect("counts");
        assert_eq!((on_a.held, on_a.sold), (1, 0), "nothing sold while a part was unreachable");
    });
    cluster.start_node(2);
    runtime.block_on(async {
        wait_all_up(&checkout).await;
        // The member asked may see the restarted one before member 1's own
        // link to it is back (member 1 then still answers `Unavailable`,
        // which is retryable): a client with room for retries.
        let patient = client(&cluster, "checkout", 40).await;
        let sold = patient.commit(&held.id).await.expect("committed once the part is back");
        assert_eq!(sold.lines.iter().map(|line| line.units).sum::<u32>(), 3);
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")).2, 2);
    });
    // The short one expired: its coordinator released every part when its
    // time passed, and neither order is open any more.
    let mut swept = false;
    for _ in 0..100 {
        if open_orders(&cluster) == 0 {
            swept = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(swept, "the expired spanning order was swept");
}

/// Scenarios of the coordination review, each of which used to lose an
/// acknowledged order or lock stock:
/// 1. a retried reserve with other content for one part was refused by that
///    part, and the failure path abandoned the *original* order's holds
///    (its commit then answered `UnknownReservation`, the part stayed held);
/// 2. a commit of fewer units that were too many, zero or named twice
///    prepared every part and logged the decision before the units were
///    checked, answered `Invalid` and left every hold prepared for good;
/// 8. a retry of the same id that adds a line on another member was
///    accepted, and the original's commit then sold the extra line.
///
/// Now each is refused with nothing changed, and the original commits.
#[test]
fn refused_retries_and_commits_of_a_spanning_order_change_nothing() {
    let cluster = Cluster::start("spanning-refusals", 2);
    let members = cluster.members();
    let (a, b, c) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0), sku_owned_by(2, &members, 1));
    runtime().block_on(async {
        let admin = client(&cluster, "admin", 40).await;
        wait_all_up(&admin).await;
        for sku in [&a, &b, &c] {
            admin.create_sku(sku, 5, None, 0).await.expect("created");
        }
        let checkout = client(&cluster, "checkout", 40).await;
        let held = checkout.reserve(&order("o1", &[(&a, 1), (&b, 1)])).await.expect("held on both members");

        let conflicting = checkout.reserve(&order("o1", &[(&a, 1), (&b, 2)])).await;
        assert_eq!(conflicting, Err(Error::IdempotencyConflict), "scenario 1");
        let extra_line = checkout.reserve(&order("o1", &[(&a, 1), (&b, 1), (&c, 1)])).await;
        assert_eq!(extra_line, Err(Error::IdempotencyConflict), "scenario 8: no line added");
        assert_eq!(counts(checkout.availability(&c).await.expect("counts")), (5, 0, 0));

        for fewer in [vec![(b.as_str(), 2)], vec![(b.as_str(), 0)], vec![(a.as_str(), 1), (a.as_str(), 1)]] {
            let refused = checkout.commit_fewer(&held.id, &fewer).await;
            assert!(matches!(refused, Err(Error::Invalid { .. })), "scenario 2, {fewer:?}: {refused:?}");
        }
        // Nothing was prepared or decided: the original commits whole.
        assert_eq!(counts(checkout.availability(&a).await.expect("counts")), (4, 1, 0));
        assert_eq!(counts(checkout.availability(&b).await.expect("counts")), (4, 1, 0));
        let sold = checkout.commit(&held.id).await.expect("the original order commits");
        assert_eq!(
            sold.lines.iter().map(|line| (line.sku.as_str(), line.units)).collect::<Vec<_>>(),
            [(a.as_str(), 1), (b.as_str(), 1)]
        );
        for sku in [&a, &b] {
            assert_eq!(counts(checkout.availability(sku).await.expect("counts")), (4, 0, 1), "{sku}");
        }
        assert_eq!(counts(checkout.availability(&c).await.expect("counts")), (5, 0, 0), "the extra line never sold");
    });
}

/// Calls to one member travel in batch frames on one session: a request
/// that waits (a spanning order whose other member is paused) must not
/// hold up the answers of the calls that travelled with it. The slow one
/// is answered when its home gives up on the paused member (the
/// coordinator's part deadline, 2 s); the others must all be answered well
/// before that. Planted bug that this catches (checked): a member giving
/// out a session's answers in the order the requests came
/// (`FuturesOrdered`), which holds every fast answer until the slow one's.
#[test]
fn a_slow_request_does_not_delay_the_others_on_its_session() {
    let cluster = Cluster::start("spanning-slow-in-batch", 2);
    let members = cluster.members();
    let (local, remote) = (sku_owned_by(1, &members, 0), sku_owned_by(2, &members, 0));
    let runtime = runtime();
    let checkout = runtime.block_on(async {
        let admin = client(&cluster, "admin", 40).await;
        wait_all_up(&admin).await;
        admin.create_sku(&local, 100, None, 0).await.expect("created");
        admin.create_sku(&remote, 100, None, 0).await.expect("created");
        // One try each: the slow call waits out its deadline instead of
        // being retried, and nothing else is retried either.
        client(&cluster, "checkout", 1).await
    });
    cluster.signal(2, "STOP");
    let fast_count = 40;
    let outcome = runtime.block_on(async {
        let slow_id = common::order_homed_on(1, &members, "slow");
        let slow = {
            let (checkout, local, remote) = (checkout.clone(), local.clone(), remote.clone());
            tokio::spawn(async move {
                let answer = checkout.reserve(&order(&slow_id, &[(&local, 1), (&remote, 1)])).await;
                (answer, Instant::now())
            })
        };
        // The slow call is on its way (and being worked on) before the
        // others are made: they travel after it on the same session, so a
        // member that answers in the order it received would hold them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut fast = tokio::task::JoinSet::new();
        for number in 0..fast_count {
            let (checkout, local) = (checkout.clone(), local.clone());
            let id = common::order_homed_on(1, &members, &format!("fast-{number}"));
            fast.spawn(async move { checkout.reserve(&order(&id, &[(&local, 1)])).await });
        }
        let mut answered = Vec::new();
        while let Some(joined) = fast.join_next().await {
            answered.push(joined.expect("the call ends"));
        }
        let fast_done_at = Instant::now();
        // Given up by its home while the member is still paused.
        let (slow_answer, slow_done_at) = slow.await.expect("the call ends");
        (fast_done_at, slow_answer, slow_done_at, answered)
    });
    let (fast_done_at, slow_answer, slow_done_at, fast) = outcome;
    cluster.signal(2, "CONT");
    assert_eq!(fast.iter().filter(|answer| answer.is_ok()).count(), fast_count, "{fast:?}");
    assert!(slow_answer.is_err(), "the spanning order was held while its member was paused: {slow_answer:?}");
    let ahead = slow_done_at.saturating_duration_since(fast_done_at);
    assert!(
        ahead >= Duration::from_millis(500),
        "the fast calls were answered only {ahead:?} before the slow one: they waited for it"
    );
    runtime.block_on(async {
        // Whatever the paused member did with the slow order's part, the
        // stock adds up once it is back.
        let counts = checkout.availability(&local).await.expect("counts");
        assert!(counts.held >= fast_count as u64, "{counts:?}");
        assert_eq!(counts.available + counts.held + counts.sold, 100, "{counts:?}");
    });
}
