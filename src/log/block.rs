//! Encoding of the two packed record kinds of log format 2: entry blocks and index postings.
//!
//! A group commit stores its entries as a few **blocks** (one sled record each, keyed by the
//! first `added` it holds) and, for every channel or target name its entries mention, one
//! **posting** (the ascending positions of that name in the group). Both are self-contained:
//! a block lists each entry's own `added`, a posting its positions, so retention can rewrite
//! either under its old key with only the positions it keeps.
//!
//! Block value: `BLOCK_VERSION` (u8), the base position (u64 BE), the entry count (u32 BE),
//! then a table with, per entry, its `added` minus the base and the end of its JSON in the
//! bodies (u32 BE each), then the JSON bodies back to back. A reader finds one entry by a
//! binary search of the table. Posting value: the positions as varint deltas, the first
//! from 0.

use super::keys::describe_key;
use super::LogError;

/// The first byte of every block.
const BLOCK_VERSION: u8 = 1;
/// Most bytes of a varint-encoded u64.
const VARINT_LEN_MAX: usize = 10;

/// Appends `value` to `out` as an unsigned LEB128 varint.
pub(super) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one varint at `*at`, moving `*at` past it.
pub(super) fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in 0..VARINT_LEN_MAX {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f).checked_shl(7 * shift as u32)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Bytes of the block header: version, base and count.
const BLOCK_HEADER_LEN: usize = 1 + 8 + 4;
/// Bytes of one table row: the position's offset from the base and the body's end.
const BLOCK_ROW_LEN: usize = 8;

/// Builds the blocks of one group commit, each within the given limits.
pub(super) struct BlockBuilder {
    /// Most entries in one block.
    entries_max: usize,
    /// Bytes after which a block is closed (a single larger entry still gets a block).
    bytes_max: usize,
    /// Finished blocks: `(first added, value)`.
    done: Vec<(u64, Vec<u8>)>,
    /// The open block.
    open: Option<OpenBlock>,
}

/// A block being filled.
struct OpenBlock {
    base: u64,
    /// `(added - base, end of the body)` per entry.
    rows: Vec<(u32, u32)>,
    bodies: Vec<u8>,
}

impl OpenBlock {
    fn new(base: u64) -> OpenBlock {
        OpenBlock {
            base,
            rows: Vec::new(),
            bodies: Vec::new(),
        }
    }

    /// The row of an entry at `added` with `len` bytes, if this block can still take it.
    fn row_for(&self, added: u64, len: usize) -> Option<(u32, u32)> {
        let offset = u32::try_from(added.checked_sub(self.base)?).ok()?;
        let end = u32::try_from(self.bodies.len().checked_add(len)?).ok()?;
        Some((offset, end))
    }

    fn push(&mut self, row: (u32, u32), json: &[u8]) {
        self.rows.push(row);
        self.bodies.extend_from_slice(json);
    }

    fn finish(self) -> (u64, Vec<u8>) {
        let mut value = Vec::with_capacity(
            BLOCK_HEADER_LEN + self.rows.len() * BLOCK_ROW_LEN + self.bodies.len(),
        );
        value.push(BLOCK_VERSION);
        value.extend_from_slice(&self.base.to_be_bytes());
        // Blocks hold at most `entries_max` entries, far below 4 billion.
        let count = u32::try_from(self.rows.len()).unwrap_or(u32::MAX);
        value.extend_from_slice(&count.to_be_bytes());
        for (offset, end) in &self.rows {
            value.extend_from_slice(&offset.to_be_bytes());
            value.extend_from_slice(&end.to_be_bytes());
        }
        value.extend_from_slice(&self.bodies);
        (self.base, value)
    }
}

impl BlockBuilder {
    pub(super) fn new(entries_max: usize, bytes_max: usize) -> BlockBuilder {
        BlockBuilder {
            entries_max: entries_max.max(1),
            bytes_max,
            done: Vec::new(),
            open: None,
        }
    }

    /// Adds the entry stored at `added` (above every `added` pushed before).
    pub(super) fn push(&mut self, added: u64, json: &[u8]) {
        let fits = self.open.as_ref().and_then(|block| {
            let room = block.rows.len() < self.entries_max
                && block.bodies.len() + json.len() <= self.bytes_max;
            room.then(|| block.row_for(added, json.len())).flatten()
        });
        let row = match fits {
            Some(row) => row,
            None => {
                self.close();
                let block = OpenBlock::new(added);
                let row = block.row_for(added, json.len());
                self.open = Some(block);
                // A single entry of 4 GiB or more cannot be stored in a block; entries are
                // bounded by the frame size limit, far below that.
                row.unwrap_or((0, u32::MAX))
            }
        };
        if let Some(block) = self.open.as_mut() {
            block.push(row, json);
        }
    }

    fn close(&mut self) {
        if let Some(block) = self.open.take() {
            self.done.push(block.finish());
        }
    }

    /// The blocks, as `(first added, value)`.
    pub(super) fn finish(mut self) -> Vec<(u64, Vec<u8>)> {
        self.close();
        self.done
    }
}

/// One stored block, read in place.
pub(super) struct Block<V: AsRef<[u8]>> {
    /// The record's key, for error messages.
    key: Vec<u8>,
    value: V,
    base: u64,
    count: usize,
}

impl<V: AsRef<[u8]>> Block<V> {
    /// A block read from the record `key`; checks its version and that its table fits.
    pub(super) fn new(key: &[u8], value: V) -> Result<Block<V>, LogError> {
        let corrupt = |reason: &str| LogError::Corrupt {
            key: describe_key(key),
            reason: reason.to_owned(),
        };
        let bytes = value.as_ref();
        if bytes.first() != Some(&BLOCK_VERSION) {
            return Err(corrupt("not a block of log format 2"));
        }
        let header = bytes
            .get(..BLOCK_HEADER_LEN)
            .ok_or_else(|| corrupt("block header cut short"))?;
        let base = u64::from_be_bytes(header[1..9].try_into().map_err(|_| corrupt("base"))?);
        let count = u32::from_be_bytes(header[9..13].try_into().map_err(|_| corrupt("count"))?);
        let count = count as usize;
        let table_end = count
            .checked_mul(BLOCK_ROW_LEN)
            .and_then(|len| len.checked_add(BLOCK_HEADER_LEN))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| corrupt("block table cut short"))?;
        let block = Block {
            key: key.to_vec(),
            value,
            base,
            count,
        };
        // The last body must end inside the value: then every body does.
        if count > 0 {
            let (_, end) = block.row(count - 1);
            if table_end + end as usize > block.value.as_ref().len() {
                return Err(corrupt("block bodies cut short"));
            }
        }
        Ok(block)
    }

    /// Row `index` of the table: `(added - base, end of the body)`.
    fn row(&self, index: usize) -> (u32, u32) {
        let at = BLOCK_HEADER_LEN + index * BLOCK_ROW_LEN;
        let bytes = self.value.as_ref();
        let word = |from: usize| {
            bytes
                .get(from..from + 4)
                .and_then(|word| <[u8; 4]>::try_from(word).ok())
                .map_or(0, u32::from_be_bytes)
        };
        (word(at), word(at + 4))
    }

    /// Entry `index`: its `added` and JSON.
    fn entry(&self, index: usize) -> Result<(u64, &[u8]), LogError> {
        let bodies = BLOCK_HEADER_LEN + self.count * BLOCK_ROW_LEN;
        let start = match index {
            0 => 0,
            _ => self.row(index - 1).1 as usize,
        };
        let (offset, end) = self.row(index);
        let json = self
            .value
            .as_ref()
            .get(bodies + start..bodies + end as usize)
            .ok_or_else(|| LogError::Corrupt {
                key: describe_key(&self.key),
                reason: "block entry out of bounds".to_owned(),
            })?;
        Ok((self.base.saturating_add(u64::from(offset)), json))
    }

    /// The entries as `(added, JSON)`, ascending.
    pub(super) fn entries(&self) -> impl Iterator<Item = Result<(u64, &[u8]), LogError>> {
        (0..self.count).map(|index| self.entry(index))
    }

    /// The JSON of the entry at `added`, if the block holds it.
    pub(super) fn get(&self, added: u64) -> Result<Option<&[u8]>, LogError> {
        let Some(offset) = added
            .checked_sub(self.base)
            .and_then(|offset| u32::try_from(offset).ok())
        else {
            return Ok(None);
        };
        // Rows ascend by offset: binary search over the table.
        let (mut low, mut high) = (0, self.count);
        while low < high {
            let middle = (low + high) / 2;
            let (at, _) = self.row(middle);
            match at.cmp(&offset) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return self.entry(middle).map(|(_, json)| Some(json)),
            }
        }
        Ok(None)
    }

    /// The highest `added` the block holds (its base for an empty one).
    pub(super) fn last(&self) -> u64 {
        match self.count {
            0 => self.base,
            count => self.base.saturating_add(u64::from(self.row(count - 1).0)),
        }
    }

    /// The record's key.
    pub(super) fn key(&self) -> &[u8] {
        &self.key
    }
}

/// A block value holding `entries` (ascending, spanning less than 2^32 positions), for
/// retention's rewrite.
pub(super) fn encode_block<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut builder = BlockBuilder::new(usize::MAX, usize::MAX);
    for (added, json) in entries {
        builder.push(added, json);
    }
    builder
        .finish()
        .pop()
        .map(|(_, value)| value)
        .unwrap_or_else(|| {
            let (_, value) = OpenBlock::new(0).finish();
            value
        })
}

/// A posting value holding `positions` (ascending).
pub(super) fn encode_posting(positions: &[u64]) -> Vec<u8> {
    let mut value = Vec::with_capacity(positions.len() * 2);
    let mut last = 0;
    for &added in positions {
        put_varint(&mut value, added - last);
        last = added;
    }
    value
}

/// The positions of a posting value, ascending.
pub(super) fn decode_posting(key: &[u8], value: &[u8]) -> Result<Vec<u64>, LogError> {
    let mut positions = Vec::new();
    let mut at = 0;
    let mut last = 0u64;
    while at < value.len() {
        let added = get_varint(value, &mut at)
            .and_then(|delta| last.checked_add(delta))
            .ok_or_else(|| LogError::Corrupt {
                key: describe_key(key),
                reason: "posting cut short".to_owned(),
            })?;
        positions.push(added);
        last = added;
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX - 1, u64::MAX] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            let mut at = 0;
            assert_eq!(get_varint(&bytes, &mut at), Some(value));
            assert_eq!(at, bytes.len());
        }
        assert_eq!(get_varint(&[0x80], &mut 0), None);
    }

    #[test]
    fn a_builder_splits_blocks_at_its_entry_and_byte_limits() {
        let mut builder = BlockBuilder::new(2, 1_000);
        for added in 5..10 {
            builder.push(added, b"{}");
        }
        let blocks = builder.finish();
        let firsts: Vec<u64> = blocks.iter().map(|(first, _)| *first).collect();
        assert_eq!(firsts, vec![5, 7, 9]);

        let mut builder = BlockBuilder::new(100, 10);
        builder.push(1, b"0123456789abc");
        builder.push(2, b"x");
        builder.push(3, b"y");
        let blocks = builder.finish();
        assert_eq!(
            blocks.len(),
            2,
            "an entry larger than the limit gets a block alone"
        );
    }

    #[test]
    fn a_torn_block_is_refused_instead_of_inventing_entries() {
        let value = encode_block([(3, &b"{\"a\":1}"[..]), (4, &b"{}"[..])]);
        for cut in 0..value.len() {
            assert!(Block::new(b"b", &value[..cut]).is_err(), "cut at {cut}");
        }
        let block = Block::new(b"b", value.as_slice()).expect("whole block");
        assert_eq!(block.get(4).expect("get"), Some(&b"{}"[..]));
        assert_eq!(block.get(5).expect("get"), None);
        assert_eq!(block.last(), 4);
        assert!(Block::new(b"b", &b"\x07"[..]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_refused_or_read_without_panicking(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..200),
            looks_like_a_block in any::<bool>(),
            probe in any::<u64>(),
        ) {
            if looks_like_a_block && bytes.len() >= BLOCK_HEADER_LEN {
                bytes[0] = BLOCK_VERSION;
                // A base near the top, so offsets added to it would overflow.
                bytes[1..9].copy_from_slice(&(u64::MAX - 3).to_be_bytes());
                // A small count, so the table often fits.
                let count = u32::from(bytes[12] % 4);
                bytes[9..13].copy_from_slice(&count.to_be_bytes());
            }
            if let Ok(block) = Block::new(b"b", bytes.as_slice()) {
                let _ = block.entries().count();
                let _ = block.get(probe);
                let _ = block.last();
            }
            let _ = decode_posting(b"c", &bytes);
        }

        #[test]
        fn blocks_and_postings_return_what_was_encoded(
            gaps in proptest::collection::vec(1u64..1_000, 0..50),
            start in 1u64..u64::MAX / 2,
        ) {
            let mut positions = Vec::new();
            let mut added = start;
            for gap in gaps {
                positions.push(added);
                added += gap;
            }
            let jsons: Vec<String> = positions.iter().map(|p| format!("{{\"p\":{p}}}")).collect();
            let mut builder = BlockBuilder::new(7, 64);
            for (p, json) in positions.iter().zip(&jsons) {
                builder.push(*p, json.as_bytes());
            }
            let mut read = Vec::new();
            for (first, value) in builder.finish() {
                let block = Block::new(b"b", value.as_slice()).expect("block");
                let entries: Vec<(u64, Vec<u8>)> = block
                    .entries()
                    .map(|item| item.map(|(a, j)| (a, j.to_vec())))
                    .collect::<Result<_, _>>()
                    .expect("entries");
                prop_assert_eq!(entries.first().map(|e| e.0), Some(first));
                prop_assert_eq!(block.last(), entries.last().map_or(0, |e| e.0));
                for (a, json) in &entries {
                    prop_assert_eq!(block.get(*a).expect("get"), Some(json.as_slice()));
                }
                read.extend(entries);
            }
            let expected: Vec<(u64, Vec<u8>)> =
                positions.iter().zip(&jsons).map(|(p, j)| (*p, j.as_bytes().to_vec())).collect();
            prop_assert_eq!(read, expected);
            prop_assert_eq!(decode_posting(b"c", &encode_posting(&positions)).expect("posting"), positions);
        }
    }
}
