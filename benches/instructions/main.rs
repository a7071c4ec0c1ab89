//! A fixed run of the SKU state machine, for counting instructions rather
//! than timing them: `valgrind --tool=callgrind target/release/apply_instructions`
//! gives the same count on every run of the same binary, whatever else the
//! machine is doing (timings on this 2-core VM vary by tens of percent), so
//! two builds can be compared exactly, e.g. with and without an assertion.
//!
//! The run: 50,000 reserves on one SKU with time advancing, every other
//! hold committed, the rest released, and a query per 100 commands; prints
//! the final counts so that nothing is optimised away.

use flashstock_engine::sku::ReserveLine;
use flashstock_engine::{BuyerId, Limits, OrderId, Quantity, SkuCommand, SkuSettings, SkuState};

const ORDERS: u64 = 50_000;

fn main() {
    let limits = Limits::default();
    let settings = SkuSettings { initial_units: ORDERS * 2, ..SkuSettings::default() };
    let mut state = SkuState::new(settings, limits).expect("valid settings");
    let buyer = BuyerId::new("buyer").expect("valid id");
    let orders: Vec<OrderId> =
        (0..ORDERS).map(|number| OrderId::new(format!("order-{number}")).expect("valid id")).collect();
    let mut now_ms = 1_000;
    for (number, order) in orders.iter().enumerate() {
        now_ms += 1;
        let line =
            ReserveLine { order: order.clone(), buyer: buyer.clone(), quantity: Quantity::Exactly(2), ttl_ms: 60_000 };
        std::hint::black_box(state.apply(now_ms, &SkuCommand::Reserve(line)));
        let settle = if number % 2 == 0 {
            SkuCommand::Commit { order: order.clone(), units: None }
        } else {
            SkuCommand::Release { order: order.clone() }
        };
        std::hint::black_box(state.apply(now_ms, &settle));
        if number % 100 == 0 {
            std::hint::black_box(state.apply(now_ms, &SkuCommand::Query));
        }
    }
    let stock = state.stock();
    println!("available {} held {} sold {}", stock.available, stock.held, stock.sold);
}
