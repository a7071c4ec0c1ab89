//! The snapshot decoder on arbitrary bytes: as they are, and with the
//! header's length and checksum repaired so that mutations reach the
//! MessagePack payload. Beyond "no panic": a snapshot that decodes
//! re-encodes canonically (the same state, the same bytes) and decodes to
//! itself, each SKU image that restores into a SKU gives the same image
//! back (up to the order of its reservations), and the bounds check accepts every payload the decoder accepts.
#![no_main]

use flashstock_engine::log::snapshot::Snapshot;
use flashstock_engine::{Limits, SkuState};
use flashstock_fuzz::{
    allocation_bound, largest_allocation_during, TrackingAllocator, LOG_DECODER_DEPTH_MAX, LOG_RECORD_DEPTH_MAX,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const HEADER_BYTES: usize = 24;

fn check(bytes: &[u8]) {
    let payload = bytes.get(HEADER_BYTES..).unwrap_or_default();
    let bounds = flashstock_msgpack::check_bounds(payload, LOG_DECODER_DEPTH_MAX);
    let (decoded, largest) = largest_allocation_during(|| Snapshot::decode(bytes));
    // The decoder checks declared lengths before serde preallocates.
    assert!(largest <= allocation_bound(bytes.len()), "{} bytes allocated {largest}", bytes.len());
    let Ok(snapshot) = decoded else { return };
    assert!(bounds.is_ok(), "the bounds check refuses a snapshot the decoder accepts: {bounds:?}");
    let encoded = snapshot.encode();
    assert_eq!(
        flashstock_msgpack::check_bounds(&encoded[HEADER_BYTES..], LOG_RECORD_DEPTH_MAX),
        Ok(encoded.len() - HEADER_BYTES),
        "the bounds check refuses what the encoder wrote"
    );
    let again = Snapshot::decode(&encoded).expect("a re-encoded snapshot decodes");
    assert_eq!(again, snapshot);
    assert_eq!(again.encode(), encoded, "equal snapshots encode to different bytes");
    for (sku, image) in &snapshot.skus {
        if let Ok(state) = SkuState::from_image(image.clone(), Limits::default()) {
            // The restore sorts reservations by order id, and the decoder
            // does not refuse a snapshot whose reservations are out of order
            // (unlike its SKUs and transactions); anything else restored
            // differently, a reservation lost included, is a failure.
            let mut expected = image.clone();
            expected.reservations.sort_by(|first, second| first.line.order.cmp(&second.line.order));
            assert_eq!(state.image(), expected, "SKU {sku:?} restores to a different image");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= HEADER_BYTES {
        let mut repaired = data.to_vec();
        let length = (data.len() - HEADER_BYTES) as u64;
        repaired[8..16].copy_from_slice(&length.to_le_bytes());
        let checksum = crc32c::crc32c(&data[HEADER_BYTES..]);
        repaired[16..20].copy_from_slice(&checksum.to_le_bytes());
        check(&repaired);
    }
});
