//! The simulated flash sale behind the README's first command.
//!
//! Buyers arrive as fast as `concurrency` tasks can serve them. Most want one
//! of a few hot SKUs; the rest pick among many cold SKUs on a Zipf curve. A
//! buyer who gets a hold pays (commit), cancels (release) or walks away (the
//! hold expires). Every choice comes from a seeded generator, so two runs make
//! the same sale. At the end the books are checked, read back from the
//! shop: units sold equal units committed, nothing is oversold, and every
//! abandoned hold came back.
//!
//! The sale runs against a [`Shop`]: the engine in process, or the cluster
//! through the client crate (see [`crate::shop`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use futures_util::{StreamExt, TryStreamExt};

use crate::config::SaleSection;
use crate::shop::{CommitOutcome, Counts, ReserveOutcome, SaleLine, SaleOrder, Shop};

/// SplitMix64: tiny, seedable, and good enough to pick SKUs and behaviours.
#[derive(Debug)]
pub struct Choices(u64);

impl Choices {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// Cumulative Zipf weights of ranks `1..=n`, for sampling by binary search.
#[derive(Debug)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(count: u32, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=count)
            .map(|rank| {
                total += 1.0 / f64::from(rank).powf(exponent);
                total
            })
            .collect();
        Self { cumulative }
    }

    /// A rank in `0..count`, rank 0 the most likely.
    pub fn sample(&self, choices: &mut Choices) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let target = choices.unit() * total;
        self.cumulative.partition_point(|&weight| weight <= target).min(self.cumulative.len() - 1)
    }
}

fn hot_sku(index: u64) -> String {
    format!("hot-{index}")
}

fn cold_sku(index: usize) -> String {
    format!("cold-{index}")
}

/// What one buyer task saw.
#[derive(Debug, Default)]
struct Tally {
    /// Latency of reserves that placed a hold.
    held_latencies_us: Vec<u32>,
    /// Latency of reserves answered without a hold (sold out, limit).
    refused_latencies_us: Vec<u32>,
    held: u64,
    paid: u64,
    cancelled: u64,
    abandoned: u64,
    sold_out: u64,
    limited: u64,
    gave_up_busy: u64,
    busy_retries: u64,
    /// Buyers told to try again later: no answer in time.
    gave_up_unanswered: u64,
    /// Holds that ran out before their buyer's payment came.
    expired_before_paying: u64,
    /// Commits and releases asked again after no answer came in time.
    settle_retries: u64,
    units_committed: u64,
    /// Buyers who came before the opening and waited for it.
    early: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.held_latencies_us.extend(other.held_latencies_us);
        self.refused_latencies_us.extend(other.refused_latencies_us);
        self.held += other.held;
        self.paid += other.paid;
        self.cancelled += other.cancelled;
        self.abandoned += other.abandoned;
        self.sold_out += other.sold_out;
        self.limited += other.limited;
        self.gave_up_busy += other.gave_up_busy;
        self.busy_retries += other.busy_retries;
        self.gave_up_unanswered += other.gave_up_unanswered;
        self.expired_before_paying += other.expired_before_paying;
        self.settle_retries += other.settle_retries;
        self.units_committed += other.units_committed;
        self.early += other.early;
    }
}

/// Longest a buyer waits at the door for the opening (the configured
/// opening is at most a minute away).
const MAX_OPENING_WAIT_MS: u64 = 60_000;

fn wall_clock_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// Attempts per buyer while the engine answers `Busy`: a real checkout
/// retries a few times and then shows "try again"; so do we.
const BUSY_ATTEMPTS_MAX: u32 = 50;
/// Times a buyer asks again for a commit that got no answer in time (each
/// ask is itself retried by the client for a few seconds), a pause
/// between: a payment whose outcome is unknown must be asked until it is
/// known; past this the sale stops and says so.
const SETTLE_ASKS_MAX: u32 = 10;
const SETTLE_PAUSE_MS: u64 = 200;

struct Sale<S> {
    shop: Arc<S>,
    sale: SaleSection,
    zipf: Zipf,
    next_buyer: AtomicU64,
    /// Requests answered so far (reserve, commit, release), for progress.
    requests: AtomicU64,
    /// Set when every buyer was served; ends the progress display.
    done: std::sync::atomic::AtomicBool,
}

impl<S: Shop> Sale<S> {
    fn order_for(&self, buyer: u64) -> SaleOrder {
        let mut choices = Choices(self.sale.seed ^ buyer.wrapping_mul(0xa076_1d64_78bd_642f));
        let mut lines = Vec::with_capacity(2);
        let units = 1 + choices.below(u64::from(self.sale.units_per_buyer_max)) as u32;
        if choices.below(100) < u64::from(self.sale.hot_demand_percent) {
            lines.push(SaleLine { sku: hot_sku(choices.below(u64::from(self.sale.hot_skus))), units });
        } else {
            lines.push(SaleLine { sku: cold_sku(self.zipf.sample(&mut choices)), units });
        }
        // A quarter of buyers add an accessory from the cold catalogue; in a
        // cluster it usually lives on another member than the first line.
        if self.sale.cold_skus > 0 && choices.below(4) == 0 {
            let accessory = cold_sku(self.zipf.sample(&mut choices));
            if accessory != lines[0].sku {
                lines.push(SaleLine { sku: accessory, units: 1 });
            }
        }
        SaleOrder {
            order: format!("order-{buyer}"),
            // One buyer in four places a second order right after their first,
            // so per-buyer limits bite.
            buyer: format!("buyer-{}", if buyer % 4 == 3 { buyer - 1 } else { buyer }),
            lines,
            ttl_ms: self.sale.hold_ttl_ms,
        }
    }

    async fn buyer_task(self: Arc<Self>) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        loop {
            let buyer = self.next_buyer.fetch_add(1, Ordering::Relaxed);
            if buyer >= self.sale.buyers {
                return Ok(tally);
            }
            let order = self.order_for(buyer);
            let mut reservation = None;
            let mut answered = false;
            for _ in 0..BUSY_ATTEMPTS_MAX {
                let started = Instant::now();
                let answer = self.shop.reserve(&order).await.with_context(|| format!("buyer {buyer}: reserve"))?;
                let latency_us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                self.requests.fetch_add(1, Ordering::Relaxed);
                match &answer {
                    ReserveOutcome::Held(_) => tally.held_latencies_us.push(latency_us),
                    ReserveOutcome::Busy { .. }
                    | ReserveOutcome::NotOpen { .. }
                    | ReserveOutcome::Unanswered { .. } => {}
                    ReserveOutcome::SoldOut | ReserveOutcome::LimitExceeded => {
                        tally.refused_latencies_us.push(latency_us);
                    }
                }
                answered = !matches!(answer, ReserveOutcome::Busy { .. } | ReserveOutcome::NotOpen { .. });
                match answer {
                    ReserveOutcome::Held(held) => {
                        reservation = Some(held);
                        break;
                    }
                    ReserveOutcome::Busy { retry_after_ms } => {
                        tally.busy_retries += 1;
                        tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                    }
                    ReserveOutcome::NotOpen { opens_at_ms } => {
                        // Wait at the door: every early buyer comes in at
                        // the opening, which is the stampede a flash sale is.
                        tally.early += 1;
                        let wait_ms = opens_at_ms.saturating_sub(wall_clock_ms()).min(MAX_OPENING_WAIT_MS);
                        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    }
                    ReserveOutcome::SoldOut => {
                        tally.sold_out += 1;
                        break;
                    }
                    ReserveOutcome::LimitExceeded => {
                        tally.limited += 1;
                        break;
                    }
                    ReserveOutcome::Unanswered { .. } => {
                        tally.gave_up_unanswered += 1;
                        break;
                    }
                }
            }
            let Some(reservation) = reservation else {
                if !answered {
                    tally.gave_up_busy += 1;
                }
                continue;
            };
            tally.held += 1;
            let roll = Choices(self.sale.seed.rotate_left(17) ^ buyer).below(100);
            if roll < u64::from(self.sale.pay_percent) {
                let mut asks = 0;
                loop {
                    let outcome =
                        self.shop.commit(&reservation).await.with_context(|| format!("buyer {buyer}: commit"))?;
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    match outcome {
                        CommitOutcome::Sold(units) => {
                            tally.paid += 1;
                            tally.units_committed += units;
                            break;
                        }
                        CommitOutcome::Expired => {
                            tally.expired_before_paying += 1;
                            break;
                        }
                        CommitOutcome::Unanswered { reason } => {
                            asks += 1;
                            ensure!(
                                asks < SETTLE_ASKS_MAX,
                                "buyer {buyer}: commit unanswered {asks} times, its outcome unknown: {reason}"
                            );
                            tally.settle_retries += 1;
                            tokio::time::sleep(Duration::from_millis(SETTLE_PAUSE_MS)).await;
                        }
                    }
                }
            } else if roll < u64::from(self.sale.pay_percent + self.sale.cancel_percent) {
                let mut released = false;
                for _ in 0..SETTLE_ASKS_MAX {
                    released =
                        self.shop.release(&reservation).await.with_context(|| format!("buyer {buyer}: release"))?;
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    if released {
                        break;
                    }
                    tally.settle_retries += 1;
                    tokio::time::sleep(Duration::from_millis(SETTLE_PAUSE_MS)).await;
                }
                // Unanswered throughout: the hold expires by itself.
                if released {
                    tally.cancelled += 1;
                } else {
                    tally.abandoned += 1;
                }
            } else {
                tally.abandoned += 1;
            }
        }
    }
}

/// Live progress on the terminal (nothing when output is not a terminal):
/// buyers served, requests per second, and sold / held / available of each
/// hot SKU, refreshed twice a second.
async fn show_progress<S: Shop>(sale: Arc<Sale<S>>) {
    let bar = indicatif::ProgressBar::new(sale.sale.buyers);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {bar:30} {pos}/{len} buyers  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut last_requests, mut last_at) = (0u64, Instant::now());
    loop {
        for _ in 0..10 {
            if sale.done.load(Ordering::Relaxed) {
                bar.finish_and_clear();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let requests = sale.requests.load(Ordering::Relaxed);
        let rate = (requests - last_requests) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
        (last_requests, last_at) = (requests, Instant::now());
        let mut message = format!("{rate:.0} req/s");
        for index in 0..u64::from(sale.sale.hot_skus.min(4)) {
            if let Ok(counts) = sale.shop.availability(&hot_sku(index)).await {
                message.push_str(&format!(
                    " | hot-{index}: {} sold {} held {} left",
                    counts.sold, counts.held, counts.available
                ));
            }
        }
        bar.set_position(sale.next_buyer.load(Ordering::Relaxed).min(sale.sale.buyers));
        bar.set_message(message);
    }
}

fn percentile_ms(sorted_us: &[u32], percentile: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() - 1) as f64 * percentile).round() as usize;
    f64::from(sorted_us[rank]) / 1000.0
}

/// How long past its TTL an abandoned hold may still be held when the books
/// are read back: the leader expires holds on its tick, and the expiry is
/// committed like any change.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);
/// Reads of the books in flight at once. The books are every SKU (ten
/// thousand in the default sale): read one at a time, a reading took longer
/// than the grace, and the counts it reported for the first SKUs were taken
/// before their holds' TTL ran out (the sale failed on holds that had in
/// fact expired).
const BOOK_READS_IN_FLIGHT_MAX: usize = 64;
/// SKUs named when holds outlive their TTL.
const STILL_HELD_SHOWN_MAX: usize = 10;

/// Every SKU's counts, in the order of `skus`.
async fn read_books<S: Shop>(shop: &S, skus: &[(String, u64)]) -> anyhow::Result<Vec<(String, u64, Counts)>> {
    futures_util::stream::iter(skus)
        .map(|(sku, units)| async move {
            let stock = shop.availability(sku).await.with_context(|| format!("reading {sku}"))?;
            Ok::<_, anyhow::Error>((sku.clone(), *units, stock))
        })
        .buffered(BOOK_READS_IN_FLIGHT_MAX)
        .try_collect()
        .await
}

/// The books once the last abandoned hold, which expires by
/// `holds_end_by`, should be back: read again until nothing is held, or
/// until a reading that *began* `grace` after `holds_end_by` still finds
/// holds — only such a reading proves a hold outlived its TTL (one
/// begun earlier may have read a SKU before its holds expired).
async fn books_after_expiry<S: Shop>(
    shop: &S,
    skus: &[(String, u64)],
    holds_end_by: Instant,
    grace: Duration,
) -> anyhow::Result<Vec<(String, u64, Counts)>> {
    let conclusive_from = holds_end_by + grace;
    loop {
        let began = Instant::now();
        let books = read_books(shop, skus).await?;
        if began >= conclusive_from || books.iter().all(|(_, _, stock)| stock.held == 0) {
            return Ok(books);
        }
        // Bounded: once a reading begins past `conclusive_from`, it is the last.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates `skus` (id, units, per-buyer limit) opening at `opens_at_ms`,
/// concurrently but bounded, so that a durable engine logs them in a few
/// group commits rather than one fdatasync each.
async fn create_all<S: Shop>(
    shop: &Arc<S>,
    skus: &[(String, u64, Option<u32>)],
    opens_at_ms: u64,
) -> anyhow::Result<()> {
    let creating = Arc::new(tokio::sync::Semaphore::new(256));
    let creations: Vec<_> = skus
        .iter()
        .map(|(sku, units, limit)| {
            let (shop, sku, units, limit, creating) = (shop.clone(), sku.clone(), *units, *limit, creating.clone());
            tokio::spawn(async move {
                let _permit = creating.acquire().await.context("creation limiter closed")?;
                shop.create(&sku, units, limit, opens_at_ms).await.with_context(|| format!("creating {sku}"))
            })
        })
        .collect();
    for creation in creations {
        creation.await.context("creating a SKU panicked")??;
    }
    Ok(())
}

/// Runs the sale on `shop` and prints the report. Fails if the books do
/// not balance.
pub async fn run<S: Shop>(shop: Arc<S>, name: &str, sale: SaleSection) -> anyhow::Result<()> {
    let hot: Vec<(String, u64, Option<u32>)> = (0..u64::from(sale.hot_skus))
        .map(|index| (hot_sku(index), sale.hot_units, Some(sale.units_per_buyer_max)))
        .collect();
    let cold: Vec<(String, u64, Option<u32>)> =
        (0..sale.cold_skus as usize).map(|index| (cold_sku(index), sale.cold_units, None)).collect();
    // The cold catalogue is on sale already; the hot SKUs open
    // `opens_after_ms` after they are created (once the catalogue is up).
    create_all(&shop, &cold, 0).await?;
    let opens_at_ms = wall_clock_ms() + sale.opens_after_ms;
    create_all(&shop, &hot, opens_at_ms).await?;
    let initial: Vec<(String, u64, Option<u32>)> = hot.into_iter().chain(cold).collect();
    let initial: Vec<(String, u64)> = initial.into_iter().map(|(sku, units, _)| (sku, units)).collect();
    println!(
        "flash sale `{name}`: {} buyers, {} in flight, {} hot SKUs x {} units, {} cold SKUs x {} units (Zipf {})",
        sale.buyers,
        sale.concurrency,
        sale.hot_skus,
        sale.hot_units,
        sale.cold_skus,
        sale.cold_units,
        sale.zipf_exponent
    );

    let shared = Arc::new(Sale {
        shop: shop.clone(),
        zipf: Zipf::new(sale.cold_skus, sale.zipf_exponent),
        sale: sale.clone(),
        next_buyer: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        done: std::sync::atomic::AtomicBool::new(false),
    });
    let started = Instant::now();
    let progress = tokio::spawn(show_progress(shared.clone()));
    let tasks: Vec<_> = (0..sale.concurrency).map(|_| tokio::spawn(shared.clone().buyer_task())).collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.context("buyer task panicked")??);
    }
    let elapsed = started.elapsed();
    shared.done.store(true, Ordering::Relaxed);
    progress.await.context("the progress display panicked")?;

    // Abandoned holds come back by themselves when their TTL runs out.
    let holds_end_by = Instant::now() + Duration::from_millis(sale.hold_ttl_ms);
    let books = books_after_expiry(&*shop, &initial, holds_end_by, EXPIRY_GRACE).await?;

    tally.held_latencies_us.sort_unstable();
    tally.refused_latencies_us.sort_unstable();
    let seconds = elapsed.as_secs_f64();
    println!("  {:.2} s: {:.0} buyers/s served", seconds, sale.buyers as f64 / seconds);
    for (kind, latencies) in
        [("holds placed", &tally.held_latencies_us), ("refused (sold out, limit)", &tally.refused_latencies_us)]
    {
        println!(
            "  reserve latency, {kind}: p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms ({} answers)",
            percentile_ms(latencies, 0.50),
            percentile_ms(latencies, 0.99),
            percentile_ms(latencies, 0.999),
            percentile_ms(latencies, 1.0),
            latencies.len(),
        );
    }
    println!(
        "  buyers: {} held stock ({} paid, {} cancelled, {} walked away), {} sold out, {} over their limit, {} gave up on Busy ({} Busy retries)",
        tally.held, tally.paid, tally.cancelled, tally.abandoned, tally.sold_out, tally.limited, tally.gave_up_busy, tally.busy_retries
    );
    if tally.gave_up_unanswered + tally.expired_before_paying + tally.settle_retries > 0 {
        println!(
            "  {} buyers told to try again later (no answer in time), {} holds expired before their payment came, {} payments and cancellations asked again",
            tally.gave_up_unanswered, tally.expired_before_paying, tally.settle_retries
        );
    }
    println!(
        "  {} buyers came before the hot SKUs opened ({} ms after creation), waited at the door and rushed in at once",
        tally.early, sale.opens_after_ms
    );
    for (sku, units, stock) in books.iter().take(sale.hot_skus as usize) {
        println!("  {sku}: {} of {units} units sold, {} available, {} held", stock.sold, stock.available, stock.held);
    }

    let sold: u64 = books.iter().map(|(_, _, stock)| stock.sold).sum();
    let held: u64 = books.iter().map(|(_, _, stock)| stock.held).sum();
    for (sku, units, stock) in &books {
        ensure!(stock.total() == *units, "{sku}: counts {stock:?} do not add up to the {units} units created");
        ensure!(stock.sold <= *units, "{sku}: oversold: {} sold of {units}", stock.sold);
    }
    ensure!(
        sold == tally.units_committed,
        "units sold ({sold}) differ from units buyers committed ({})",
        tally.units_committed
    );
    if held > 0 {
        let still_held: Vec<String> = books
            .iter()
            .filter(|(_, _, stock)| stock.held > 0)
            .take(STILL_HELD_SHOWN_MAX)
            .map(|(sku, _, stock)| format!("{sku} ({})", stock.held))
            .collect();
        anyhow::bail!(
            "{held} units still held {} s after the last hold should have expired: {}",
            EXPIRY_GRACE.as_secs(),
            still_held.join(", ")
        );
    }
    let sold_out_skus = books.iter().filter(|(_, _, stock): &&(String, u64, Counts)| stock.available == 0).count();
    println!(
        "  books balance: {sold} units sold = {} units committed by buyers; no SKU oversold; every abandoned hold expired; {sold_out_skus} SKUs sold out",
        tally.units_committed
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shop whose every SKU holds one unit until `holds_end_at` (one SKU,
    /// if named, for ever), and whose reads each take `read_pause`.
    struct ExpiringShop {
        holds_end_at: Instant,
        held_for_ever: Option<String>,
        read_pause: Duration,
    }

    impl Shop for ExpiringShop {
        async fn create(&self, _: &str, _: u64, _: Option<u32>, _: u64) -> anyhow::Result<()> {
            anyhow::bail!("not sold in this test")
        }
        async fn reserve(&self, _: &SaleOrder) -> anyhow::Result<ReserveOutcome> {
            anyhow::bail!("not sold in this test")
        }
        async fn commit(&self, _: &str) -> anyhow::Result<CommitOutcome> {
            anyhow::bail!("not sold in this test")
        }
        async fn release(&self, _: &str) -> anyhow::Result<bool> {
            anyhow::bail!("not sold in this test")
        }
        async fn availability(&self, sku: &str) -> anyhow::Result<Counts> {
            tokio::time::sleep(self.read_pause).await;
            let held = u64::from(self.held_for_ever.as_deref() == Some(sku) || Instant::now() < self.holds_end_at);
            Ok(Counts { available: 1 - held, held, sold: 0 })
        }
    }

    fn skus(count: usize) -> Vec<(String, u64)> {
        (0..count).map(|index| (cold_sku(index), 1)).collect()
    }

    #[tokio::test]
    async fn counts_read_before_the_holds_expired_are_read_again() {
        // A reading of the books takes longer than the holds' TTL and the
        // grace together: its first SKUs are read while their holds are
        // still live (the demo failed this way on holds that had expired).
        let holds_end_at = Instant::now() + Duration::from_millis(100);
        let shop = ExpiringShop { holds_end_at, held_for_ever: None, read_pause: Duration::from_millis(20) };
        let skus = skus(2_000);
        let books = books_after_expiry(&shop, &skus, holds_end_at, Duration::from_millis(100)).await.expect("read");
        assert_eq!(books.len(), skus.len());
        assert!(books.iter().zip(&skus).all(|((sku, _, _), (asked, _))| sku == asked), "in the order asked");
        let held: u64 = books.iter().map(|(_, _, stock)| stock.held).sum();
        assert_eq!(held, 0, "every hold expired before the last reading");
    }

    #[tokio::test]
    async fn a_hold_that_outlives_its_ttl_is_found_by_a_reading_begun_after_the_grace() {
        let holds_end_at = Instant::now() + Duration::from_millis(50);
        let grace = Duration::from_millis(100);
        let shop =
            ExpiringShop { holds_end_at, held_for_ever: Some(cold_sku(7)), read_pause: Duration::from_millis(1) };
        let books = books_after_expiry(&shop, &skus(100), holds_end_at, grace).await.expect("read");
        assert!(Instant::now() >= holds_end_at + grace, "the last reading began after the grace");
        let still_held: Vec<&str> =
            books.iter().filter(|(_, _, stock)| stock.held > 0).map(|(sku, _, _)| sku.as_str()).collect();
        assert_eq!(still_held, vec!["cold-7"]);
    }
}
