//! Encoding of the two packed record kinds of log format 2: entry blocks and index postings.
//!
//! A group commit stores its entries as a few **blocks** (one sled record each, keyed by the
//! first `added` it holds) and, for every channel or target name its entries mention, one
//! **posting** (the ascending positions of that name in the group). Both are self-contained:
//! a block lists each entry's own `added`, a posting its positions, so retention can rewrite
//! either under its old key with only the positions it keeps.
//!
//! Block value: `BLOCK_VERSION`, then per entry the `added` as a varint delta from the
//! previous one (from 0 for the first), the JSON length as a varint, and the JSON text.
//! Posting value: the positions as varint deltas, the first from 0.

use super::keys::describe_key;
use super::LogError;

/// The first byte of every block.
const BLOCK_VERSION: u8 = 1;
/// Most bytes of a varint-encoded u64.
const VARINT_LEN_MAX: usize = 10;

/// Appends `value` to `out` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one varint at `*at`, moving `*at` past it.
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
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

/// Builds the blocks of one group commit, each within the given limits.
pub(super) struct BlockBuilder {
    /// Most entries in one block.
    entries_max: usize,
    /// Bytes after which a block is closed (a single larger entry still gets a block).
    bytes_max: usize,
    /// Finished blocks: `(first added, value)`.
    done: Vec<(u64, Vec<u8>)>,
    /// The open block: its first `added`, the last, the entries in it and its value.
    open: Option<OpenBlock>,
}

struct OpenBlock {
    first: u64,
    last: u64,
    entries: usize,
    value: Vec<u8>,
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
        let full = self.open.as_ref().is_some_and(|block| {
            block.entries >= self.entries_max || block.value.len() + json.len() > self.bytes_max
        });
        if full {
            self.close();
        }
        let block = self.open.get_or_insert_with(|| OpenBlock {
            first: added,
            last: 0,
            entries: 0,
            value: vec![BLOCK_VERSION],
        });
        put_varint(&mut block.value, added - block.last);
        put_varint(&mut block.value, json.len() as u64);
        block.value.extend_from_slice(json);
        block.last = added;
        block.entries += 1;
    }

    fn close(&mut self) {
        if let Some(block) = self.open.take() {
            self.done.push((block.first, block.value));
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
}

impl<V: AsRef<[u8]>> Block<V> {
    /// A block read from the record `key`; checks its version.
    pub(super) fn new(key: &[u8], value: V) -> Result<Block<V>, LogError> {
        if value.as_ref().first() != Some(&BLOCK_VERSION) {
            return Err(LogError::Corrupt {
                key: describe_key(key),
                reason: "not a block of log format 2".to_owned(),
            });
        }
        Ok(Block {
            key: key.to_vec(),
            value,
        })
    }

    /// The entries as `(added, JSON)`, ascending.
    pub(super) fn entries(&self) -> BlockEntries<'_> {
        BlockEntries {
            bytes: self.value.as_ref(),
            at: 1,
            added: 0,
            key: &self.key,
        }
    }

    /// The JSON of the entry at `added`, if the block holds it.
    pub(super) fn get(&self, added: u64) -> Result<Option<&[u8]>, LogError> {
        for item in self.entries() {
            let (at, json) = item?;
            if at == added {
                return Ok(Some(json));
            }
            if at > added {
                break;
            }
        }
        Ok(None)
    }

    /// The highest `added` the block holds (0 for an empty one).
    pub(super) fn last(&self) -> Result<u64, LogError> {
        let mut last = 0;
        for item in self.entries() {
            last = item?.0;
        }
        Ok(last)
    }

    /// The record's key.
    pub(super) fn key(&self) -> &[u8] {
        &self.key
    }
}

/// Iterator over a block's entries.
pub(super) struct BlockEntries<'a> {
    bytes: &'a [u8],
    at: usize,
    added: u64,
    key: &'a [u8],
}

impl<'a> Iterator for BlockEntries<'a> {
    type Item = Result<(u64, &'a [u8]), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let parsed = (|| {
            let delta = get_varint(self.bytes, &mut self.at)?;
            let len = usize::try_from(get_varint(self.bytes, &mut self.at)?).ok()?;
            let end = self.at.checked_add(len)?;
            let json = self.bytes.get(self.at..end)?;
            self.at = end;
            Some((self.added.checked_add(delta)?, json))
        })();
        match parsed {
            Some((added, json)) => {
                self.added = added;
                Some(Ok((added, json)))
            }
            None => {
                // Stop here: what follows a torn entry cannot be trusted.
                self.at = self.bytes.len();
                Some(Err(LogError::Corrupt {
                    key: describe_key(self.key),
                    reason: "block entry cut short".to_owned(),
                }))
            }
        }
    }
}

/// A block value holding `entries` (ascending), for retention's rewrite.
pub(super) fn encode_block<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut value = vec![BLOCK_VERSION];
    let mut last = 0;
    for (added, json) in entries {
        put_varint(&mut value, added - last);
        put_varint(&mut value, json.len() as u64);
        value.extend_from_slice(json);
        last = added;
    }
    value
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
    fn a_torn_block_reports_corruption_instead_of_inventing_entries() {
        let value = encode_block([(3, &b"{\"a\":1}"[..]), (4, &b"{}"[..])]);
        let torn = &value[..value.len() - 1];
        let block = Block::new(b"b", torn).expect("version byte present");
        let items: Vec<_> = block.entries().collect();
        assert!(matches!(items[0], Ok((3, _))));
        assert!(items[1].is_err());
        assert!(Block::new(b"b", &b"\x07"[..]).is_err());
    }

    proptest! {
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
                prop_assert_eq!(block.last().expect("last"), entries.last().map_or(0, |e| e.0));
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
