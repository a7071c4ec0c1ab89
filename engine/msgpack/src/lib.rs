//! A bounded pre-check of untrusted MessagePack bytes.
//!
//! serde trusts a declared sequence length up to `size_hint::cautious`'s cap
//! (1 MiB of elements) and preallocates before reading a single element, so
//! a 6-byte payload declaring a million-element array costs a megabyte per
//! decode. [`check_bounds`] walks the bytes once, without allocating and
//! without recursing deeper than the caller's cap, and refuses every
//! declared length the remaining bytes could not possibly encode: each
//! array element needs at least one byte, each map entry two, and a string,
//! binary or extension its declared bytes. Once it has accepted a payload,
//! whatever serde preallocates is bounded by the payload's length.
//!
//! The walk accepts only what a MessagePack decoder could also read, so
//! calling it first never refuses a message the decoder would accept
//! (within the depth cap the caller gives, which should match the one the
//! decoder enforces).

/// Why bytes were refused before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// A container declares more values than the bytes left could hold
    /// (counting every value still owed by the containers around it).
    #[error("at byte {offset}: {declared} values declared where {remaining} bytes remain")]
    CountBeyondBytes { offset: usize, declared: u64, remaining: usize },
    /// A string, binary or extension declares more bytes than are left.
    #[error("at byte {offset}: {declared} bytes declared where {remaining} remain")]
    LengthBeyondBytes { offset: usize, declared: u64, remaining: usize },
    #[error("at byte {offset}: nested deeper than {limit}")]
    TooDeep { offset: usize, limit: usize },
    /// 0xc1 is reserved: no encoder writes it and no decoder reads it.
    #[error("at byte {offset}: reserved marker 0xc1")]
    ReservedMarker { offset: usize },
    #[error("the bytes end inside a value at byte {offset}")]
    Truncated { offset: usize },
}

/// Walks the one MessagePack value at the start of `bytes` and returns how
/// many bytes it spans; trailing bytes are left to the caller to judge.
///
/// Containers nested more than `depth_max` deep are refused (a scalar at
/// the top is depth 0, an array around it depth 1).
pub fn check_bounds(bytes: &[u8], depth_max: usize) -> Result<usize, BoundsError> {
    let mut walk = Walk { bytes, position: 0, owed: 1, depth_max };
    walk.value(0)?;
    Ok(walk.position)
}

struct Walk<'a> {
    bytes: &'a [u8],
    position: usize,
    /// Values declared by the containers open so far and not yet begun:
    /// each needs at least one byte, so this never exceeds what remains.
    owed: u64,
    depth_max: usize,
}

/// What a marker says follows it.
enum Shape {
    /// This many more bytes hold the value.
    Fixed(usize),
    /// A `header`-byte big-endian length of data bytes follows, plus
    /// `extra` bytes (an extension's type).
    Sized { header: usize, extra: u64 },
    /// An array or map header of `header` bytes; `per_entry` values per
    /// declared entry (1 for arrays, 2 for maps).
    Container { header: usize, per_entry: u64 },
    /// A fixarray or fixmap: the count of values is in the marker.
    FixContainer { values: u64 },
    /// A fixstr: its length is in the marker.
    FixString { length: u64 },
}

impl Walk<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn take(&mut self, count: usize) -> Result<&[u8], BoundsError> {
        let taken = self
            .bytes
            .get(self.position..)
            .and_then(|rest| rest.get(..count))
            .ok_or(BoundsError::Truncated { offset: self.position })?;
        self.position += count;
        Ok(taken)
    }

    fn length(&mut self, header: usize) -> Result<u64, BoundsError> {
        Ok(self.take(header)?.iter().fold(0, |length, &byte| length << 8 | u64::from(byte)))
    }

    fn skip_data(&mut self, offset: usize, declared: u64) -> Result<(), BoundsError> {
        let remaining = self.remaining();
        match usize::try_from(declared) {
            Ok(length) if length <= remaining => {
                self.position += length;
                Ok(())
            }
            _ => Err(BoundsError::LengthBeyondBytes { offset, declared, remaining }),
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), BoundsError> {
        let offset = self.position;
        let marker = self.take(1)?[0];
        self.owed -= 1;
        let values = match shape(marker).ok_or(BoundsError::ReservedMarker { offset })? {
            Shape::Fixed(bytes) => {
                self.take(bytes)?;
                return Ok(());
            }
            Shape::FixString { length } => return self.skip_data(offset, length),
            Shape::Sized { header, extra } => {
                let declared = self.length(header)?;
                return self.skip_data(offset, declared + extra);
            }
            Shape::FixContainer { values } => values,
            Shape::Container { header, per_entry } => self.length(header)? * per_entry,
        };
        if values == 0 {
            return Ok(());
        }
        if depth >= self.depth_max {
            return Err(BoundsError::TooDeep { offset, limit: self.depth_max });
        }
        let remaining = self.remaining();
        self.owed += values;
        if self.owed > remaining as u64 {
            return Err(BoundsError::CountBeyondBytes { offset, declared: values, remaining });
        }
        // Bounded work: every value consumes at least one of the bytes
        // counted above.
        for _ in 0..values {
            self.value(depth + 1)?;
        }
        Ok(())
    }
}

fn shape(marker: u8) -> Option<Shape> {
    Some(match marker {
        0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => Shape::Fixed(0),
        0x80..=0x8f => Shape::FixContainer { values: u64::from(marker & 0x0f) * 2 },
        0x90..=0x9f => Shape::FixContainer { values: u64::from(marker & 0x0f) },
        0xa0..=0xbf => Shape::FixString { length: u64::from(marker & 0x1f) },
        0xc1 => return None,
        // bin 8/16/32 and str 8/16/32.
        0xc4 | 0xd9 => Shape::Sized { header: 1, extra: 0 },
        0xc5 | 0xda => Shape::Sized { header: 2, extra: 0 },
        0xc6 | 0xdb => Shape::Sized { header: 4, extra: 0 },
        // ext 8/16/32: the length, then a type byte, then the data.
        0xc7 => Shape::Sized { header: 1, extra: 1 },
        0xc8 => Shape::Sized { header: 2, extra: 1 },
        0xc9 => Shape::Sized { header: 4, extra: 1 },
        0xca | 0xce | 0xd2 => Shape::Fixed(4),
        0xcb | 0xcf | 0xd3 => Shape::Fixed(8),
        0xcc | 0xd0 => Shape::Fixed(1),
        0xcd | 0xd1 => Shape::Fixed(2),
        // fixext 1/2/4/8/16: a type byte and the data.
        0xd4 => Shape::Fixed(2),
        0xd5 => Shape::Fixed(3),
        0xd6 => Shape::Fixed(5),
        0xd7 => Shape::Fixed(9),
        0xd8 => Shape::Fixed(17),
        0xdc => Shape::Container { header: 2, per_entry: 1 },
        0xdd => Shape::Container { header: 4, per_entry: 1 },
        0xde => Shape::Container { header: 2, per_entry: 2 },
        0xdf => Shape::Container { header: 4, per_entry: 2 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPTH: usize = 12;

    #[test]
    fn well_formed_values_are_measured() {
        let cases: &[&[u8]] = &[
            &[0x00],
            &[0xc0],
            &[0xcf, 1, 2, 3, 4, 5, 6, 7, 8],
            &[0xa3, b'a', b'b', b'c'],
            &[0xd9, 2, b'h', b'i'],
            &[0xc4, 0],
            &[0x92, 0x01, 0xa1, b'x'],
            &[0x81, 0xa1, b'k', 0x90],
            &[0xdc, 0, 2, 0xc2, 0xc3],
            &[0xde, 0, 1, 0x01, 0x02],
            &[0xd4, 7, 0],
            &[0xc7, 2, 7, 0, 0],
        ];
        for bytes in cases {
            assert_eq!(check_bounds(bytes, DEPTH), Ok(bytes.len()), "{bytes:x?}");
        }
        let mut trailing = vec![0x91, 0x05];
        trailing.push(0xc0);
        assert_eq!(check_bounds(&trailing, DEPTH), Ok(2), "trailing bytes are the caller's to judge");
    }

    #[test]
    fn a_million_element_array_in_six_bytes_is_refused() {
        let bytes = [0xdd, 0x00, 0x0f, 0x42, 0x40, 0xc0];
        assert_eq!(
            check_bounds(&bytes, DEPTH),
            Err(BoundsError::CountBeyondBytes { offset: 0, declared: 1_000_000, remaining: 1 })
        );
    }

    #[test]
    fn map_entries_count_twice() {
        // Two bytes left: enough for a one-entry map, not a two-entry one.
        assert_eq!(check_bounds(&[0x81, 0x01, 0x02], DEPTH), Ok(3));
        assert_eq!(
            check_bounds(&[0x82, 0x01, 0x02], DEPTH),
            Err(BoundsError::CountBeyondBytes { offset: 0, declared: 4, remaining: 2 })
        );
        assert!(matches!(
            check_bounds(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0x01], DEPTH),
            Err(BoundsError::CountBeyondBytes { declared: 0x1_ffff_fffe, .. })
        ));
    }

    #[test]
    fn values_owed_by_outer_containers_count_against_inner_ones() {
        // The outer array owes two more values after the inner one; the
        // inner one's three elements and those two need five bytes.
        let bytes = [0x93, 0x93, 0x01, 0x02, 0x03, 0x04];
        assert_eq!(
            check_bounds(&bytes, DEPTH),
            Err(BoundsError::CountBeyondBytes { offset: 1, declared: 3, remaining: 4 })
        );
    }

    #[test]
    fn strings_binaries_and_extensions_longer_than_the_bytes_are_refused() {
        for bytes in [
            &[0xdb, 0xff, 0xff, 0xff, 0xff, b'x'][..],
            &[0xc6, 0x00, 0x10, 0x00, 0x00, 0x00],
            &[0xa5, b'a', b'b'],
            &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00],
            // The extension's type byte counts too.
            &[0xc7, 0x01, 0x07],
        ] {
            assert!(
                matches!(check_bounds(bytes, DEPTH), Err(BoundsError::LengthBeyondBytes { offset: 0, .. })),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn nesting_is_capped_without_recursing_past_the_cap() {
        let nested = |depth: usize| -> Vec<u8> { std::iter::repeat_n(0x91, depth).chain([0xc0]).collect() };
        assert_eq!(check_bounds(&nested(DEPTH), DEPTH), Ok(DEPTH + 1));
        assert_eq!(check_bounds(&nested(DEPTH + 1), DEPTH), Err(BoundsError::TooDeep { offset: DEPTH, limit: DEPTH }));
        assert!(matches!(check_bounds(&nested(1_000_000), DEPTH), Err(BoundsError::TooDeep { .. })));
        // Empty containers open nothing.
        assert_eq!(check_bounds(&[0x90], 0), Ok(1));
    }

    #[test]
    fn truncated_and_reserved_bytes_are_refused() {
        assert_eq!(check_bounds(&[], DEPTH), Err(BoundsError::Truncated { offset: 0 }));
        assert_eq!(check_bounds(&[0xcd, 0x01], DEPTH), Err(BoundsError::Truncated { offset: 1 }));
        assert_eq!(check_bounds(&[0xdd, 0x00], DEPTH), Err(BoundsError::Truncated { offset: 1 }));
        assert_eq!(check_bounds(&[0x91, 0xc1], DEPTH), Err(BoundsError::ReservedMarker { offset: 1 }));
    }

    #[test]
    fn every_prefix_and_every_byte_is_handled() {
        let value = [0x82, 0xa1, b'a', 0x92, 0xcd, 0x01, 0x02, 0xc3, 0xa1, b'b', 0xc4, 0x02, 0xff, 0xfe];
        assert_eq!(check_bounds(&value, DEPTH), Ok(value.len()));
        for cut in 0..value.len() {
            assert!(check_bounds(&value[..cut], DEPTH).is_err(), "cut at {cut}");
        }
        for marker in 0..=u8::MAX {
            let mut bytes = vec![marker];
            bytes.extend_from_slice(&[0xff; 20]);
            let _ = check_bounds(&bytes, DEPTH);
        }
    }
}
