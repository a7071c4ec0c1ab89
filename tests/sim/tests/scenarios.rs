//! The scenarios a review found in the asynchronous coordinator (issue 13),
//! each as a scripted schedule on the simulated cluster: the messages that
//! were lost, late or cut off then are lost, late or cut off here, and the
//! final checks (every acknowledged answer against the SKUs, nothing held
//! past the TTLs, no order open) must find nothing.

use flashstock_engine::coordination::{ClientAnswer, ClientRequest, PartRequest};
use flashstock_engine::{BuyerId, Line, OrderError, OrderId, OrderRequest, Quantity, SkuId};
use flashstock_sim::{Endpoint, Message, Scripted, Verdict};

const MEMBERS: u32 = 3;
const SKUS: usize = 12;

/// Two SKUs on different members, and a member owning neither.
fn spread(cluster: &Scripted) -> (String, String) {
    let skus: Vec<String> = (0..SKUS).map(|index| format!("sku-{index}")).collect();
    let first = skus[0].clone();
    let second = skus
        .iter()
        .find(|sku| cluster.owner_of(sku) != cluster.owner_of(&first))
        .expect("some SKU lives on another member")
        .clone();
    (first, second)
}

/// An order id whose home is `member`.
fn order_homed_on(cluster: &Scripted, member: u32, tag: &str) -> String {
    (0..1_000).map(|index| format!("{tag}-{index}")).find(|order| cluster.home_of(order) == member).expect("found")
}

fn reserve(order: &str, lines: &[(&str, u32)], ttl_ms: u64) -> ClientRequest {
    ClientRequest::Reserve(OrderRequest {
        order: OrderId::new(order).expect("valid"),
        buyer: BuyerId::new("buyer").expect("valid"),
        lines: lines
            .iter()
            .map(|&(sku, units)| Line { sku: SkuId::new(sku).expect("valid"), quantity: Quantity::Exactly(units) })
            .collect(),
        ttl_ms,
    })
}

fn commit(order: &str, fewer: &[(&str, u32)]) -> ClientRequest {
    ClientRequest::Commit {
        order: OrderId::new(order).expect("valid"),
        fewer: fewer.iter().map(|&(sku, units)| (SkuId::new(sku).expect("valid"), units)).collect(),
    }
}

fn release(order: &str) -> ClientRequest {
    ClientRequest::Release { order: OrderId::new(order).expect("valid") }
}

fn lines(answer: &ClientAnswer) -> Vec<(String, u32)> {
    match answer {
        ClientAnswer::Reserved { lines, .. } | ClientAnswer::Committed { lines, .. } => {
            lines.iter().map(|(sku, units)| (sku.as_str().to_owned(), *units)).collect()
        }
        other => panic!("no lines in {other:?}"),
    }
}

fn assert_clean(cluster: Scripted) {
    let violations = cluster.finish();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

fn is_part_step(message: &Message, to: Endpoint, member: u32, step: fn(&PartRequest) -> bool) -> bool {
    matches!(message, Message::Part { message: part, .. } if step(&part.request)) && to == Endpoint::Member(member)
}

/// Scenario 1: a conflicting retry of an acknowledged spanning order is
/// refused and the original stays whole: its commit sells every line.
#[test]
fn a_refused_conflicting_retry_leaves_the_original_order_whole() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = "o-1";
    let held = cluster.call(reserve(order, &[(&a, 1), (&b, 1)], 10_000));
    assert_eq!(lines(&held), vec![(a.clone(), 1), (b.clone(), 1)]);
    let retry = cluster.call(reserve(order, &[(&a, 1), (&b, 2)], 10_000));
    assert_eq!(retry, ClientAnswer::Refused(OrderError::IdempotencyConflict));
    let committed = cluster.call(commit(order, &[]));
    assert_eq!(lines(&committed), vec![(a.clone(), 1), (b.clone(), 1)]);
    assert_eq!((cluster.stock(&a).sold, cluster.stock(&b).sold), (1, 1));
    assert_clean(cluster);
}

/// Scenario 2: a commit of too many units, of zero units, or naming a SKU
/// twice or outside the order is refused before anything is prepared or
/// logged; the order can still be released, and then nothing is sold.
#[test]
fn a_refused_commit_changes_nothing() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = "o-2";
    cluster.call(reserve(order, &[(&a, 2), (&b, 1)], 10_000));
    let before = (cluster.stock(&a), cluster.stock(&b));
    for fewer in
        [vec![(b.as_str(), 5)], vec![(a.as_str(), 0)], vec![(a.as_str(), 1), (a.as_str(), 1)], vec![("sku-x", 1)]]
    {
        let answer = cluster.call(commit(order, &fewer));
        assert!(
            matches!(answer, ClientAnswer::Refused(OrderError::InvalidUnits { .. } | OrderError::NotInOrder { .. })),
            "{fewer:?}: {answer:?}"
        );
        assert_eq!((cluster.stock(&a), cluster.stock(&b)), before, "{fewer:?} changed stock");
    }
    assert!(matches!(cluster.call(release(order)), ClientAnswer::Released { replayed: false, .. }));
    assert_clean(cluster);
}

/// Scenario 3: a participant's prepare cut off part-way (its answer lost
/// until the commit's deadline): the commit is refused as retryable, and
/// the retry finishes it.
#[test]
fn a_participant_step_cut_off_part_way_is_finished_by_the_retry() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = order_homed_on(&cluster, cluster.owner_of(&a), "o-3");
    let remote = cluster.owner_of(&b);
    cluster.call(reserve(&order, &[(&a, 1), (&b, 1)], 30_000));
    cluster.intercept(move |from, _, message| match message {
        Message::PartReply { .. } if from == Endpoint::Member(remote) => Verdict::Drop,
        _ => Verdict::Deliver,
    });
    let cut_off = cluster.send(commit(&order, &[]));
    cluster.run_for(2_000);
    assert_eq!(cluster.answers(cut_off), [ClientAnswer::Refused(OrderError::Unavailable)]);
    cluster.intercept(|_, _, _| Verdict::Deliver);
    let committed = cluster.call(commit(&order, &[]));
    assert_eq!(lines(&committed), vec![(a.clone(), 1), (b.clone(), 1)]);
    assert_clean(cluster);
}

/// Scenario 4 (found by the simulator, seed 66): a copy of a prepare that
/// arrives after its commit gave up must not leave the line prepared for
/// ever, nor let a later decision meet a line that has expired.
#[test]
fn a_late_prepare_cannot_strand_a_hold_or_split_the_order() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = order_homed_on(&cluster, cluster.owner_of(&a), "o-4");
    let remote = cluster.owner_of(&b);
    cluster.call(reserve(&order, &[(&a, 1), (&b, 1)], 3_000));
    cluster.intercept(move |_, to, message| {
        if is_part_step(message, to, remote, |step| matches!(step, PartRequest::Prepare { .. })) {
            Verdict::Hold
        } else {
            Verdict::Deliver
        }
    });
    let gave_up = cluster.send(commit(&order, &[]));
    cluster.run_for(1_500);
    assert_eq!(cluster.answers(gave_up), [ClientAnswer::Refused(OrderError::Unavailable)]);
    cluster.intercept(|_, _, _| Verdict::Deliver);
    assert!(cluster.deliver_held() >= 1, "the prepares were held back");
    cluster.run_for(5_000);
    let late = cluster.call(commit(&order, &[]));
    assert!(matches!(late, ClientAnswer::Refused(OrderError::Expired { .. })), "{late:?}");
    assert_eq!(cluster.stock(&b).held, 0, "the late-prepared line went back when the order's time passed");
    assert_clean(cluster);
}

/// Scenarios 5 and 6: a remote part prepared when the coordinator died
/// before deciding (the prepare's answer lost); the coordinator restarts
/// after the order's time, and the part's prepared hold ends.
#[test]
fn a_prepared_part_ends_after_its_coordinator_restarts() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let home = cluster.owner_of(&a);
    let order = order_homed_on(&cluster, home, "o-5");
    let remote = cluster.owner_of(&b);
    cluster.call(reserve(&order, &[(&a, 1), (&b, 1)], 2_000));
    cluster.intercept(move |from, _, message| match message {
        Message::PartReply { .. } if from == Endpoint::Member(remote) => Verdict::Drop,
        _ => Verdict::Deliver,
    });
    cluster.send(commit(&order, &[]));
    cluster.run_for(50);
    assert_eq!(cluster.stock(&b).held, 1);
    cluster.crash(home);
    cluster.run_for(10_000);
    assert_eq!(cluster.stock(&b).held, 1, "a prepared hold waits for its coordinator");
    cluster.intercept(|_, _, _| Verdict::Deliver);
    cluster.restart(home);
    cluster.run_for(2_000);
    assert_eq!(cluster.stock(&b).held, 0, "the restarted coordinator released the expired order");
    assert_clean(cluster);
}

/// Scenario 7: commits retried while the decision is being carried out,
/// and a participant down meanwhile: no answer is `Committed` before every
/// line is sold, every `Committed` names every line, and every line is sold
/// once the participant is back.
#[test]
fn racing_commit_retries_answer_only_for_the_whole_order() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = order_homed_on(&cluster, cluster.owner_of(&a), "o-7");
    let remote = cluster.owner_of(&b);
    cluster.call(reserve(&order, &[(&a, 1), (&b, 2)], 30_000));
    let mut commits_to_remote = 0;
    cluster.intercept(move |_, to, message| {
        if is_part_step(message, to, remote, |step| matches!(step, PartRequest::Commit { .. })) {
            commits_to_remote += 1;
            if commits_to_remote == 1 {
                return Verdict::Drop;
            }
        }
        Verdict::Deliver
    });
    let first = cluster.send(commit(&order, &[]));
    // Decided, the first commit to the remote part lost; then it dies.
    for _ in 0..100 {
        if cluster.stock(&a).sold == 1 {
            break;
        }
        cluster.run_for(1);
    }
    assert_eq!(cluster.stock(&a).sold, 1, "the local part is committed");
    cluster.crash(remote);
    let second = cluster.send(commit(&order, &[]));
    cluster.run_for(1_000);
    let third = cluster.send(commit(&order, &[]));
    cluster.run_for(1_000);
    let early = [first, second, third].into_iter().flat_map(|caller| cluster.answers(caller).to_vec());
    assert!(
        !early.into_iter().any(|answer| matches!(answer, ClientAnswer::Committed { .. })),
        "committed answered while a line was not sold"
    );
    cluster.restart(remote);
    cluster.run_for(2_000);
    // Each caller is answered `Committed` with every line, or told to retry
    // (a later retry took its place); the last one is answered once the
    // remote part is back and committed.
    for caller in [first, second, third] {
        for answer in cluster.answers(caller) {
            match answer {
                ClientAnswer::Committed { .. } => assert_eq!(lines(answer), vec![(a.clone(), 1), (b.clone(), 2)]),
                ClientAnswer::Refused(error) => assert!(error.is_retryable(), "{error:?}"),
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(
        cluster.answers(third).iter().any(|answer| matches!(answer, ClientAnswer::Committed { .. })),
        "{:?}",
        cluster.answers(third)
    );
    assert_eq!((cluster.stock(&a).sold, cluster.stock(&b).sold), (1, 2));
    assert_clean(cluster);
}

/// Scenario 8: an order id names one order in the whole cluster, whatever
/// its first line: the same id with another first line, or with a line
/// added on another member, is refused and changes nothing.
#[test]
fn one_order_id_is_one_order_across_the_cluster() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let order = "o-8";
    cluster.call(reserve(order, &[(&a, 2)], 10_000));
    let before = (cluster.stock(&a), cluster.stock(&b));
    let other_first_line = cluster.call(reserve(order, &[(&b, 2)], 10_000));
    assert_eq!(other_first_line, ClientAnswer::Refused(OrderError::IdempotencyConflict));
    let added_line = cluster.call(reserve(order, &[(&a, 2), (&b, 1)], 10_000));
    assert_eq!(added_line, ClientAnswer::Refused(OrderError::IdempotencyConflict));
    assert_eq!((cluster.stock(&a), cluster.stock(&b)), before);
    let committed = cluster.call(commit(order, &[]));
    assert_eq!(lines(&committed), vec![(a.clone(), 2)]);
    assert_eq!((cluster.stock(&a).sold, cluster.stock(&b).sold), (2, 0), "the buyer paid for 2 units; 2 were sold");
    assert_clean(cluster);
}

/// Scenario 9: the answers around spanning orders say what happened: a
/// commit of fewer units after the order's time is `Expired`, a release
/// then is `Expired` too, and after the home restarts a replayed
/// reservation lists the lines in the order's line order.
#[test]
fn answers_around_spanning_orders_tell_the_truth() {
    let mut cluster = Scripted::new(MEMBERS, SKUS);
    let (a, b) = spread(&cluster);
    let expiring = "o-9a";
    cluster.call(reserve(expiring, &[(&a, 2), (&b, 1)], 1_000));
    cluster.run_for(1_500);
    let late = cluster.call(commit(expiring, &[(&a, 1)]));
    assert!(matches!(late, ClientAnswer::Refused(OrderError::Expired { .. })), "{late:?}");
    assert!(matches!(cluster.call(release(expiring)), ClientAnswer::Refused(OrderError::Expired { .. })));

    let order = "o-9b";
    let home = cluster.home_of(order);
    let first = cluster.call(reserve(order, &[(&b, 1), (&a, 3)], 60_000));
    assert_eq!(lines(&first), vec![(b.clone(), 1), (a.clone(), 3)]);
    cluster.run_for(100);
    cluster.crash(home);
    cluster.restart(home);
    cluster.run_for(100);
    let replayed = cluster.call(reserve(order, &[(&b, 1), (&a, 3)], 60_000));
    assert!(matches!(replayed, ClientAnswer::Reserved { replayed: true, .. }), "{replayed:?}");
    assert_eq!(lines(&replayed), lines(&first));
    let released = cluster.call(release(order));
    assert!(matches!(released, ClientAnswer::Released { .. }), "{released:?}");
    assert_eq!(cluster.call(commit(order, &[])), ClientAnswer::Refused(OrderError::AlreadyReleased));
    assert_clean(cluster);
}
