//! The id index: the `added` of every stored action id, for de-duplication and `added_of`.
//!
//! Logux ids have the form `time node seq` (decimal `time` and `seq`). Such ids are kept in
//! chunks, one sled record for up to `ID_CHUNK_IDS_MAX` ids of one node: `j` + node + 0x00 +
//! time (u64 BE) + seq (u64 BE) of the chunk's first id → the chunk's ids with their `added`.
//! A client's `sync` of twenty actions then costs one id record, not twenty.
//!
//! Invariant: the chunks of one node hold disjoint, sorted ranges of `(time, seq)`, so the
//! only chunk that can hold an id is the last one whose key is at or below the id's. Clocks
//! step back, so a new group's ids may fall inside an older chunk's range: then every chunk
//! the new range touches is merged with it and written again, cut into chunks of at most
//! `ID_CHUNK_IDS_MAX`. Only the log's writer task changes chunks, at the end of a group
//! commit, against the store as every earlier group left it.
//!
//! Ids of any other form keep one record each: `i` + id → added (u64 BE).

use super::block::{get_varint, put_varint};
use super::keys::{decode_added, describe_key, id_key};
use super::writer::CountedBatch;
use super::LogError;
use std::collections::{BTreeMap, HashMap};

/// Prefix of the chunked id records.
pub(super) const ID_CHUNK_PREFIX: u8 = b'j';
/// Most ids in one chunk record (about 12 bytes each).
pub(super) const ID_CHUNK_IDS_MAX: usize = 256;
/// A new group's ids of a node join the chunk before them (one record rewritten instead of
/// one more record) while the two hold at most this many ids together; a larger chunk is not
/// rewritten for a few more ids.
pub(super) const ID_CHUNK_APPEND_IDS_MAX: usize = 64;
/// Separator between the node and the position in a chunk key; nodes never contain it.
const NODE_END: u8 = 0;

/// Where an id sorts within its node: `(time, seq)`.
type At = (u64, u64);

/// One id of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Item {
    at: At,
    added: u64,
}

/// The node and position of an id of the form `time node seq`, written canonically (so that
/// the three parts give back exactly this id); `None` for any other id.
fn parse(id: &str) -> Option<(&str, At)> {
    let (time, rest) = id.split_once(' ')?;
    let (node, seq) = rest.rsplit_once(' ')?;
    if node.is_empty() || node.as_bytes().contains(&NODE_END) {
        return None;
    }
    Some((node, (canonical_number(time)?, canonical_number(seq)?)))
}

/// A decimal number without sign or leading zeros.
fn canonical_number(text: &str) -> Option<u64> {
    let digits = text.bytes().all(|byte| byte.is_ascii_digit());
    if !digits || text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

/// `j` + node + separator: the start of every chunk key of `node`.
fn chunk_prefix(node: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(2 + node.len());
    prefix.push(ID_CHUNK_PREFIX);
    prefix.extend_from_slice(node.as_bytes());
    prefix.push(NODE_END);
    prefix
}

/// Key of the chunk of `prefix` whose first id is at `at`.
fn chunk_key(prefix: &[u8], at: At) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 16);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&at.0.to_be_bytes());
    key.extend_from_slice(&at.1.to_be_bytes());
    key
}

/// A chunk's value: the last id's position (to answer "not here" without decoding the rest),
/// the count, then each id as time delta, seq and added, all varints.
fn encode_chunk(items: &[Item]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + items.len() * 12);
    let last = items.last().map_or((0, 0), |item| item.at);
    put_varint(&mut value, last.0);
    put_varint(&mut value, last.1);
    put_varint(&mut value, items.len() as u64);
    let mut time = 0;
    for item in items {
        put_varint(&mut value, item.at.0 - time);
        put_varint(&mut value, item.at.1);
        put_varint(&mut value, item.added);
        time = item.at.0;
    }
    value
}

/// The position of a chunk's last id.
fn chunk_last(key: &[u8], value: &[u8]) -> Result<At, LogError> {
    let mut at = 0;
    let time = get_varint(value, &mut at);
    let seq = get_varint(value, &mut at);
    time.zip(seq)
        .ok_or_else(|| corrupt(key, "a chunk without its last id"))
}

/// The ids of a chunk, sorted.
fn decode_chunk(key: &[u8], value: &[u8]) -> Result<Vec<Item>, LogError> {
    let mut at = 0;
    let mut next = || get_varint(value, &mut at).ok_or_else(|| corrupt(key, "a torn chunk"));
    next()?;
    next()?;
    let count = next()?;
    let mut items = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(ID_CHUNK_IDS_MAX));
    let mut time = 0u64;
    for _ in 0..count {
        time = time
            .checked_add(next()?)
            .ok_or_else(|| corrupt(key, "a time past u64"))?;
        let seq = next()?;
        let added = next()?;
        items.push(Item {
            at: (time, seq),
            added,
        });
    }
    Ok(items)
}

fn corrupt(key: &[u8], reason: &str) -> LogError {
    LogError::Corrupt {
        key: describe_key(key),
        reason: reason.to_owned(),
    }
}

/// The `added` stored for `id`, if any.
pub(super) fn lookup(db: &sled::Db, id: &str) -> Result<Option<u64>, LogError> {
    let Some((node, at)) = parse(id) else {
        let key = id_key(id);
        return match db.get(&key)? {
            Some(value) => decode_added(&key, &value).map(Some),
            None => Ok(None),
        };
    };
    let prefix = chunk_prefix(node);
    let Some(found) = db
        .range(prefix.clone()..=chunk_key(&prefix, at))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = found?;
    if chunk_last(&key, &value)? < at {
        return Ok(None);
    }
    let items = decode_chunk(&key, &value)?;
    Ok(items
        .binary_search_by_key(&at, |item| item.at)
        .ok()
        .map(|index| items[index].added))
}

/// The newest id position stored for each node, read once per group commit (the store does
/// not change while a group is staged): an id after it, as a node's new ids usually are,
/// needs no further read.
#[derive(Debug, Default)]
pub(super) struct NodeHeads(HashMap<String, Option<At>>);

impl NodeHeads {
    /// `lookup`, answered from the node's head when the id is newer.
    pub(super) fn lookup(&mut self, db: &sled::Db, id: &str) -> Result<Option<u64>, LogError> {
        if let Some((node, at)) = parse(id) {
            let head = match self.0.get(node) {
                Some(&head) => head,
                None => {
                    let head = node_head(db, node)?;
                    self.0.insert(node.to_owned(), head);
                    head
                }
            };
            if head.is_none_or(|head| at > head) {
                return Ok(None);
            }
        }
        lookup(db, id)
    }

    /// Forgets every head: the next group reads them again.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// The position of the newest id stored for `node`: the last id of its last chunk.
fn node_head(db: &sled::Db, node: &str) -> Result<Option<At>, LogError> {
    match db.scan_prefix(chunk_prefix(node)).next_back() {
        Some(found) => {
            let (key, value) = found?;
            chunk_last(&key, &value).map(Some)
        }
        None => Ok(None),
    }
}

/// What one group commit changes in the id index: the ids it stores and the ids retention
/// removes (each only while it still points at that `added`).
#[derive(Debug, Default)]
pub(super) struct IdChanges {
    /// Chunked ids by node: stored (`true`) or removed.
    nodes: HashMap<String, Vec<(Item, bool)>>,
    /// Ids of any other form: `(id, added, stored)`.
    single: Vec<(String, u64, bool)>,
}

impl IdChanges {
    /// The group stores `id` at `added`.
    pub(super) fn store(&mut self, id: &str, added: u64) {
        self.change(id, added, true);
    }

    /// Retention removed the entry at `added`, whose id is `id`.
    pub(super) fn forget(&mut self, id: &str, added: u64) {
        self.change(id, added, false);
    }

    fn change(&mut self, id: &str, added: u64, stored: bool) {
        match parse(id) {
            Some((node, at)) => self
                .nodes
                .entry(node.to_owned())
                .or_default()
                .push((Item { at, added }, stored)),
            None => self.single.push((id.to_owned(), added, stored)),
        }
    }

    /// Adds the changed records to `batch`, read against `db` as the earlier groups left it.
    pub(super) fn stage(self, db: &sled::Db, batch: &mut CountedBatch) -> Result<(), LogError> {
        for (id, added, stored) in self.single {
            let key = id_key(&id);
            if stored {
                batch.insert(&key, added.to_be_bytes());
            } else if db.get(&key)?.as_deref() == Some(&added.to_be_bytes()[..]) {
                batch.remove(&key);
            }
        }
        // Sorted, so that the batch is the same on every run.
        let nodes: BTreeMap<String, Vec<(Item, bool)>> = self.nodes.into_iter().collect();
        for (node, changes) in nodes {
            stage_node(db, &chunk_prefix(&node), changes, batch)?;
        }
        Ok(())
    }
}

/// Applies one node's changes to its chunks.
fn stage_node(
    db: &sled::Db,
    prefix: &[u8],
    changes: Vec<(Item, bool)>,
    batch: &mut CountedBatch,
) -> Result<(), LogError> {
    let mut stored: Vec<Item> = Vec::new();
    let mut forgotten: Vec<Item> = Vec::new();
    for (item, is_stored) in changes {
        if is_stored {
            stored.push(item);
        } else {
            forgotten.push(item);
        }
    }
    stored.sort_by_key(|item| item.at);
    // The chunks this group touches, by their key in the store.
    let mut loaded: BTreeMap<Vec<u8>, Vec<Item>> = BTreeMap::new();
    for item in &forgotten {
        if let Some(found) = db
            .range(prefix.to_vec()..=chunk_key(prefix, item.at))
            .next_back()
        {
            load(&mut loaded, found?)?;
        }
    }
    // Chunks merged with the stored ids: every chunk that starts inside their range, and the
    // one before it when that range reaches into it or it is small enough to take them.
    let mut merged_keys: Vec<Vec<u8>> = Vec::new();
    if let (Some(first), Some(last)) = (stored.first(), stored.last()) {
        let (from, to) = (chunk_key(prefix, first.at), chunk_key(prefix, last.at));
        if let Some(found) = db.range(prefix.to_vec()..from.clone()).next_back() {
            let (key, value) = found?;
            let reaches = chunk_last(&key, &value)? >= first.at;
            let items = load(&mut loaded, (key.clone(), value))?;
            if reaches || items + stored.len() <= ID_CHUNK_APPEND_IDS_MAX {
                merged_keys.push(key.to_vec());
            }
        }
        for found in db.range(from..=to) {
            let (key, value) = found?;
            merged_keys.push(key.to_vec());
            load(&mut loaded, (key, value))?;
        }
    }
    let originals: BTreeMap<Vec<u8>, usize> = loaded
        .iter()
        .map(|(key, items)| (key.clone(), items.len()))
        .collect();
    for item in &forgotten {
        // The only chunk that can hold it: the last loaded one at or below it.
        if let Some((_, items)) = loaded.range_mut(..=chunk_key(prefix, item.at)).next_back() {
            items.retain(|kept| kept != item);
        }
    }
    // The chunks to write, by their (new) key.
    let mut finals: BTreeMap<Vec<u8>, Vec<Item>> = BTreeMap::new();
    if !stored.is_empty() {
        let mut items = Vec::new();
        for key in &merged_keys {
            if let Some(chunk) = loaded.remove(key) {
                items.extend(chunk);
            }
        }
        items.extend(stored);
        // Stable: an id already stored (never the case after de-duplication) stays as it was.
        items.sort_by_key(|item| item.at);
        items.dedup_by_key(|item| item.at);
        for chunk in items.chunks(ID_CHUNK_IDS_MAX) {
            finals.insert(chunk_key(prefix, chunk[0].at), chunk.to_vec());
        }
    }
    // A chunk only retention changed keeps its ids where they are, under the key of its new
    // first id; an emptied one goes; an unchanged one is not written.
    let mut unchanged: Vec<Vec<u8>> = Vec::new();
    for (key, items) in loaded {
        if originals.get(&key) == Some(&items.len()) {
            unchanged.push(key);
        } else if let Some(first) = items.first() {
            finals.insert(chunk_key(prefix, first.at), items);
        }
    }
    for key in originals.keys() {
        if !unchanged.contains(key) && !finals.contains_key(key) {
            batch.remove(key);
        }
    }
    for (key, items) in finals {
        batch.insert(&key, encode_chunk(&items));
    }
    Ok(())
}

/// Decodes a chunk read from the store into `loaded` (once) and returns how many ids it holds.
fn load(
    loaded: &mut BTreeMap<Vec<u8>, Vec<Item>>,
    (key, value): (sled::IVec, sled::IVec),
) -> Result<usize, LogError> {
    if let Some(items) = loaded.get(key.as_ref()) {
        return Ok(items.len());
    }
    let items = decode_chunk(&key, &value)?;
    let len = items.len();
    loaded.insert(key.to_vec(), items);
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn only_canonical_logux_ids_are_chunked() {
        assert_eq!(
            parse("1700000000000 10:abc:tab 0"),
            Some(("10:abc:tab", (1_700_000_000_000, 0)))
        );
        assert_eq!(parse("5 server:x y 12"), Some(("server:x y", (5, 12))));
        for id in [
            "abc", "1 a", "01 a 0", "1 a 01", "1  0", "-1 a 0", "1 a +0", "1 a\0b 0", "",
        ] {
            assert_eq!(parse(id), None, "{id:?}");
        }
    }

    #[test]
    fn a_torn_chunk_is_reported_not_read() {
        let items = vec![
            Item {
                at: (1, 0),
                added: 1,
            },
            Item {
                at: (3, 2),
                added: 7,
            },
        ];
        let value = encode_chunk(&items);
        assert_eq!(decode_chunk(b"j", &value).expect("whole"), items);
        for cut in 0..value.len() {
            assert!(decode_chunk(b"j", &value[..cut]).is_err(), "cut at {cut}");
        }
    }

    fn id(node: u8, (time, seq): At) -> String {
        format!("{time} n{node} {seq}")
    }

    /// Every node's chunks are sorted, disjoint, non-empty and at most `ID_CHUNK_IDS_MAX`.
    fn check_chunks(db: &sled::Db) {
        let mut last: Option<(Vec<u8>, At)> = None;
        for record in db.scan_prefix([ID_CHUNK_PREFIX]) {
            let (key, value) = record.expect("read");
            let items = decode_chunk(&key, &value).expect("decodes");
            assert!(
                !items.is_empty() && items.len() <= ID_CHUNK_IDS_MAX,
                "{} ids",
                items.len()
            );
            assert!(
                items.windows(2).all(|pair| pair[0].at < pair[1].at),
                "sorted"
            );
            assert_eq!(key.as_ref(), chunk_key(&key[..key.len() - 16], items[0].at));
            assert_eq!(
                chunk_last(&key, &value).expect("last"),
                items[items.len() - 1].at
            );
            let prefix = key[..key.len() - 16].to_vec();
            if let Some((previous_prefix, previous_last)) = &last {
                if *previous_prefix == prefix {
                    assert!(*previous_last < items[0].at, "chunks overlap");
                }
            }
            last = Some((prefix, items[items.len() - 1].at));
        }
    }

    /// One group: ids to store (node, at) and stored ids to forget, by index into the model.
    type Group = (Vec<(u8, At)>, Vec<(usize, bool)>);

    fn groups() -> impl Strategy<Value = Vec<Group>> {
        let at = (0u64..40, 0u64..12);
        let group = (
            prop::collection::vec((0u8..2, at), 0..120),
            prop::collection::vec((any::<usize>(), any::<bool>()), 0..30),
        );
        prop::collection::vec(group, 1..25)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Stores and forgets, in any order and overlapping any earlier chunk, find exactly
        /// the ids the model holds, and keep the chunks disjoint.
        #[test]
        fn chunks_find_exactly_the_stored_ids(groups in groups()) {
            let db = sled::Config::new().temporary(true).open().expect("db");
            let mut model: HashMap<String, u64> = HashMap::new();
            let mut next_added = 1;
            for (stores, forgets) in groups {
                let mut changes = IdChanges::default();
                let stored_before: Vec<(String, u64)> = {
                    let mut all: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                    all.sort();
                    all
                };
                let mut in_group = Vec::new();
                for (node, at) in stores {
                    let id = id(node, at);
                    if model.contains_key(&id) || in_group.contains(&id) {
                        continue;
                    }
                    changes.store(&id, next_added);
                    in_group.push(id.clone());
                    model.insert(id, next_added);
                    next_added += 1;
                }
                if !stored_before.is_empty() {
                    for (pick, right_added) in forgets {
                        let (id, added) = &stored_before[pick % stored_before.len()];
                        if right_added {
                            if model.get(id) == Some(added) {
                                model.remove(id);
                            }
                            changes.forget(id, *added);
                        } else {
                            // Points elsewhere: nothing to forget.
                            changes.forget(id, added + 1_000_000);
                        }
                    }
                }
                let mut batch = CountedBatch::default();
                changes.stage(&db, &mut batch).expect("staged");
                db.apply_batch(batch.finish().0).expect("applied");
                check_chunks(&db);
            }
            for node in 0..2 {
                for time in 0..40 {
                    for seq in 0..12 {
                        let id = id(node, (time, seq));
                        prop_assert_eq!(lookup(&db, &id).expect("lookup"), model.get(&id).copied(), "{}", id);
                    }
                }
            }
        }
    }

    #[test]
    fn node_heads_answer_like_the_index() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let mut changes = IdChanges::default();
        for (time, added) in [(5, 1), (9, 2), (7, 3)] {
            changes.store(&id(1, (time, 0)), added);
        }
        changes.store("odd id", 4);
        let mut batch = CountedBatch::default();
        changes.stage(&db, &mut batch).expect("staged");
        db.apply_batch(batch.finish().0).expect("applied");
        let mut heads = NodeHeads::default();
        for time in 0..12 {
            for node in 1..3 {
                let id = id(node, (time, 0));
                assert_eq!(
                    heads.lookup(&db, &id).expect("head"),
                    lookup(&db, &id).expect("index")
                );
            }
        }
        assert_eq!(heads.lookup(&db, &id(1, (9, 0))).expect("head"), Some(2));
        assert_eq!(heads.lookup(&db, "odd id").expect("single"), Some(4));
    }

    #[test]
    fn a_sync_of_twenty_actions_costs_one_id_record() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        for round in 0..3u64 {
            let mut changes = IdChanges::default();
            for seq in 0..20 {
                changes.store(&id(1, (1000 + round, seq)), round * 20 + seq + 1);
            }
            let mut batch = CountedBatch::default();
            changes.stage(&db, &mut batch).expect("staged");
            let (batch, written) = batch.finish();
            assert_eq!(written.records, 1);
            db.apply_batch(batch).expect("applied");
        }
        // The later rounds were added to the first chunk, which had room.
        assert_eq!(db.scan_prefix([ID_CHUNK_PREFIX]).count(), 1);
        assert_eq!(lookup(&db, &id(1, (1002, 19))).expect("lookup"), Some(60));
    }
}
