//! The wire decoder on arbitrary bytes, as a payload and as a whole frame,
//! for every message type a peer can send. Beyond "no panic": whatever
//! decodes re-encodes to bytes that decode to the same message and that
//! the bounds check accepts, the frame and payload decoders agree, and no
//! decode allocates more than its input can justify.
#![no_main]

use flashstock_client::wire::{self, Hello, Request, Response, Welcome};
use flashstock_fuzz::{allocation_bound, largest_allocation_during, TrackingAllocator};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

fn check<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let (decoded, largest) = largest_allocation_during(|| wire::decode_payload::<T>(data));
    assert!(
        largest <= allocation_bound(data.len()),
        "decoding {} bytes allocated {largest} bytes at once ({decoded:?})",
        data.len()
    );
    if let Ok(message) = decoded {
        let mut frame = Vec::new();
        match wire::encode_frame(&message, &mut frame) {
            Ok(()) => {}
            // The decoder also reads structs as arrays, which are shorter
            // than the named maps the encoder writes: near the limit, such
            // a message is valid to read and too large to send.
            Err(wire::CodecError::FrameTooLarge { .. }) => return,
            Err(error) => panic!("a decoded message does not re-encode: {error}"),
        }
        let payload = &frame[wire::FRAME_HEADER_BYTES..];
        let span = flashstock_msgpack::check_bounds(payload, wire::DECODE_DEPTH_MAX);
        assert_eq!(span, Ok(payload.len()), "the bounds check refuses what the encoder wrote");
        let again: T = wire::decode_frame(&frame).expect("a re-encoded message decodes");
        assert_eq!(again, message);
        let mut reencoded = Vec::new();
        wire::encode_frame(&again, &mut reencoded).expect("re-encodes");
        assert_eq!(reencoded, frame, "encoding is not deterministic");
    }

    let framed = wire::decode_frame::<T>(data);
    if let Ok(message) = &framed {
        let header: [u8; wire::FRAME_HEADER_BYTES] = data[..wire::FRAME_HEADER_BYTES].try_into().expect("header");
        assert_eq!(wire::frame_length(header).ok(), Some(data.len() - wire::FRAME_HEADER_BYTES));
        let payload = wire::decode_payload::<T>(&data[wire::FRAME_HEADER_BYTES..]).expect("payload of a frame");
        assert_eq!(&payload, message, "frame and payload decoders disagree");
    }
}

/// A batch frame's envelope: whatever splits re-encodes entry by entry to
/// a frame that splits the same way, within the allocation bound.
fn check_batch(data: &[u8]) {
    let (entries, largest) = largest_allocation_during(|| wire::decode_batch(data).map(|entries| entries.len()));
    assert!(largest <= allocation_bound(data.len()), "splitting {} bytes allocated {largest} at once", data.len());
    let Ok(count) = entries else { return };
    let entries = wire::decode_batch(data).expect("splits again");
    assert_eq!(entries.len(), count);
    assert!(count <= wire::BATCH_REQUESTS_MAX);
    for (_, bytes) in &entries {
        let _ = wire::decode_payload::<Request>(bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    check_batch(data);
    check::<Request>(data);
    check::<Response>(data);
    check::<Hello>(data);
    check::<Welcome>(data);
});
