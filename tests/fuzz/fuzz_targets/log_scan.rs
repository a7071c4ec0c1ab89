//! The log's recovery scan and record decoder on arbitrary bytes.
//!
//! A CRC guards every frame, so random bytes would almost never reach the
//! record decoder; each input is therefore scanned twice: as it is, and
//! with every frame's checksum repaired (what a forged or bit-rotted frame
//! whose checksum still matches looks like). Beyond "no panic": the
//! reported valid prefix is exactly a run of well-formed frames in
//! sequence, every payload that decodes round-trips, and the bounds check
//! that the log decoders should call accepts every record they accept.
#![no_main]

use flashstock_engine::log::frame::{self, ScanEnd, FRAME_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX};
use flashstock_engine::log::record::LogRecord;
use flashstock_fuzz::{
    allocation_bound, largest_allocation_during, TrackingAllocator, LOG_DECODER_DEPTH_MAX, LOG_RECORD_DEPTH_MAX,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const FIRST_SEQUENCE: u64 = 1;

fn check_record(payload: &[u8]) {
    let bounds = flashstock_msgpack::check_bounds(payload, LOG_DECODER_DEPTH_MAX);
    let (decoded, largest) = largest_allocation_during(|| LogRecord::decode(payload));
    // The decoder checks declared lengths before serde preallocates.
    assert!(largest <= allocation_bound(payload.len()), "{} bytes allocated {largest}", payload.len());
    let Ok(record) = decoded else { return };
    assert!(bounds.is_ok(), "the bounds check refuses a record the decoder accepts: {bounds:?}");
    let encoded = record.encode();
    assert_eq!(
        flashstock_msgpack::check_bounds(&encoded, LOG_RECORD_DEPTH_MAX),
        Ok(encoded.len()),
        "the bounds check refuses what the encoder wrote"
    );
    let again = LogRecord::decode(&encoded).expect("a re-encoded record decodes");
    assert_eq!(again, record);
    assert_eq!(again.encode(), encoded, "encoding is not deterministic");
}

fn check_scan(bytes: &[u8]) {
    let scanned = frame::scan(bytes, FIRST_SEQUENCE);
    assert!(scanned.valid_bytes <= bytes.len());
    let mut rebuilt = Vec::new();
    for (index, (sequence, range)) in scanned.records.iter().enumerate() {
        assert_eq!(*sequence, FIRST_SEQUENCE + index as u64, "records out of sequence");
        assert_eq!(range.start, rebuilt.len() + FRAME_HEADER_BYTES, "records not contiguous");
        let payload = &bytes[range.clone()];
        frame::encode_frame(*sequence, payload, &mut rebuilt);
        check_record(payload);
    }
    assert_eq!(rebuilt, bytes[..scanned.valid_bytes], "the valid prefix is not the frames it reports");
    match &scanned.end {
        ScanEnd::Clean => {
            assert!(bytes[scanned.valid_bytes..].iter().all(|&byte| byte == 0), "a clean end with data after it")
        }
        ScanEnd::TornTail { offset, .. } | ScanEnd::Corrupt { offset, .. } => {
            assert_eq!(*offset, scanned.valid_bytes);
            assert!(*offset < bytes.len());
        }
    }
    // The valid prefix alone scans cleanly to the same records.
    let prefix = frame::scan(&bytes[..scanned.valid_bytes], FIRST_SEQUENCE);
    assert_eq!(
        (prefix.records, prefix.valid_bytes, prefix.end),
        (scanned.records, scanned.valid_bytes, ScanEnd::Clean)
    );
}

/// `bytes` with the checksum of every frame whose header parses set to
/// match, walking frame by frame as the scan does.
fn with_checksums_repaired(bytes: &[u8]) -> Vec<u8> {
    let mut repaired = bytes.to_vec();
    let mut offset = 0;
    while let Some(header) = repaired.get(offset..offset + FRAME_HEADER_BYTES) {
        let length = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let end = offset + FRAME_HEADER_BYTES + length;
        if length > RECORD_PAYLOAD_BYTES_MAX || end > repaired.len() {
            break;
        }
        let checksum = crc32c::crc32c_append(
            crc32c::crc32c(&repaired[offset..offset + 20]),
            &repaired[offset + FRAME_HEADER_BYTES..end],
        );
        repaired[offset + 20..offset + 24].copy_from_slice(&checksum.to_le_bytes());
        offset = end;
    }
    repaired
}

fuzz_target!(|data: &[u8]| {
    check_scan(data);
    check_scan(&with_checksums_repaired(data));
    check_record(data);
    if data.len() <= RECORD_PAYLOAD_BYTES_MAX {
        // Any payload framed alone is one clean record of itself.
        let mut framed = Vec::new();
        frame::encode_frame(FIRST_SEQUENCE, data, &mut framed);
        let scanned = frame::scan(&framed, FIRST_SEQUENCE);
        assert_eq!(scanned.end, ScanEnd::Clean);
        assert_eq!(scanned.records, vec![(FIRST_SEQUENCE, FRAME_HEADER_BYTES..framed.len())]);
    }
});
