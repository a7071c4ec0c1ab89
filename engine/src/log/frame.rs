//! Record framing and the recovery scan.
//!
//! A frame is a 24-byte header followed by the payload:
//!
//! ```text
//! offset  size  field
//!      0     4  magic            "FSLG" (0x4753_4c46 little-endian)
//!      4     1  format version   1
//!      5     3  reserved         zero
//!      8     4  payload length   bytes, at most RECORD_PAYLOAD_BYTES_MAX
//!     12     8  sequence number  one more than the previous frame's
//!     20     4  CRC32C           of bytes 0..20 and the payload
//!     24     n  payload
//! ```
//!
//! All integers are little-endian. The length is checked against the bound
//! before anything is allocated, so a corrupt length cannot make recovery
//! allocate gigabytes.

use std::ops::Range;

/// Bytes before the payload.
pub const FRAME_HEADER_BYTES: usize = 24;
/// "FSLG": lets the corruption scan find frame starts.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FSLG");
/// Bumped when the framing changes; older versions stay readable.
pub const FORMAT_VERSION: u8 = 1;
/// Largest payload accepted. A record is one command with ids of at most
/// 128 bytes; 64 KiB leaves room for batches of lines and future fields
/// while bounding what one corrupt length field can make us read.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the bytes end inside a frame")]
    Truncated,
    #[error("no frame magic")]
    BadMagic,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("declared payload of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("checksum mismatch")]
    ChecksumMismatch,
}

/// A decoded frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub sequence: u64,
    pub payload: &'a [u8],
}

/// Appends one frame to `out`.
///
/// # Panics
/// If `payload` exceeds [`RECORD_PAYLOAD_BYTES_MAX`]: records are built by
/// the engine, whose types bound their size, so an oversized one is a bug.
pub fn encode_frame(sequence: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= RECORD_PAYLOAD_BYTES_MAX, "log record of {} bytes", payload.len());
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 20]), payload);
    out.extend_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(payload);
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Decodes the frame at the start of `bytes`; returns it and its length.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    if read_u32(bytes, 0) != FRAME_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(FrameError::UnknownVersion(bytes[4]));
    }
    // The writer always zeroes them; a frame that does not is not one of
    // ours even if its checksum matches (the checksum covers them), and
    // accepting it would let the same record have several valid encodings.
    if bytes[5..8] != [0; 3] {
        return Err(FrameError::ReservedNotZero);
    }
    let declared = read_u32(bytes, 8);
    let length = declared as usize;
    if length > RECORD_PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(declared));
    }
    let end = FRAME_HEADER_BYTES + length;
    if bytes.len() < end {
        return Err(FrameError::Truncated);
    }
    let payload = &bytes[FRAME_HEADER_BYTES..end];
    let expected = crc32c::crc32c_append(crc32c::crc32c(&bytes[..20]), payload);
    if read_u32(bytes, 20) != expected {
        return Err(FrameError::ChecksumMismatch);
    }
    let sequence = u64::from_le_bytes(bytes[12..20].try_into().expect("eight bytes"));
    Ok((Frame { sequence, payload }, end))
}

/// How a scanned log segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belongs to a valid frame.
    Clean,
    /// The bytes from `offset` on are an incomplete or damaged last write,
    /// with no valid frame after them: cut them off.
    TornTail { offset: usize, reason: FrameError },
    /// A damaged or out-of-order frame at `offset` with valid frames after
    /// it: acknowledged records may be lost, so the node must stop.
    Corrupt { offset: usize, reason: CorruptionReason },
}

/// What is wrong in the middle of a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionReason {
    #[error("damaged frame ({0}) followed by valid frames")]
    DamagedFrame(FrameError),
    #[error("frame with sequence {found} where {expected} was expected")]
    SequenceGap { expected: u64, found: u64 },
}

/// The valid frames of one segment and how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Sequence number and byte range of each valid frame's payload.
    pub records: Vec<(u64, Range<usize>)>,
    /// Bytes covered by valid frames; a torn tail starts here.
    pub valid_bytes: usize,
    pub end: ScanEnd,
}

/// Reads `bytes` as a run of frames whose first sequence number is
/// `first_sequence`, and decides how the run ends.
///
/// A damaged frame is a torn tail only if no valid frame continuing the
/// sequence follows it anywhere in the bytes; a valid frame after damage
/// means data that was once durable is unreadable.
pub fn scan(bytes: &[u8], first_sequence: u64) -> Scan {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut expected = first_sequence;
    while offset < bytes.len() {
        match decode_frame(&bytes[offset..]) {
            Ok((frame, length)) => {
                if frame.sequence != expected {
                    let reason = CorruptionReason::SequenceGap { expected, found: frame.sequence };
                    return Scan { records, valid_bytes: offset, end: ScanEnd::Corrupt { offset, reason } };
                }
                records.push((frame.sequence, offset + FRAME_HEADER_BYTES..offset + length));
                expected += 1;
                offset += length;
            }
            Err(_) if bytes[offset..].iter().all(|&byte| byte == 0) => {
                // Zeros to the end: space written ahead of the log (see
                // `AppendFile::preallocate`), or a write that never reached
                // the disk over it. Either way the log ends here, cleanly.
                return Scan { records, valid_bytes: offset, end: ScanEnd::Clean };
            }
            Err(reason) => {
                let end = if valid_frame_after(bytes, offset + 1, expected) {
                    ScanEnd::Corrupt { offset, reason: CorruptionReason::DamagedFrame(reason) }
                } else {
                    ScanEnd::TornTail { offset, reason }
                };
                return Scan { records, valid_bytes: offset, end };
            }
        }
    }
    Scan { records, valid_bytes: offset, end: ScanEnd::Clean }
}

/// Whether a valid frame with a sequence number of at least `sequence_min`
/// starts anywhere at or after `from`.
fn valid_frame_after(bytes: &[u8], from: usize, sequence_min: u64) -> bool {
    let magic = FRAME_MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(FRAME_HEADER_BYTES - 1))
        .filter(|&start| bytes[start..start + 4] == magic)
        .any(|start| matches!(decode_frame(&bytes[start..]), Ok((frame, _)) if frame.sequence >= sequence_min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_of(payloads: &[&[u8]], first_sequence: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            encode_frame(first_sequence + index as u64, payload, &mut bytes);
        }
        bytes
    }

    #[test]
    fn frames_round_trip() {
        let bytes = log_of(&[b"first", b"", b"third record"], 7);
        let scanned = scan(&bytes, 7);
        assert_eq!(scanned.end, ScanEnd::Clean);
        let payloads: Vec<_> =
            scanned.records.iter().map(|(sequence, range)| (*sequence, &bytes[range.clone()])).collect();
        assert_eq!(payloads, vec![(7, &b"first"[..]), (8, &b""[..]), (9, &b"third record"[..])]);
        assert_eq!(scanned.valid_bytes, bytes.len());
    }

    #[test]
    fn zeros_to_the_end_are_a_clean_end_but_zeros_before_a_frame_are_not() {
        let mut bytes = log_of(&[b"one", b"two"], 1);
        let intact = bytes.len();
        bytes.resize(intact + 4096, 0);
        let scanned = scan(&bytes, 1);
        assert_eq!((scanned.records.len(), scanned.valid_bytes, scanned.end), (2, intact, ScanEnd::Clean));
        // A frame after the zeros: the zeros hide a record, so they are not
        // the end of the log.
        for sequence in [3, 4] {
            let mut hiding = log_of(&[b"one", b"two"], 1);
            hiding.resize(intact + 64, 0);
            encode_frame(sequence, b"later", &mut hiding);
            assert!(matches!(scan(&hiding, 1).end, ScanEnd::Corrupt { offset, .. } if offset == intact));
        }
        // A header that reached the disk without its payload is torn, zeros or not.
        let mut torn = log_of(&[b"one", b"two", b"three"], 1);
        let last_payload = torn.len() - 5;
        torn[last_payload..].fill(0);
        torn.resize(torn.len() + 100, 0);
        assert!(matches!(scan(&torn, 1).end, ScanEnd::TornTail { offset, .. } if offset == intact));
    }

    #[test]
    fn a_cut_last_write_is_a_torn_tail() {
        let bytes = log_of(&[b"one", b"two", b"three"], 1);
        let intact = log_of(&[b"one", b"two"], 1).len();
        for cut in intact + 1..bytes.len() {
            let scanned = scan(&bytes[..cut], 1);
            assert_eq!(scanned.records.len(), 2, "cut at {cut}");
            assert!(matches!(scanned.end, ScanEnd::TornTail { offset, .. } if offset == intact), "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_in_the_middle_is_corruption_with_its_offset() {
        let mut bytes = log_of(&[b"one", b"two", b"three"], 1);
        let second = log_of(&[b"one"], 1).len();
        bytes[second + FRAME_HEADER_BYTES] ^= 0x10;
        let scanned = scan(&bytes, 1);
        assert_eq!(scanned.records.len(), 1);
        assert_eq!(
            scanned.end,
            ScanEnd::Corrupt { offset: second, reason: CorruptionReason::DamagedFrame(FrameError::ChecksumMismatch) }
        );
    }

    #[test]
    fn a_flipped_bit_in_the_last_frame_is_a_torn_tail() {
        let mut bytes = log_of(&[b"one", b"two"], 1);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(scan(&bytes, 1).end, ScanEnd::TornTail { reason: FrameError::ChecksumMismatch, .. }));
    }

    #[test]
    fn a_sequence_gap_is_corruption() {
        let mut bytes = log_of(&[b"one"], 1);
        encode_frame(3, b"three", &mut bytes);
        assert!(matches!(
            scan(&bytes, 1).end,
            ScanEnd::Corrupt { reason: CorruptionReason::SequenceGap { expected: 2, found: 3 }, .. }
        ));
    }

    /// Found by the `log_scan` fuzz target: a frame whose reserved byte was
    /// set and whose checksum still matched was accepted as a record.
    #[test]
    fn a_frame_with_reserved_bytes_set_is_refused_even_with_a_matching_checksum() {
        let mut bytes = log_of(&[b"one"], 1);
        bytes[7] = 0x80;
        let checksum = crc32c::crc32c_append(crc32c::crc32c(&bytes[..20]), &bytes[FRAME_HEADER_BYTES..]);
        bytes[20..24].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(decode_frame(&bytes), Err(FrameError::ReservedNotZero));
        let scanned = scan(&bytes, 1);
        assert_eq!(scanned.records, Vec::new());
        assert_eq!(scanned.end, ScanEnd::TornTail { offset: 0, reason: FrameError::ReservedNotZero });
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_reading() {
        let mut bytes = log_of(&[b"one"], 1);
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_frame(&bytes), Err(FrameError::TooLarge(u32::MAX)));
    }

    proptest! {
        /// Any bytes at all: the scan never panics, and what it accepts is
        /// exactly a prefix of frames.
        #[test]
        fn scanning_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let scanned = scan(&bytes, 0);
            prop_assert!(scanned.valid_bytes <= bytes.len());
            prop_assert!(scanned.end == ScanEnd::Clean || scanned.valid_bytes < bytes.len());
        }

        /// Damage anywhere in the log: records before the damage are all
        /// kept, and damage followed by an intact frame is never "torn".
        #[test]
        fn damage_is_never_mistaken_for_a_torn_tail(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 2..8),
            position in any::<prop::sample::Index>(),
            bit in 0..8u8,
        ) {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut bytes = log_of(&slices, 1);
            let lengths: Vec<usize> = slices.iter().map(|payload| FRAME_HEADER_BYTES + payload.len()).collect();
            let last_start = bytes.len() - lengths[lengths.len() - 1];
            let damaged = position.index(last_start);
            bytes[damaged] ^= 1 << bit;
            let frame_of_damage = lengths.iter().scan(0, |start, length| { *start += length; Some(*start) }).position(|end| damaged < end).expect("inside");
            let scanned = scan(&bytes, 1);
            prop_assert_eq!(scanned.records.len(), frame_of_damage);
            let is_corrupt = matches!(scanned.end, ScanEnd::Corrupt { .. });
            prop_assert!(is_corrupt, "damage before the last frame was treated as {:?}", scanned.end);
        }
    }
}
