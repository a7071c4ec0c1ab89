//! Bytes of what replication stores and sends: a [`ReplicaWrite`] as a
//! record of the member's raft log, and raft messages between members.
//!
//! Both are decoded from bytes that may be torn (a crash mid-write) or
//! come from a peer, so decoding checks every length against the bytes
//! that follow before it allocates, and fails with a [`CodecError`],
//! never a panic. raft-rs's own types travel in their protobuf encoding
//! (the one raft-rs defines); the framing around them is ours.

use raft::eraftpb::{Entry, HardState, Message, Snapshot};

use crate::replication::storage::ReplicaWrite;
use crate::replication::GroupId;

/// Entries one write may hold: raft-rs appends in batches bounded by the
/// message size; this only keeps a corrupt count from allocating.
pub const WRITE_ENTRIES_MAX: usize = 1 << 20;

/// Why bytes are not a write or a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("ends early: {needed} more bytes declared than present")]
    Truncated { needed: usize },
    #[error("unknown kind {0}")]
    UnknownKind(u8),
    #[error("{count} entries in one write exceed the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("undecodable raft type: {0}")]
    Protobuf(String),
    #[error("{0} bytes left over")]
    Trailing(usize),
}

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_COMPACT: u8 = 4;

/// `write` of `group` as the payload of one log record.
pub fn encode_write(group: GroupId, write: &ReplicaWrite) -> Vec<u8> {
    let mut out = Vec::new();
    encode_write_into(group, write, &mut out);
    out
}

/// [`encode_write`], appended to `out` (the member's log frames a round's
/// writes into one buffer it keeps, instead of a buffer per write and per
/// entry).
pub fn encode_write_into(group: GroupId, write: &ReplicaWrite, out: &mut Vec<u8>) {
    out.extend_from_slice(&group.to_le_bytes());
    match write {
        ReplicaWrite::Entries(entries) => {
            out.push(KIND_ENTRIES);
            out.extend_from_slice(&u32::try_from(entries.len()).expect("a write's entries fit a u32").to_le_bytes());
            for entry in entries {
                put_message(out, entry);
            }
        }
        ReplicaWrite::HardState(state) => {
            out.push(KIND_HARD_STATE);
            put_message(out, state);
        }
        ReplicaWrite::Snapshot(snapshot) => {
            out.push(KIND_SNAPSHOT);
            put_message(out, snapshot);
        }
        ReplicaWrite::Compact { index } => {
            out.push(KIND_COMPACT);
            out.extend_from_slice(&index.to_le_bytes());
        }
    }
}

/// The group and write of a log record's payload.
///
/// # Errors
/// Bytes [`encode_write`] did not make.
pub fn decode_write(bytes: &[u8]) -> Result<(GroupId, ReplicaWrite), CodecError> {
    let mut reader = Reader { bytes };
    let group = u32::from_le_bytes(reader.array()?);
    let [kind] = reader.array()?;
    let write = match kind {
        KIND_ENTRIES => {
            let count = u32::from_le_bytes(reader.array()?) as usize;
            if count > WRITE_ENTRIES_MAX {
                return Err(CodecError::TooManyEntries { count, limit: WRITE_ENTRIES_MAX });
            }
            // Each entry takes at least its 4-byte length: a count the
            // bytes cannot hold is refused before anything is reserved.
            if count.saturating_mul(4) > reader.bytes.len() {
                return Err(CodecError::Truncated { needed: count * 4 - reader.bytes.len() });
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(parse::<Entry>(reader.bytes_prefixed()?)?);
            }
            ReplicaWrite::Entries(entries)
        }
        KIND_HARD_STATE => ReplicaWrite::HardState(parse::<HardState>(reader.bytes_prefixed()?)?),
        KIND_SNAPSHOT => ReplicaWrite::Snapshot(parse::<Snapshot>(reader.bytes_prefixed()?)?),
        KIND_COMPACT => ReplicaWrite::Compact { index: u64::from_le_bytes(reader.array()?) },
        other => return Err(CodecError::UnknownKind(other)),
    };
    reader.finish()?;
    Ok((group, write))
}

/// A raft message of `group` as bytes for a peer.
pub fn encode_message(group: GroupId, message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message_into(group, message, &mut out);
    out
}

/// [`encode_message`], appended to `out`.
pub fn encode_message_into(group: GroupId, message: &Message, out: &mut Vec<u8>) {
    out.extend_from_slice(&group.to_le_bytes());
    protobuf::Message::write_to_vec(message, out).expect("raft's messages always encode");
}

/// The group and raft message of a peer's bytes.
///
/// # Errors
/// Bytes [`encode_message`] did not make.
pub fn decode_message(bytes: &[u8]) -> Result<(GroupId, Message), CodecError> {
    let mut reader = Reader { bytes };
    let group = u32::from_le_bytes(reader.array()?);
    Ok((group, parse::<Message>(reader.bytes)?))
}

#[cfg(test)]
fn protobuf_bytes(message: &impl protobuf::Message) -> Vec<u8> {
    message.write_to_bytes().expect("raft's messages always encode")
}

/// protobuf's decoder reading from a slice reserves what a declared
/// length says (up to 10 MB) before it checks that the bytes are there:
/// the fuzz target found 15 bytes allocating 10 MB, and a byte field inside
/// a snapshot of 132 bytes 1.5 MB. Read from `Bytes` it checks every length
/// against the limit first and slices instead of copying, so the input is
/// copied once and its own length is the outermost limit.
fn parse<T: protobuf::Message + KnownFieldsOnly>(bytes: &[u8]) -> Result<T, CodecError> {
    let error = |error: protobuf::ProtobufError| CodecError::Protobuf(error.to_string());
    let owned = bytes::Bytes::copy_from_slice(bytes);
    let mut stream = protobuf::CodedInputStream::from_carllerche_bytes(&owned);
    let outer = stream.push_limit(bytes.len() as u64).map_err(error)?;
    let mut message = T::new();
    message.merge_from(&mut stream).map_err(error)?;
    stream.pop_limit(outer);
    stream.check_eof().map_err(error)?;
    message.drop_unknown_fields();
    Ok(message)
}

/// Drops what protobuf keeps of fields raft-rs's types do not define,
/// here and in the messages nested inside. Our encoder never writes such
/// fields; keeping them would hand raft something its own encoding would
/// not give back (the fuzz target found bytes whose decoded snapshot held
/// an emptied unknown-field table, unequal to the same message decoded from
/// its re-encoding), so what a decode returns is only what raft knows.
trait KnownFieldsOnly {
    fn drop_unknown_fields(&mut self);
}

fn forget_unknown(fields: &mut protobuf::UnknownFields) {
    *fields = protobuf::UnknownFields::new();
}

impl KnownFieldsOnly for Entry {
    fn drop_unknown_fields(&mut self) {
        forget_unknown(protobuf::Message::mut_unknown_fields(self));
    }
}

impl KnownFieldsOnly for HardState {
    fn drop_unknown_fields(&mut self) {
        forget_unknown(protobuf::Message::mut_unknown_fields(self));
    }
}

impl KnownFieldsOnly for Snapshot {
    fn drop_unknown_fields(&mut self) {
        forget_unknown(protobuf::Message::mut_unknown_fields(self));
        // `mut_*` of an absent field would make it present: only those set.
        if self.has_metadata() {
            let metadata = self.mut_metadata();
            forget_unknown(protobuf::Message::mut_unknown_fields(metadata));
            if metadata.has_conf_state() {
                forget_unknown(protobuf::Message::mut_unknown_fields(metadata.mut_conf_state()));
            }
        }
    }
}

impl KnownFieldsOnly for Message {
    fn drop_unknown_fields(&mut self) {
        forget_unknown(protobuf::Message::mut_unknown_fields(self));
        for entry in self.mut_entries() {
            entry.drop_unknown_fields();
        }
        if self.has_snapshot() {
            self.mut_snapshot().drop_unknown_fields();
        }
    }
}

/// `message`'s bytes after their length (u32 LE), encoded in place.
fn put_message(out: &mut Vec<u8>, message: &impl protobuf::Message) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    message.write_to_vec(out).expect("raft's messages always encode");
    let length = u32::try_from(out.len() - at - 4).expect("a raft message fits a u32");
    out[at..at + 4].copy_from_slice(&length.to_le_bytes());
}

/// The first byte of an entry's data that holds several log records:
/// 0xc1 is the one byte MessagePack never uses, so no single record (a
/// MessagePack value, which is what entries held before) begins with it.
pub const RECORDS_ENTRY_MARKER: u8 = 0xc1;

/// Appends an encoded log record to the data of an entry of records being
/// built in `entry` (empty: a new one), as its length (u32 LE) and bytes.
pub fn push_entry_record(entry: &mut Vec<u8>, record: &[u8]) {
    push_entry_record_with(entry, |out| out.extend_from_slice(record));
}

/// [`push_entry_record`] of the bytes `encode` appends, written in place.
pub fn push_entry_record_with(entry: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
    if entry.is_empty() {
        entry.push(RECORDS_ENTRY_MARKER);
    }
    let at = entry.len();
    entry.extend_from_slice(&[0; 4]);
    encode(entry);
    let length = u32::try_from(entry.len() - at - 4).expect("a log record fits a u32");
    entry[at..at + 4].copy_from_slice(&length.to_le_bytes());
}

/// The encoded log records of an entry's data, in order: each of an entry
/// of records, or the whole data as one record (entries written before
/// entries held several).
///
/// # Errors
/// A record's declared length past the end of the data.
pub fn entry_records(data: &[u8]) -> Result<Vec<&[u8]>, CodecError> {
    let Some((&RECORDS_ENTRY_MARKER, rest)) = data.split_first() else {
        return Ok(vec![data]);
    };
    let mut reader = Reader { bytes: rest };
    let mut records = Vec::new();
    while !reader.bytes.is_empty() {
        records.push(reader.bytes_prefixed()?);
    }
    Ok(records)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], CodecError> {
        if length > self.bytes.len() {
            return Err(CodecError::Truncated { needed: length - self.bytes.len() });
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn bytes_prefixed(&mut self) -> Result<&'a [u8], CodecError> {
        let length = u32::from_le_bytes(self.array()?) as usize;
        self.take(length)
    }

    fn finish(self) -> Result<(), CodecError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing(self.bytes.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, data: &[u8]) -> Entry {
        Entry { index, term: 3, data: data.to_vec().into(), ..Entry::default() }
    }

    #[test]
    fn an_entry_of_records_gives_them_back_in_order_and_a_single_record_stays_one() {
        let mut entry = Vec::new();
        push_entry_record(&mut entry, b"\x93first");
        push_entry_record(&mut entry, b"");
        push_entry_record(&mut entry, b"\x81third");
        assert_eq!(entry_records(&entry).expect("decodes"), vec![&b"\x93first"[..], b"", b"\x81third"]);
        assert_eq!(entry_records(b"\x82plain").expect("decodes"), vec![&b"\x82plain"[..]]);
        for cut in 1..entry.len() {
            let decoded = entry_records(&entry[..cut]);
            assert!(
                decoded.is_err() || decoded.as_ref().is_ok_and(|records| records.len() < 3),
                "cut at {cut}: {decoded:?}"
            );
        }
        let mut torn = entry.clone();
        torn.truncate(entry.len() - 1);
        assert_eq!(entry_records(&torn), Err(CodecError::Truncated { needed: 1 }));
    }

    /// Found by the fuzz target: a message whose snapshot field carries
    /// fields raft does not define (field 13, varints), then an empty
    /// snapshot field merged into it. Decoded, it must equal the same
    /// message decoded from its own re-encoding.
    #[test]
    fn fields_raft_does_not_define_are_dropped_so_a_message_round_trips() {
        let mut bytes = vec![0x03, 0x4a, 0x00, 0xb4, 0x4a, 0x68];
        bytes.extend_from_slice(&[0x68; 125]);
        bytes.extend_from_slice(&[0x00, 0x4a, 0x00]);
        let (group, decoded) = decode_message(&bytes).expect("decodes");
        let encoded = encode_message(group, &decoded);
        assert_eq!(decode_message(&encoded), Ok((group, decoded.clone())));
        assert!(protobuf::Message::get_unknown_fields(decoded.get_snapshot()).iter().next().is_none());
        // An entry with an undefined field (number 15, a varint): decoded
        // without it.
        let mut entry_bytes = protobuf_bytes(&entry(4, b"d"));
        entry_bytes.extend_from_slice(&[15 << 3, 0x07]);
        let mut write = 1u32.to_le_bytes().to_vec();
        write.push(KIND_ENTRIES);
        write.extend_from_slice(&1u32.to_le_bytes());
        write.extend_from_slice(&u32::try_from(entry_bytes.len()).expect("small").to_le_bytes());
        write.extend_from_slice(&entry_bytes);
        assert_eq!(decode_write(&write), Ok((1, ReplicaWrite::Entries(vec![entry(4, b"d")]))));
    }

    #[test]
    fn every_write_round_trips() {
        let hard_state = HardState { term: 4, vote: 2, commit: 9, ..HardState::default() };
        let mut snapshot = Snapshot { data: b"state".to_vec().into(), ..Snapshot::default() };
        snapshot.mut_metadata().index = 7;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let writes = [
            ReplicaWrite::Entries(vec![entry(1, b"a"), entry(2, b""), entry(3, b"ccc")]),
            ReplicaWrite::Entries(Vec::new()),
            ReplicaWrite::HardState(hard_state),
            ReplicaWrite::Snapshot(snapshot),
            ReplicaWrite::Compact { index: 12 },
        ];
        for write in writes {
            assert_eq!(decode_write(&encode_write(5, &write)), Ok((5, write)));
        }
    }

    #[test]
    fn torn_or_foreign_bytes_are_errors_not_panics() {
        let bytes = encode_write(2, &ReplicaWrite::Entries(vec![entry(1, b"abc"), entry(2, b"def")]));
        for cut in 0..bytes.len() {
            assert!(decode_write(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.push(KIND_ENTRIES);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_write(&huge), Err(CodecError::TooManyEntries { .. })));
        let mut unknown = 1u32.to_le_bytes().to_vec();
        unknown.push(99);
        assert_eq!(decode_write(&unknown), Err(CodecError::UnknownKind(99)));
        let mut trailing = encode_write(1, &ReplicaWrite::Compact { index: 1 });
        trailing.push(0);
        assert_eq!(decode_write(&trailing), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn a_declared_length_beyond_the_bytes_allocates_nothing_first() {
        // A length-delimited field (number 12) declaring about 8 MB, then
        // 3 bytes. (That nothing is reserved first is the fuzz target's
        // check: `raft_decode` bounds every allocation by the input.)
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0x62, 0xff, 0xff, 0xff, 0x03, 1, 2, 3]);
        assert!(matches!(decode_message(&bytes), Err(CodecError::Protobuf(_))));
    }

    #[test]
    fn messages_round_trip() {
        let message = Message { from: 1, to: 2, term: 5, entries: vec![entry(4, b"x")].into(), ..Message::default() };
        let (group, decoded) = decode_message(&encode_message(3, &message)).expect("decodes");
        assert_eq!((group, decoded), (3, message));
        assert!(decode_message(&[1, 2]).is_err());
    }
}
