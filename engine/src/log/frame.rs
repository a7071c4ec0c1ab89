//! Record framing, batches, and the recovery scan.
//!
//! A record is a frame: a 24-byte header followed by the payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic            "FSLG" (0x4753_4c46 little-endian)
//!      4     1  frame version    1
//!      5     3  reserved         zero
//!      8     4  payload length   bytes, at most RECORD_PAYLOAD_BYTES_MAX
//!     12     8  sequence number  one more than the previous frame's
//!     20     4  CRC32C           of bytes 0..20 and the payload
//!     24     n  payload
//! ```
//!
//! A segment of format version 2 (the one written) starts with a segment
//! header, written and synced alone when the segment is created, and then
//! holds batches: one per group commit, written by its one write.
//!
//! ```text
//! segment header (20 bytes)            batch header (32 bytes)
//!  0  4  magic "FSSG"                    0  4  magic "FSLB"
//!  4  1  segment format version 2        4  1  segment format version 2
//!  5  3  reserved, zero                  5  3  reserved, zero
//!  8  8  first sequence (as named)       8  4  body length, bytes
//! 16  4  CRC32C of bytes 0..16          12  8  first sequence of the batch
//!                                       20  4  record count, at least 1
//!                                       24  4  CRC32C of the body
//!                                       28  4  CRC32C of bytes 0..28
//!                                       32  n  body: the batch's frames
//! ```
//!
//! Why batches: a group commit overwrites preallocated zeros with one write,
//! and a power loss before its `fdatasync` completes may leave any subset of
//! that write's pages on disk, in any order. So a valid frame may survive
//! after a lost or torn earlier one of the same write, and frame by frame
//! that looks like damage in the middle. Only that last write can be torn
//! (a write starts only after the previous one's sync returned), and it is
//! one batch. A batch is whole when its header and body checksums verify;
//! one that is not is the torn last write unless a valid *batch header*
//! begins somewhere after it: that header was written by a later write,
//! which only started once the damaged batch was synced, so the damage is
//! corruption of durable data. Frames after the damage prove nothing: they
//! may be surviving pages of the torn batch itself. The segment header is
//! synced before any batch is written, so anything valid after a damaged
//! one proves it was once whole.
//!
//! What this cannot see: damage to the last synced batch with no header
//! written after it (the log ended there, or the torn write lost the page
//! holding its header) is taken for a torn tail and cut, as a damaged last
//! frame was before batches. Seeing it would take a record of the synced
//! point that a torn write cannot take with it (a second sync per commit).
//! A payload crafted to hold a valid batch header errs the other way: a
//! torn tail is refused as corruption, which stops the node but loses
//! nothing.
//!
//! Version 1 segments (frames one after another, no header, written before
//! batches existed) are still read, frame by frame, with the rule they were
//! written under: a damaged frame followed by a valid frame continuing the
//! sequence is corruption. They are never appended to again: the log starts
//! a version 2 segment at open. A version 2 segment's bytes start with
//! "FSSG", never "FSLG", so the first four bytes tell the formats apart (and
//! a version 1 reader refuses a version 2 segment holding records as
//! corrupt, since valid frames follow its unknown start, rather than cutting
//! it).
//!
//! All integers are little-endian. Lengths are checked against their bound
//! before anything is read past them, so a corrupt length cannot make
//! recovery read or allocate gigabytes.

use std::ops::Range;

/// Bytes before a frame's payload.
pub const FRAME_HEADER_BYTES: usize = 24;
/// "FSLG": lets the version 1 corruption scan find frame starts.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FSLG");
/// Bumped when the framing of one record changes; older versions stay
/// readable.
pub const FRAME_VERSION: u8 = 1;
/// Largest payload accepted. A record is one command with ids of at most
/// 128 bytes; 64 KiB leaves room for batches of lines and future fields
/// while bounding what one corrupt length field can make us read.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// Bytes of the header that starts a version 2 segment.
pub const SEGMENT_HEADER_BYTES: usize = 20;
/// "FSSG": a version 2 segment, distinct from a frame's magic.
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"FSSG");
/// The segment format written: a segment header, then batches.
pub const SEGMENT_FORMAT_VERSION: u8 = 2;
/// Bytes of the header before a batch's frames.
pub const BATCH_HEADER_BYTES: usize = 32;
/// "FSLB": lets the scan find batch starts after damage.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"FSLB");
/// Largest batch body accepted. A writer round holds at most
/// `round_appends_max` records (4096 by default, about a megabyte of log);
/// the log starts a new batch before one would grow past this, so the
/// length always fits its field and a corrupt one is refused unread.
pub const BATCH_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Why bytes are not a valid frame, segment header or batch.
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
    #[error("batch body checksum mismatch")]
    BodyChecksumMismatch,
    #[error("the batch's checksums hold but its frames do not match its header")]
    MalformedBatch,
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
    out.push(FRAME_VERSION);
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

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Decodes the frame at the start of `bytes`; returns it and its length.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    if read_u32(bytes, 0) != FRAME_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != FRAME_VERSION {
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
    let sequence = read_u64(bytes, 12);
    Ok((Frame { sequence, payload }, end))
}

/// The header that starts a version 2 segment whose first record is
/// `first_sequence`.
pub fn encode_segment_header(first_sequence: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0; SEGMENT_HEADER_BYTES];
    header[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
    header[4] = SEGMENT_FORMAT_VERSION;
    header[8..16].copy_from_slice(&first_sequence.to_le_bytes());
    let checksum = crc32c::crc32c(&header[..16]);
    header[16..20].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Decodes a segment header at the start of `bytes`; returns the first
/// sequence number it names.
pub fn decode_segment_header(bytes: &[u8]) -> Result<u64, FrameError> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    if read_u32(bytes, 0) != SEGMENT_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != SEGMENT_FORMAT_VERSION {
        return Err(FrameError::UnknownVersion(bytes[4]));
    }
    if read_u32(bytes, 16) != crc32c::crc32c(&bytes[..16]) {
        return Err(FrameError::ChecksumMismatch);
    }
    Ok(read_u64(bytes, 8))
}

/// The header of a batch whose body (its frames, `record_count` of them
/// from `first_sequence` on) is `body`.
///
/// # Panics
/// If the body exceeds [`BATCH_BODY_BYTES_MAX`] or holds no record: the log
/// starts a new batch before that, so either is a bug.
pub fn encode_batch_header(first_sequence: u64, record_count: u32, body: &[u8]) -> [u8; BATCH_HEADER_BYTES] {
    assert!(body.len() <= BATCH_BODY_BYTES_MAX, "log batch of {} bytes", body.len());
    assert!(record_count > 0, "an empty log batch");
    let mut header = [0; BATCH_HEADER_BYTES];
    header[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    header[4] = SEGMENT_FORMAT_VERSION;
    header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[12..20].copy_from_slice(&first_sequence.to_le_bytes());
    header[20..24].copy_from_slice(&record_count.to_le_bytes());
    header[24..28].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let checksum = crc32c::crc32c(&header[..28]);
    header[28..32].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// A batch header whose own checksum verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub first_sequence: u64,
    pub record_count: u32,
    pub body_bytes: usize,
    body_checksum: u32,
}

/// Decodes the batch header at the start of `bytes`, without its body.
pub fn decode_batch_header(bytes: &[u8]) -> Result<BatchHeader, FrameError> {
    if bytes.len() < BATCH_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    if read_u32(bytes, 0) != BATCH_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != SEGMENT_FORMAT_VERSION {
        return Err(FrameError::UnknownVersion(bytes[4]));
    }
    if read_u32(bytes, 28) != crc32c::crc32c(&bytes[..28]) {
        return Err(FrameError::ChecksumMismatch);
    }
    let declared = read_u32(bytes, 8);
    if declared as usize > BATCH_BODY_BYTES_MAX {
        return Err(FrameError::TooLarge(declared));
    }
    Ok(BatchHeader {
        first_sequence: read_u64(bytes, 12),
        record_count: read_u32(bytes, 20),
        body_bytes: declared as usize,
        body_checksum: read_u32(bytes, 24),
    })
}

/// Decodes the whole batch at `bytes[at..]`: pushes each record's sequence
/// number and payload range (in `bytes`) onto `records` and returns the
/// header and the batch's length. On error `records` is as it was.
fn decode_batch(
    bytes: &[u8],
    at: usize,
    records: &mut Vec<(u64, Range<usize>)>,
) -> Result<(BatchHeader, usize), FrameError> {
    let header = decode_batch_header(&bytes[at..])?;
    let body_start = at + BATCH_HEADER_BYTES;
    let body = bytes.get(body_start..body_start + header.body_bytes).ok_or(FrameError::Truncated)?;
    if crc32c::crc32c(body) != header.body_checksum {
        return Err(FrameError::BodyChecksumMismatch);
    }
    let records_before = records.len();
    let mut offset = 0;
    let mut sequence = header.first_sequence;
    while offset < body.len() {
        match decode_frame(&body[offset..]) {
            Ok((frame, length)) if frame.sequence == sequence => {
                let payload_start = body_start + offset + FRAME_HEADER_BYTES;
                records.push((sequence, payload_start..body_start + offset + length));
                sequence += 1;
                offset += length;
            }
            _ => {
                records.truncate(records_before);
                return Err(FrameError::MalformedBatch);
            }
        }
    }
    if header.record_count == 0 || records.len() - records_before != header.record_count as usize {
        records.truncate(records_before);
        return Err(FrameError::MalformedBatch);
    }
    Ok((header, BATCH_HEADER_BYTES + header.body_bytes))
}

/// How a segment's records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentFormat {
    /// Version 1: frames one after another, no header; read, never written.
    Frames,
    /// Version 2: a segment header, then one batch per group commit.
    Batches,
}

/// How a scanned log segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belongs to a valid frame or batch (or is zeros after
    /// them).
    Clean,
    /// The bytes from `offset` on are an incomplete or damaged last write,
    /// with nothing after them that proves they were once durable: cut
    /// them off.
    TornTail { offset: usize, reason: FrameError },
    /// Damage at `offset` that was once durable, as what follows it shows:
    /// acknowledged records may be lost, so the node must stop.
    Corrupt { offset: usize, reason: CorruptionReason },
}

/// What is wrong in the middle of a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionReason {
    #[error("damaged frame ({0}) followed by valid frames")]
    DamagedFrame(FrameError),
    #[error("damaged batch ({0}) followed by a later batch")]
    DamagedBatch(FrameError),
    #[error("damaged start of the segment ({0}) followed by valid records")]
    DamagedStart(FrameError),
    #[error("the batch's checksums hold but its frames do not match its header")]
    MalformedBatch,
    #[error("frame with sequence {found} where {expected} was expected")]
    SequenceGap { expected: u64, found: u64 },
    #[error("segment header names record {found}, the file name {expected}")]
    SegmentMismatch { expected: u64, found: u64 },
}

/// The valid records of one segment and how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Sequence number and byte range of each valid frame's payload.
    pub records: Vec<(u64, Range<usize>)>,
    /// Bytes covered by the segment header and valid frames or batches; a
    /// torn tail starts here.
    pub valid_bytes: usize,
    pub end: ScanEnd,
    /// `None` when no header or frame could be read (an empty segment, all
    /// zeros, or a damaged start).
    pub format: Option<SegmentFormat>,
}

/// Reads `bytes` as a segment whose first sequence number is
/// `first_sequence` (from its name), in whichever format it was written,
/// and decides how it ends.
pub fn scan(bytes: &[u8], first_sequence: u64) -> Scan {
    if bytes.iter().all(|&byte| byte == 0) {
        // Nothing was ever made durable in it (only preallocated zeros,
        // if anything).
        return Scan { records: Vec::new(), valid_bytes: 0, end: ScanEnd::Clean, format: None };
    }
    if bytes.len() >= 4 && read_u32(bytes, 0) == FRAME_MAGIC {
        return scan_frames(bytes, first_sequence);
    }
    match decode_segment_header(bytes) {
        Ok(named) if named == first_sequence => scan_batches(bytes, first_sequence),
        Ok(found) => {
            let reason = CorruptionReason::SegmentMismatch { expected: first_sequence, found };
            let end = ScanEnd::Corrupt { offset: 0, reason };
            Scan { records: Vec::new(), valid_bytes: 0, end, format: Some(SegmentFormat::Batches) }
        }
        Err(reason) => {
            // Neither format's start. A version 2 header is synced before
            // any batch is written, and a version 1 segment's first frame
            // before any later one, so anything valid after it proves the
            // start was once whole.
            let proven = valid_frame_after(bytes, 1, first_sequence) || batch_header_after(bytes, 1, first_sequence);
            let end = if proven {
                ScanEnd::Corrupt { offset: 0, reason: CorruptionReason::DamagedStart(reason) }
            } else {
                ScanEnd::TornTail { offset: 0, reason }
            };
            Scan { records: Vec::new(), valid_bytes: 0, end, format: None }
        }
    }
}

/// Reads a version 2 segment: the header (already checked), then batches.
fn scan_batches(bytes: &[u8], first_sequence: u64) -> Scan {
    let format = Some(SegmentFormat::Batches);
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut expected = first_sequence;
    while offset < bytes.len() {
        match decode_batch(bytes, offset, &mut records) {
            Ok((header, _)) if header.first_sequence != expected => {
                records.truncate(records.len() - header.record_count as usize);
                let reason = CorruptionReason::SequenceGap { expected, found: header.first_sequence };
                return Scan { records, valid_bytes: offset, end: ScanEnd::Corrupt { offset, reason }, format };
            }
            Ok((header, length)) => {
                expected += u64::from(header.record_count);
                offset += length;
            }
            Err(_) if bytes[offset..].iter().all(|&byte| byte == 0) => {
                // Zeros to the end: space written ahead of the log (see
                // `AppendFile::preallocate`), or a last write none of whose
                // pages reached the disk. Either way the log ends here.
                return Scan { records, valid_bytes: offset, end: ScanEnd::Clean, format };
            }
            Err(FrameError::MalformedBatch) => {
                // Both checksums hold, so the write was whole: not torn.
                let end = ScanEnd::Corrupt { offset, reason: CorruptionReason::MalformedBatch };
                return Scan { records, valid_bytes: offset, end, format };
            }
            Err(reason) => {
                let end = if batch_header_after(bytes, offset + 1, expected) {
                    ScanEnd::Corrupt { offset, reason: CorruptionReason::DamagedBatch(reason) }
                } else {
                    ScanEnd::TornTail { offset, reason }
                };
                return Scan { records, valid_bytes: offset, end, format };
            }
        }
    }
    Scan { records, valid_bytes: offset, end: ScanEnd::Clean, format }
}

/// Reads a version 1 segment, frame by frame.
///
/// A damaged frame is a torn tail only if no valid frame continuing the
/// sequence follows it anywhere in the bytes; a valid frame after damage
/// means data that was once durable is unreadable.
fn scan_frames(bytes: &[u8], first_sequence: u64) -> Scan {
    let format = Some(SegmentFormat::Frames);
    let mut records = Vec::new();
    let mut offset = 0;
    let mut expected = first_sequence;
    while offset < bytes.len() {
        match decode_frame(&bytes[offset..]) {
            Ok((frame, length)) => {
                if frame.sequence != expected {
                    let reason = CorruptionReason::SequenceGap { expected, found: frame.sequence };
                    return Scan { records, valid_bytes: offset, end: ScanEnd::Corrupt { offset, reason }, format };
                }
                records.push((frame.sequence, offset + FRAME_HEADER_BYTES..offset + length));
                expected += 1;
                offset += length;
            }
            Err(_) if bytes[offset..].iter().all(|&byte| byte == 0) => {
                // Zeros to the end: space written ahead of the log (see
                // `AppendFile::preallocate`), or a write that never reached
                // the disk over it. Either way the log ends here, cleanly.
                return Scan { records, valid_bytes: offset, end: ScanEnd::Clean, format };
            }
            Err(reason) => {
                let end = if valid_frame_after(bytes, offset + 1, expected) {
                    ScanEnd::Corrupt { offset, reason: CorruptionReason::DamagedFrame(reason) }
                } else {
                    ScanEnd::TornTail { offset, reason }
                };
                return Scan { records, valid_bytes: offset, end, format };
            }
        }
    }
    Scan { records, valid_bytes: offset, end: ScanEnd::Clean, format }
}

/// The offsets at or after `from` where `magic` begins.
fn starts_of(bytes: &[u8], from: usize, magic: u32) -> impl Iterator<Item = usize> + '_ {
    let magic = magic.to_le_bytes();
    (from..bytes.len().saturating_sub(3)).filter(move |&start| bytes[start..start + 4] == magic)
}

/// Whether a valid frame with a sequence number of at least `sequence_min`
/// starts anywhere at or after `from`.
fn valid_frame_after(bytes: &[u8], from: usize, sequence_min: u64) -> bool {
    starts_of(bytes, from, FRAME_MAGIC)
        .any(|start| matches!(decode_frame(&bytes[start..]), Ok((frame, _)) if frame.sequence >= sequence_min))
}

/// Whether a batch header whose checksum verifies, with a first sequence
/// number of at least `sequence_min`, starts anywhere at or after `from`.
/// Its body need not be whole: the header alone shows that its write was
/// issued, hence that everything before it had been synced.
fn batch_header_after(bytes: &[u8], from: usize, sequence_min: u64) -> bool {
    starts_of(bytes, from, BATCH_MAGIC).any(
        |start| matches!(decode_batch_header(&bytes[start..]), Ok(header) if header.first_sequence >= sequence_min),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 1 segment: frames one after another.
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
        assert_eq!(scanned.format, Some(SegmentFormat::Frames));
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

    /// A version 2 segment: its header, then one batch per group of
    /// payloads. Returns the bytes and where each batch starts.
    fn segment_of(batches: &[&[&[u8]]], first_sequence: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = encode_segment_header(first_sequence).to_vec();
        let mut starts = Vec::new();
        let mut sequence = first_sequence;
        for payloads in batches {
            starts.push(bytes.len());
            let mut body = Vec::new();
            for payload in *payloads {
                encode_frame(sequence, payload, &mut body);
                sequence += 1;
            }
            let count = payloads.len() as u32;
            bytes.extend_from_slice(&encode_batch_header(sequence - u64::from(count), count, &body));
            bytes.extend_from_slice(&body);
        }
        (bytes, starts)
    }

    fn payloads_of(scanned: &Scan, bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
        scanned.records.iter().map(|(sequence, range)| (*sequence, bytes[range.clone()].to_vec())).collect()
    }

    #[test]
    fn batches_round_trip_and_zeros_after_them_are_a_clean_end() {
        let (mut bytes, _) = segment_of(&[&[b"first", b""], &[b"third record"]], 7);
        let intact = bytes.len();
        for _ in 0..2 {
            let scanned = scan(&bytes, 7);
            assert_eq!(
                (scanned.end.clone(), scanned.format, scanned.valid_bytes),
                (ScanEnd::Clean, Some(SegmentFormat::Batches), intact)
            );
            let expected = vec![(7, b"first".to_vec()), (8, Vec::new()), (9, b"third record".to_vec())];
            assert_eq!(payloads_of(&scanned, &bytes), expected);
            bytes.resize(intact + 5000, 0);
        }
        let (header_only, _) = segment_of(&[], 7);
        let scanned = scan(&header_only, 7);
        assert_eq!(
            (scanned.records.len(), scanned.valid_bytes, scanned.end),
            (0, SEGMENT_HEADER_BYTES, ScanEnd::Clean)
        );
    }

    /// The issue's case, on bytes: the last batch lost a page in its middle
    /// (or its header), and frames of it after the hole survived. Frame by
    /// frame that is damage followed by valid frames; as a batch it is the
    /// torn last write.
    #[test]
    fn frames_surviving_after_a_hole_in_the_last_batch_are_a_torn_tail() {
        let many: Vec<Vec<u8>> = (0..40u8).map(|index| vec![index; 30]).collect();
        let many: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        let (intact, starts) = segment_of(&[&[b"one"], &[b"two", b"three"], &many], 1);
        let last = starts[2];
        for hole in [last..last + 100, last + 300..last + 700, last + BATCH_HEADER_BYTES..intact.len() - 60] {
            let mut bytes = intact.clone();
            bytes[hole.clone()].fill(0);
            bytes.resize(bytes.len() + 4096, 0);
            assert!(valid_frame_after(&bytes, hole.end, 1), "a frame of the batch survives after the hole");
            let scanned = scan(&bytes, 1);
            assert!(
                matches!(scanned.end, ScanEnd::TornTail { offset, .. } if offset == last),
                "{hole:?}: {:?}",
                scanned.end
            );
            assert_eq!((scanned.records.len(), scanned.valid_bytes), (3, last));
        }
    }

    #[test]
    fn a_damaged_batch_followed_by_a_later_batch_header_is_corruption() {
        let (intact, starts) = segment_of(&[&[b"one"], &[b"two", b"three"], &[b"four"]], 1);
        for damaged in [starts[1] + 1, starts[1] + 10, starts[1] + BATCH_HEADER_BYTES + 30, starts[2] - 1] {
            let mut bytes = intact.clone();
            bytes[damaged] ^= 0x04;
            let scanned = scan(&bytes, 1);
            assert_eq!(scanned.records.len(), 1, "damage at {damaged}");
            assert!(
                matches!(scanned.end, ScanEnd::Corrupt { offset, reason: CorruptionReason::DamagedBatch(_) } if offset == starts[1]),
                "damage at {damaged}: {:?}",
                scanned.end
            );
            // The later batch's header alone proves it: its body may be
            // the torn last write.
            let mut later_torn = bytes.clone();
            later_torn[starts[2] + BATCH_HEADER_BYTES..].fill(0);
            assert!(matches!(scan(&later_torn, 1).end, ScanEnd::Corrupt { offset, .. } if offset == starts[1]));
        }
    }

    #[test]
    fn a_flipped_bit_in_the_last_batch_is_a_torn_tail() {
        let (mut bytes, starts) = segment_of(&[&[b"one"], &[b"two", b"three"]], 1);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let scanned = scan(&bytes, 1);
        assert_eq!(scanned.end, ScanEnd::TornTail { offset: starts[1], reason: FrameError::BodyChecksumMismatch });
    }

    #[test]
    fn a_whole_batch_out_of_sequence_or_malformed_is_corruption_even_last() {
        let (mut bytes, _) = segment_of(&[&[b"one"]], 1);
        let mut body = Vec::new();
        encode_frame(3, b"three", &mut body);
        bytes.extend_from_slice(&encode_batch_header(3, 1, &body));
        bytes.extend_from_slice(&body);
        assert!(matches!(
            scan(&bytes, 1).end,
            ScanEnd::Corrupt { reason: CorruptionReason::SequenceGap { expected: 2, found: 3 }, .. }
        ));
        let (mut bytes, starts) = segment_of(&[&[b"one"]], 1);
        let mut body = Vec::new();
        encode_frame(2, b"two", &mut body);
        encode_frame(4, b"four", &mut body);
        bytes.extend_from_slice(&encode_batch_header(2, 2, &body));
        bytes.extend_from_slice(&body);
        let scanned = scan(&bytes, 1);
        assert_eq!(
            scanned.end,
            ScanEnd::Corrupt { offset: starts[0] + BATCH_HEADER_BYTES + 27, reason: CorruptionReason::MalformedBatch }
        );
    }

    #[test]
    fn the_segment_header_must_be_whole_and_name_the_file() {
        let (bytes, _) = segment_of(&[&[b"one"]], 1);
        assert!(matches!(
            scan(&bytes, 2).end,
            ScanEnd::Corrupt { offset: 0, reason: CorruptionReason::SegmentMismatch { expected: 2, found: 1 } }
        ));
        // Synced before any batch: damage to it with batches after is corruption.
        let mut damaged = bytes.clone();
        damaged[9] ^= 1;
        assert!(matches!(
            scan(&damaged, 1).end,
            ScanEnd::Corrupt { offset: 0, reason: CorruptionReason::DamagedStart(_) }
        ));
        // A header cut by a crash while the segment was being created.
        let mut torn = bytes[..SEGMENT_HEADER_BYTES - 5].to_vec();
        torn.resize(4096, 0);
        let scanned = scan(&torn, 1);
        assert_eq!(
            (scanned.end, scanned.format),
            (ScanEnd::TornTail { offset: 0, reason: FrameError::ChecksumMismatch }, None)
        );
    }

    #[test]
    fn a_huge_declared_batch_length_is_refused_before_reading() {
        let (mut bytes, starts) = segment_of(&[&[b"one"]], 1);
        let at = starts[0];
        bytes[at + 8..at + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        let checksum = crc32c::crc32c(&bytes[at..at + 28]);
        bytes[at + 28..at + 32].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(decode_batch_header(&bytes[at..]), Err(FrameError::TooLarge(u32::MAX)));
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
        /// Damage in a version 2 segment: before the last batch it is
        /// corruption at the damaged batch's start (or the header's), with
        /// every earlier batch kept; inside the last batch (a flipped bit or
        /// any run of its bytes lost) it is a torn tail at its start.
        #[test]
        fn only_the_last_batch_can_be_torn(
            batches in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6), 2..6),
            position in any::<prop::sample::Index>(),
            bit in 0..8u8,
            hole_bytes in 1..200usize,
        ) {
            let slices: Vec<Vec<&[u8]>> = batches.iter().map(|batch| batch.iter().map(Vec::as_slice).collect()).collect();
            let slices: Vec<&[&[u8]]> = slices.iter().map(Vec::as_slice).collect();
            let (intact, starts) = segment_of(&slices, 1);
            let last = starts[starts.len() - 1];
            let records_before = |batch: usize| slices[..batch].iter().map(|payloads| payloads.len()).sum::<usize>();

            let damaged = position.index(last);
            let mut bytes = intact.clone();
            bytes[damaged] ^= 1 << bit;
            let scanned = scan(&bytes, 1);
            let is_corrupt = matches!(scanned.end, ScanEnd::Corrupt { .. });
            prop_assert!(is_corrupt, "damage at {} before the last batch was taken for {:?}", damaged, scanned.end);
            if damaged >= SEGMENT_HEADER_BYTES {
                let batch = starts.iter().rposition(|&start| start <= damaged).expect("in a batch");
                prop_assert_eq!(scanned.records.len(), records_before(batch));
                let at_batch = matches!(scanned.end, ScanEnd::Corrupt { offset, .. } if offset == starts[batch]);
                prop_assert!(at_batch, "{:?}", scanned.end);
            }

            let in_last = last + position.index(intact.len() - last);
            let mut flipped = intact.clone();
            flipped[in_last] ^= 1 << bit;
            let mut holed = intact.clone();
            holed[in_last..(in_last + hole_bytes).min(intact.len())].fill(0);
            for bytes in [flipped, holed] {
                if bytes == intact {
                    continue; // the hole fell on zeros
                }
                let scanned = scan(&bytes, 1);
                // Zeros from the batch's start on are a clean end at it.
                let cut_at_last = match scanned.end {
                    ScanEnd::TornTail { offset, .. } => offset == last,
                    ScanEnd::Clean => scanned.valid_bytes == last,
                    ScanEnd::Corrupt { .. } => false,
                };
                prop_assert!(cut_at_last, "damage at {} in the last batch was taken for {:?}", in_last, scanned.end);
                prop_assert_eq!(scanned.records.len(), records_before(slices.len() - 1));
            }
        }
    }
}
