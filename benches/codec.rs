//! criterion benchmarks of the two codecs on every request's path: the wire
//! frame (length prefix + MessagePack, decoded with the depth and size
//! caps) and the log (a record's MessagePack, its frame with CRC32C, and
//! the recovery scan).
//!
//! `cargo bench -p flashstock-benches --bench codec`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flashstock_client::wire::{
    self, Request, RequestBody, Response, WireLine, WireLineResult, WireQuantity, WireStock,
};
use flashstock_engine::log::frame::{encode_frame, scan};
use flashstock_engine::log::record::LogRecord;
use flashstock_engine::sku::{ReserveLine, SkuCommand};
use flashstock_engine::{BuyerId, OrderId, Quantity, SkuId};

/// Records per log benchmark iteration: a busy group commit's worth.
const RECORDS: usize = 1_000;

fn reserve_request() -> Request {
    Request {
        timeout_ms: 2_000,
        body: RequestBody::Reserve {
            order: "order-7f3a9c21".to_owned(),
            buyer: "buyer-42".to_owned(),
            lines: vec![WireLine { sku: "tv-55-inch".to_owned(), quantity: WireQuantity::Exactly(1) }],
            ttl_ms: 120_000,
        },
    }
}

fn reserved_response() -> Response {
    Response::Reserved {
        order: "order-7f3a9c21".to_owned(),
        home_partition: 17,
        expires_at_ms: 1_764_000_000_000,
        lines: vec![WireLineResult {
            sku: "tv-55-inch".to_owned(),
            units: 1,
            stock: WireStock { available: 4_211, held: 380, sold: 409 },
        }],
    }
}

fn wire(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));
    let request = reserve_request();
    let mut frame = Vec::new();
    wire::encode_frame(&request, &mut frame).expect("encodes");
    group.bench_function("encode_reserve_request", |bench| {
        let mut out = Vec::with_capacity(256);
        bench.iter(|| {
            out.clear();
            wire::encode_frame(std::hint::black_box(&request), &mut out).expect("encodes");
        });
    });
    group.bench_function("decode_reserve_request", |bench| {
        bench.iter(|| wire::decode_frame::<Request>(std::hint::black_box(&frame)).expect("decodes"));
    });
    let response = reserved_response();
    let mut answer = Vec::new();
    wire::encode_frame(&response, &mut answer).expect("encodes");
    group.bench_function("decode_reserved_response", |bench| {
        bench.iter(|| wire::decode_frame::<Response>(std::hint::black_box(&answer)).expect("decodes"));
    });
    group.finish();
}

fn log_records() -> Vec<LogRecord> {
    (0..RECORDS)
        .map(|index| LogRecord::Apply {
            sku: SkuId::new(format!("sku-{}", index % 97)).expect("valid"),
            now_ms: 1_764_000_000_000 + index as u64,
            command: SkuCommand::Reserve(ReserveLine {
                order: OrderId::new(format!("order-{index}")).expect("valid"),
                buyer: BuyerId::new(format!("buyer-{}", index % 13)).expect("valid"),
                quantity: Quantity::Exactly(1),
                ttl_ms: 120_000,
            }),
        })
        .collect()
}

fn log(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("log");
    group.throughput(Throughput::Elements(RECORDS as u64));
    let records = log_records();
    let payloads: Vec<Vec<u8>> = records.iter().map(LogRecord::encode).collect();
    group.bench_function("encode_records", |bench| {
        bench.iter(|| records.iter().map(|record| record.encode().len()).sum::<usize>());
    });
    group.bench_function("frame_records", |bench| {
        let mut out = Vec::with_capacity(RECORDS * 128);
        bench.iter(|| {
            out.clear();
            for (index, payload) in payloads.iter().enumerate() {
                encode_frame(index as u64 + 1, payload, &mut out);
            }
        });
    });
    let mut segment = Vec::new();
    for (index, payload) in payloads.iter().enumerate() {
        encode_frame(index as u64 + 1, payload, &mut segment);
    }
    group.bench_function("scan_and_decode_records", |bench| {
        bench.iter(|| {
            let scanned = scan(std::hint::black_box(&segment), 1);
            let mut decoded = 0;
            for (_, range) in &scanned.records {
                std::hint::black_box(LogRecord::decode(&segment[range.clone()]).expect("decodes"));
                decoded += 1;
            }
            decoded
        });
    });
    group.finish();
}

criterion_group!(benches, wire, log);
criterion_main!(benches);
