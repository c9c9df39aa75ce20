//! Key layout of the log's single sled tree.
//!
//! Every record lives in the default tree under a one-byte prefix, so that one group commit is
//! one `apply_batch` and therefore crash-atomic. This is log format 3 (`FORMAT_VERSION`):
//!
//! - `b` + first added (u64 big-endian) → a block of consecutive entries of one group commit
//!   (see `block`), each as JSON with `meta.added` set;
//! - the id index, for every entry without `Meta::fresh_id` (see `ids`): `j` + node + 0x00 +
//!   time + seq → a chunk of up to 256 ids of one node with their `added`, for ids of the
//!   form `time node seq`; `i` + action id → added (u64 big-endian) for any other id;
//! - `c` + channel + 0x00 + first added → a posting: the positions of the channel's entries
//!   in one group commit (channel index);
//! - `t` + kind (`u`, `c` or `n`) + name + 0x00 + first added → a posting of the targeted
//!   index;
//! - `m` + name → small metadata: `last_added`, `format` and the settings;
//! - `s` + object → its state, `q` + queue + added → a task.

use super::LogError;
use crate::action::Entry;

/// Prefix of the entry blocks, keyed by the first `added` they hold.
pub(super) const BLOCK_PREFIX: u8 = b'b';
/// Prefix of the entry records of log format 1 (one record per entry), only to recognise
/// such a data directory.
pub(super) const FORMAT_1_ENTRY_PREFIX: u8 = b'a';
/// The log format this code reads and writes, stored under `format_key`.
pub(super) const FORMAT_VERSION: u32 = 3;
/// Prefix of the id records of ids not of the form `time node seq`, which map the id to its
/// `added`.
pub(super) const ID_PREFIX: u8 = b'i';
/// Prefix of the channel index.
pub(super) const CHANNEL_PREFIX: u8 = b'c';
/// Prefix of the targeted index (users, clients and nodes).
pub(super) const TARGET_PREFIX: u8 = b't';
/// Prefix of the metadata records.
pub(super) const META_PREFIX: u8 = b'm';
/// Object states kept by reducers: `s` + object key -> added (u64 BE) + state bytes.
pub(super) const STATE_PREFIX: u8 = b's';
/// Durable tasks (pending back-end work): `q` + queue length (u32 BE) + queue + added (u64 BE)
/// → the caller's bytes.
pub(super) const TASK_PREFIX: u8 = b'q';
/// Bytes of the queue length in a task key.
const TASK_QUEUE_LEN_BYTES: usize = 4;
/// Name of the metadata record that holds the highest `added` ever assigned.
const LAST_ADDED_NAME: &[u8] = b"last_added";
/// Name of the metadata record that holds the log format (u32 big-endian).
const FORMAT_NAME: &[u8] = b"format";
/// Name prefix of the settings inside the metadata records, so that a setting can never
/// overwrite `last_added`.
const SETTING_NAME_PREFIX: &[u8] = b"setting:";
/// Separator between a name and the `added` in index keys; names never contain it.
const NAME_END: u8 = 0;
/// Length of an encoded `added`.
pub(super) const ADDED_LEN_BYTES: usize = 8;

/// The three kinds of targeted index records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TargetKind {
    /// Records of `meta.users`.
    User,
    /// Records of `meta.clients`.
    Client,
    /// Records of `meta.nodes`.
    Node,
}

impl TargetKind {
    /// The byte that follows the `t` prefix for this kind.
    fn byte(self) -> u8 {
        match self {
            TargetKind::User => b'u',
            TargetKind::Client => b'c',
            TargetKind::Node => b'n',
        }
    }
}

/// Key of the block whose first entry is at `added`.
pub(super) fn block_key(added: u64) -> [u8; 1 + ADDED_LEN_BYTES] {
    let mut key = [0; 1 + ADDED_LEN_BYTES];
    key[0] = BLOCK_PREFIX;
    key[1..].copy_from_slice(&added.to_be_bytes());
    key
}

/// Key of the id index record of `id`.
pub(super) fn id_key(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(ID_PREFIX);
    key.extend_from_slice(id.as_bytes());
    key
}

/// Key of the `last_added` metadata record.
pub(super) fn last_added_key() -> Vec<u8> {
    meta_key(LAST_ADDED_NAME)
}

/// Key of the `format` metadata record.
pub(super) fn format_key() -> Vec<u8> {
    meta_key(FORMAT_NAME)
}

/// Key of the setting called `name`.
pub(super) fn setting_key(name: &str) -> Vec<u8> {
    let mut inner = SETTING_NAME_PREFIX.to_vec();
    inner.extend_from_slice(name.as_bytes());
    meta_key(&inner)
}

/// Key of a metadata record.
fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(META_PREFIX);
    key.extend_from_slice(name);
    key
}

/// The start of the posting keys of one index name: the index head, the name and the
/// separator. `None` when the name contains the separator and therefore cannot be indexed.
pub(super) fn posting_prefix(head: &[u8], name: &str) -> Option<Vec<u8>> {
    if name.as_bytes().contains(&NAME_END) {
        return None;
    }
    let mut key = Vec::with_capacity(head.len() + name.len() + 1 + ADDED_LEN_BYTES);
    key.extend_from_slice(head);
    key.extend_from_slice(name.as_bytes());
    key.push(NAME_END);
    Some(key)
}

/// The head of the channel index.
pub(super) fn channel_head() -> [u8; 1] {
    [CHANNEL_PREFIX]
}

/// The head of the targeted index of one kind.
pub(super) fn target_head(kind: TargetKind) -> [u8; 2] {
    [TARGET_PREFIX, kind.byte()]
}

/// The key of the posting that starts at `first` under `prefix` (see `posting_prefix`).
pub(super) fn posting_key(prefix: &[u8], first: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + ADDED_LEN_BYTES);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&first.to_be_bytes());
    key
}

/// The posting prefixes of every channel and targeted name of `entry`, each once.
///
/// Names that contain the separator byte are skipped with a warning: they could be confused
/// with other names, and such names never come from valid clients.
pub(super) fn index_prefixes(entry: &Entry) -> Vec<Vec<u8>> {
    let meta = &entry.meta;
    let mut prefixes = Vec::new();
    let channel_head = channel_head();
    let groups: [(&[u8], &[String]); 4] = [
        (&channel_head, &meta.channels),
        (&target_head(TargetKind::User), &meta.users),
        (&target_head(TargetKind::Client), &meta.clients),
        (&target_head(TargetKind::Node), &meta.nodes),
    ];
    for (head, names) in groups {
        for name in names {
            match posting_prefix(head, name) {
                Some(prefix) if !prefixes.contains(&prefix) => prefixes.push(prefix),
                Some(_) => {}
                None => tracing::warn!(
                    id = %meta.id,
                    name = %name.escape_debug(),
                    "not indexing a name that contains a NUL byte"
                ),
            }
        }
    }
    prefixes
}

/// Decodes an `added` stored as a value.
pub(super) fn decode_added(key: &[u8], value: &[u8]) -> Result<u64, LogError> {
    let bytes: [u8; ADDED_LEN_BYTES] = value.try_into().map_err(|_| LogError::Corrupt {
        key: describe_key(key),
        reason: format!("expected {ADDED_LEN_BYTES} bytes, found {}", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes the `added` at the end of an entry or index key.
pub(super) fn added_suffix(key: &[u8]) -> Result<u64, LogError> {
    let split = key
        .len()
        .checked_sub(ADDED_LEN_BYTES)
        .ok_or_else(|| LogError::Corrupt {
            key: describe_key(key),
            reason: "key too short to hold a position".to_owned(),
        })?;
    decode_added(key, &key[split..])
}

/// A stored entry with its action still as text.
#[derive(serde::Deserialize)]
struct StoredEntry<'a> {
    #[serde(borrow)]
    action: &'a serde_json::value::RawValue,
    meta: crate::action::Meta,
}

/// Decodes a stored entry. The action's stored text becomes the entry's JSON text, so a
/// connection sending the entry does not serialize the action again.
pub(super) fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, LogError> {
    let corrupt = |error: serde_json::Error| LogError::Corrupt {
        key: describe_key(key),
        reason: error.to_string(),
    };
    let stored: StoredEntry = serde_json::from_slice(value).map_err(corrupt)?;
    let text = stored.action.get();
    if !text.starts_with('{') {
        return Err(LogError::Corrupt {
            key: describe_key(key),
            reason: "the stored action is not an object".to_owned(),
        });
    }
    Ok(Entry::from_action_json(text.into(), stored.meta))
}

/// The stored JSON of an entry, `{"action":…,"meta":…}`, with the action's JSON text as it
/// is (the same bytes `serde_json::to_vec(entry)` gives, without serializing the action
/// again).
pub(super) fn entry_json(entry: &Entry) -> Result<Vec<u8>, serde_json::Error> {
    let action = entry.action_json();
    let meta = serde_json::to_vec(&entry.meta)?;
    let mut json = Vec::with_capacity(action.len() + meta.len() + 20);
    json.extend_from_slice(b"{\"action\":");
    json.extend_from_slice(action.as_bytes());
    json.extend_from_slice(b",\"meta\":");
    json.extend_from_slice(&meta);
    json.push(b'}');
    Ok(json)
}

/// A printable form of a key for error messages.
pub(super) fn describe_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// The key of an object's state.
pub(super) fn state_key(object: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + object.len());
    key.push(STATE_PREFIX);
    key.extend_from_slice(object.as_bytes());
    key
}

/// The start of the task keys of `queue`: the prefix, the length and the name, so that no
/// queue's keys fall inside another's range whatever bytes the names hold.
pub(super) fn task_queue_prefix(queue: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + TASK_QUEUE_LEN_BYTES + queue.len() + ADDED_LEN_BYTES);
    key.push(TASK_PREFIX);
    // Queue names are client ids and other short names, far below 4 GiB.
    let len = u32::try_from(queue.len()).unwrap_or(u32::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(queue.as_bytes());
    key
}

/// The key of the task of `queue` for the entry at `added`.
pub(super) fn task_key(queue: &str, added: u64) -> Vec<u8> {
    let mut key = task_queue_prefix(queue);
    key.extend_from_slice(&added.to_be_bytes());
    key
}

/// The queue name and `added` of a task key.
pub(super) fn decode_task_key(key: &[u8]) -> Result<(String, u64), LogError> {
    let corrupt = |reason: &str| LogError::Corrupt {
        key: describe_key(key),
        reason: reason.to_owned(),
    };
    let len_end = 1 + TASK_QUEUE_LEN_BYTES;
    let len_bytes: [u8; TASK_QUEUE_LEN_BYTES] = key
        .get(1..len_end)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| corrupt("task key too short"))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let queue = key
        .get(len_end..len_end + len)
        .ok_or_else(|| corrupt("task key shorter than its queue name"))?;
    if key.len() != len_end + len + ADDED_LEN_BYTES {
        return Err(corrupt("task key has the wrong length"));
    }
    let queue = String::from_utf8(queue.to_vec()).map_err(|_| corrupt("queue is not UTF-8"))?;
    Ok((queue, added_suffix(key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_sort_by_added() {
        assert!(block_key(1) < block_key(2));
        assert!(block_key(255) < block_key(256));
        assert_eq!(added_suffix(&block_key(300)).ok(), Some(300));
    }

    #[test]
    fn posting_keys_of_different_names_never_overlap() {
        let short = posting_prefix(&channel_head(), "a").expect("indexable name");
        let long = posting_prefix(&channel_head(), "ab").expect("indexable name");
        let (short_start, short_end) = (posting_key(&short, 0), posting_key(&short, u64::MAX));
        assert!(!(short_start..=short_end).contains(&posting_key(&long, 0)));
    }

    #[test]
    fn task_keys_of_one_queue_sort_by_added_and_never_mix_with_others() {
        assert!(task_key("a", 2) < task_key("a", 10));
        let a = task_queue_prefix("a");
        assert!(!task_key("ab", 1).starts_with(&a));
        assert!(!task_key("a\0", 1).starts_with(&a));
        assert_eq!(
            decode_task_key(&task_key("10:x", 7)).ok(),
            Some(("10:x".to_owned(), 7))
        );
        assert!(decode_task_key(b"q\0\0\0\x09ab").is_err());
    }

    #[test]
    fn a_decoded_entry_keeps_the_stored_text_of_its_action() {
        let entry = Entry::new(
            serde_json::json!({ "type": "a", "text": "é\"\n", "n": 1.5, "z": [1, {"b": null}] }),
            crate::action::Meta {
                id: "1 a 0".to_owned(),
                added: 3,
                ..crate::action::Meta::default()
            },
        );
        let stored = serde_json::to_vec(&entry).expect("encode");
        let decoded = decode_entry(b"b", &stored).expect("decode");
        assert_eq!(decoded, entry);
        assert_eq!(
            decoded.action_json(),
            serde_json::to_string(entry.action()).expect("encode action")
        );
        assert_eq!(entry_json(&entry).expect("encode"), stored);
        assert_eq!(entry_json(&decoded).expect("encode"), stored);
        assert!(decode_entry(b"b", br#"{"action":{"type":"a"},"meta":{}}"#).is_err());
        assert!(decode_entry(b"b", br#"{"action":[1],"meta":{"id":"1 a 0","time":1}}"#).is_err());
    }

    #[test]
    fn names_with_nul_are_not_indexed() {
        assert_eq!(posting_prefix(&channel_head(), "a\0b"), None);
    }
}
