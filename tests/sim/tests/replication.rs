//! Replicated groups (issue 14) under the schedules that matter most: a
//! leader cut off from its followers while clients still reach it, a
//! leader paused past an election, and a home leader lost in the middle of
//! an order. The final checks (every acknowledged answer against the
//! agreed SKUs, replicas agreeing, nothing held, no order open) must find
//! nothing.

use flashstock_engine::coordination::{ClientAnswer, ClientRequest};
use flashstock_engine::{BuyerId, Line, OrderId, OrderRequest, Quantity, SkuId};
use flashstock_sim::{Message, Scripted, Verdict};

const MEMBERS: u32 = 3;
const SKUS: usize = 12;

fn reserve(order: &str, skus: &[&str], ttl_ms: u64) -> ClientRequest {
    ClientRequest::Reserve(OrderRequest {
        order: OrderId::new(order).expect("valid"),
        buyer: BuyerId::new("buyer").expect("valid"),
        lines: skus
            .iter()
            .map(|sku| Line { sku: SkuId::new(*sku).expect("valid"), quantity: Quantity::Exactly(1) })
            .collect(),
        ttl_ms,
    })
}

fn commit(order: &str) -> ClientRequest {
    ClientRequest::Commit { order: OrderId::new(order).expect("valid"), fewer: Vec::new() }
}

fn assert_clean(cluster: Scripted) {
    let violations = cluster.finish();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

fn acknowledged(answers: &[ClientAnswer]) -> bool {
    answers.iter().any(|answer| !matches!(answer, ClientAnswer::Refused(_)))
}

/// Two SKUs whose groups are led by different members.
fn spread(cluster: &Scripted) -> (String, String) {
    let skus: Vec<String> = (0..SKUS).map(|index| format!("sku-{index}")).collect();
    let second = skus.iter().find(|sku| cluster.owner_of(sku) != cluster.owner_of(&skus[0])).expect("spread");
    (skus[0].clone(), second.clone())
}

#[test]
fn a_leader_cut_off_from_its_followers_acknowledges_nothing_while_clients_reach_it() {
    let mut cluster = Scripted::replicated(MEMBERS, SKUS, 3);
    let order = "cut-1";
    let old_leader = cluster.leader_of_home(order).expect("elected");
    cluster.cut_from_members(old_leader);
    let caller = cluster.send(reserve(order, &["sku-0", "sku-1"], 30_000));
    cluster.run_for(3_000);
    assert!(
        !cluster.answered_by(caller).contains(&old_leader),
        "the cut-off leader {old_leader} answered {:?}",
        cluster.answers(caller)
    );
    let new_leader = cluster.leader_of_home(order).expect("the majority elects a leader");
    assert_ne!(new_leader, old_leader);
    // Once it stepped down it sent the client on (its hint, or the next
    // replica), and the retry with the same id is held by the new leader.
    let held = if acknowledged(cluster.answers(caller)) {
        cluster.answers(caller).to_vec()
    } else {
        let retry = cluster.send(reserve(order, &["sku-0", "sku-1"], 30_000));
        cluster.run_for(2_000);
        cluster.answers(retry).to_vec()
    };
    assert!(acknowledged(&held), "{held:?}");
    cluster.heal();
    let committed = cluster.call(commit(order));
    assert!(matches!(committed, ClientAnswer::Committed { .. }), "{committed:?}");
    assert_clean(cluster);
}

#[test]
fn a_leader_paused_past_an_election_resumes_without_acknowledging_its_stale_view() {
    let mut cluster = Scripted::replicated(MEMBERS, SKUS, 3);
    let order = "pause-1";
    let old_leader = cluster.leader_of_home(order).expect("elected");
    // Paused and cut off, so that on resuming it has heard of no new leader.
    cluster.pause(old_leader, 3_000);
    cluster.cut_from_members(old_leader);
    let other = (1..=MEMBERS).find(|&member| member != old_leader).expect("three members");
    cluster.route_to(order, other);
    cluster.run_for(1_000);
    let held = cluster.call(reserve(order, &["sku-2"], 30_000));
    assert!(matches!(held, ClientAnswer::Reserved { .. }), "{held:?}");
    // Sent to it while it is paused: it reads the request first thing on
    // resuming, still believing it leads, with the order unknown in its
    // view. Its refusal (nothing to write) must not be given: the order is
    // held.
    cluster.route_to(order, old_leader);
    let commit_sent = cluster.send(commit(order));
    cluster.run_for(3_000);
    assert!(!cluster.answered_by(commit_sent).contains(&old_leader), "{:?}", cluster.answers(commit_sent));
    assert!(
        matches!(cluster.answers(commit_sent), [ClientAnswer::Committed { .. }]),
        "the commit is sent on to the new leader, which commits: {:?}",
        cluster.answers(commit_sent)
    );
    cluster.heal();
    assert_clean(cluster);
}

#[test]
fn the_next_leader_of_a_home_finishes_an_order_its_predecessor_decided() {
    let mut cluster = Scripted::replicated(MEMBERS, SKUS, 3);
    let (a, b) = spread(&cluster);
    let order = "home-1";
    cluster.call(reserve(order, &[&a, &b], 30_000));
    let home = cluster.leader_of_home(order).expect("elected");
    // Hold back every part's answer to the commit, then lose the home's leader.
    cluster.intercept(|_, _, message| match message {
        Message::PartReply { .. } => Verdict::Hold,
        _ => Verdict::Deliver,
    });
    let first = cluster.send(commit(order));
    cluster.run_for(300);
    cluster.crash(home);
    cluster.intercept(|_, _, _| Verdict::Deliver);
    cluster.run_for(2_000);
    let next = cluster.leader_of_home(order).expect("a new leader");
    assert_ne!(next, home);
    let retried = cluster.call(commit(order));
    assert!(matches!(retried, ClientAnswer::Committed { .. }), "first {:?}, retry {retried:?}", cluster.answers(first));
    cluster.restart(home);
    assert_clean(cluster);
}

#[test]
fn a_member_that_lost_its_disk_rejoins_empty_and_nothing_acknowledged_is_lost() {
    let mut cluster = Scripted::replicated(MEMBERS, SKUS, 3);
    let mut committed = Vec::new();
    for index in 0..6 {
        let order = format!("disk-{index}");
        let sku = format!("sku-{}", index % SKUS);
        cluster.call(reserve(&order, &[&sku], 30_000));
        let answer = cluster.call(commit(&order));
        assert!(matches!(answer, ClientAnswer::Committed { .. }), "{answer:?}");
        committed.push(order);
    }
    let lost = cluster.leader_of_home("disk-0").expect("elected");
    cluster.wipe(lost);
    cluster.run_for(1_000);
    cluster.restart(lost);
    cluster.run_for(5_000);
    assert!(!cluster.rejoining(lost), "member {lost} is counted again in every group");
    // The survivors keep serving, and after the rejoin everything is there:
    // the final checks compare every replica, the rejoined ones included.
    for order in &committed {
        let again = cluster.call(commit(order));
        assert!(matches!(again, ClientAnswer::Committed { replayed: true, .. }), "{order}: {again:?}");
    }
    // Now the other two lose one member each in turn (a crash, disk kept):
    // the rejoined member's copies are what keeps a majority.
    for member in (1..=MEMBERS).filter(|&member| member != lost) {
        cluster.crash(member);
        cluster.run_for(2_000);
        for order in &committed {
            let again = cluster.call(commit(order));
            assert!(matches!(again, ClientAnswer::Committed { replayed: true, .. }), "{order}: {again:?}");
        }
        cluster.restart(member);
        cluster.run_for(2_000);
    }
    assert_clean(cluster);
}
