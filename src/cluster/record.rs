//! The messages of the shared stream: one per log entry (or per finished task without
//! entries), JSON, keyed for JetStream de-duplication by a message id.

use crate::action::Entry;
use crate::log::{Append, Replicated, TaskOp, TaskRef};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The version of the message format; a node refuses messages of another version instead
/// of guessing (it stops applying and reports itself not ready).
pub const RECORD_VERSION: u32 = 1;

/// One stream message as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub v: u32,
    /// The entry, without `added` (the stream sequence is its `added`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// The entry's id was just generated and is not indexed (`Meta::fresh_id`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// Stored only if the action with this id was stored at this sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<(String, u64)>,
    /// A task created with the entry: queue and value (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<(String, String)>,
    /// Applied only while this task exists (a task's result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<TaskRef>,
    /// Tasks this message finishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<TaskRef>,
    /// Only in the stream's first message: a random name of this stream's history, which
    /// every view stores; a stream deleted and created again gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// The message id of the epoch record: nodes starting together on a new stream publish it
/// once between them.
pub const EPOCH_MSG_ID: &str = "ferry-epoch";

/// Why a stream message cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the expected shape.
    #[error("undecodable stream message at sequence {seq}: {reason}")]
    Decode {
        /// Its sequence.
        seq: u64,
        /// The decoder's complaint.
        reason: String,
    },
    /// Written by a Ferry with another message format.
    #[error("stream message at sequence {seq} has format version {version}, this Ferry reads {RECORD_VERSION}")]
    Version {
        /// Its sequence.
        seq: u64,
        /// Its version.
        version: u32,
    },
}

/// One message to publish: its JetStream message id, its record, and, for an answer, the
/// index (in the same append) of the action it answers, whose sequence it must name.
#[derive(Debug)]
pub struct Planned {
    /// The JetStream message id (de-duplication within the stream's window).
    pub msg_id: String,
    /// The record; `answers` is filled in once the answered action's sequence is known.
    pub record: Record,
    /// Index of the answered action's message in the same plan.
    pub answers_message: Option<usize>,
}

/// The messages of one append, in order. Answers come after the message they answer (they
/// are published once its sequence is known). A task finished by the append (`Done`) makes
/// every message depend on it, and the last message removes it; an append of only `Done`s
/// is one message.
pub fn plan(append: &Append) -> Vec<Planned> {
    let mut done = Vec::new();
    let mut created = Vec::new();
    for task in &append.tasks {
        match task {
            TaskOp::Add {
                queue,
                entry,
                value,
            } => created.push((*entry, queue.clone(), value.clone())),
            TaskOp::Done { queue, added } => done.push((queue.clone(), *added)),
        }
    }
    let requires = done.first().cloned();
    let mut planned: Vec<Planned> = Vec::with_capacity(append.entries.len().max(1));
    for (index, entry) in append.entries.iter().enumerate() {
        let answers_message = (entry.meta.answers_previous && index > 0).then(|| index - 1);
        let task = created
            .iter()
            .find(|(at, _, _)| *at == index)
            .map(|(_, queue, value)| {
                (
                    queue.clone(),
                    base64::engine::general_purpose::STANDARD.encode(value),
                )
            });
        let msg_id = match answers_message {
            // Filled in with the answered sequence before publishing (`answer_id`).
            Some(_) => String::new(),
            None => entry.meta.id.clone(),
        };
        planned.push(Planned {
            msg_id,
            record: Record {
                v: RECORD_VERSION,
                entry: Some(entry.clone()),
                fresh: entry.meta.fresh_id,
                answers: None,
                task,
                requires: requires.clone(),
                done: Vec::new(),
                epoch: None,
            },
            answers_message,
        });
    }
    if !done.is_empty() {
        match planned.last_mut() {
            Some(last) => last.record.done = done,
            None => planned.push(Planned {
                msg_id: done
                    .iter()
                    .map(|(queue, added)| format!("done {queue} {added}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                record: Record {
                    v: RECORD_VERSION,
                    done,
                    ..Record::default()
                },
                answers_message: None,
            }),
        }
    }
    planned
}

/// The message id of an answer to action `id` stored at `seq`: the same for every re-send of
/// that answer, so JetStream drops repeats within its window.
pub fn answer_id(id: &str, seq: u64) -> String {
    format!("answer {seq} {id}")
}

/// Decodes a stream message at `seq` into what the log applies.
pub fn decode(seq: u64, payload: &[u8]) -> Result<Replicated, RecordError> {
    let record: Record = serde_json::from_slice(payload).map_err(|error| RecordError::Decode {
        seq,
        reason: error.to_string(),
    })?;
    if record.v != RECORD_VERSION {
        return Err(RecordError::Version {
            seq,
            version: record.v,
        });
    }
    let task = match record.task {
        Some((queue, value)) => {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|error| RecordError::Decode {
                    seq,
                    reason: format!("task value: {error}"),
                })?;
            Some((queue, value))
        }
        None => None,
    };
    let entry = record.entry.map(|mut entry| {
        entry.meta.fresh_id = record.fresh;
        entry
    });
    Ok(Replicated {
        seq,
        entry,
        answers: record.answers,
        task,
        requires: record.requires,
        done: record.done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Meta;
    use serde_json::json;

    fn entry(id: &str) -> Entry {
        Entry::new(
            json!({"type": "a"}),
            Meta {
                id: id.to_owned(),
                ..Meta::default()
            },
        )
    }

    #[test]
    fn an_action_and_its_answer_become_two_messages_and_the_answer_names_the_action() {
        let mut answer = entry("2 server:x 0");
        answer.meta.fresh_id = true;
        answer.meta.answers_previous = true;
        let (reply, _) = tokio::sync::oneshot::channel();
        let append = Append::new(vec![entry("1 a:b:c 0"), answer], Vec::new(), None, reply);
        let planned = plan(&append);
        assert_eq!(planned.len(), 2);
        assert_eq!(planned[0].msg_id, "1 a:b:c 0");
        assert_eq!(planned[0].answers_message, None);
        assert_eq!(planned[1].answers_message, Some(0));
        assert!(planned[1].record.fresh);
    }

    #[test]
    fn a_finished_task_guards_every_message_of_its_result_and_the_last_removes_it() {
        let (reply, _) = tokio::sync::oneshot::channel();
        let done = TaskOp::Done {
            queue: "q".to_owned(),
            added: 7,
        };
        let append = Append::new(
            vec![entry("1 server:api:x 0"), entry("2 server:y 0")],
            vec![done],
            None,
            reply,
        );
        let planned = plan(&append);
        assert!(planned
            .iter()
            .all(|p| p.record.requires == Some(("q".to_owned(), 7))));
        assert!(planned[0].record.done.is_empty());
        assert_eq!(planned[1].record.done, vec![("q".to_owned(), 7)]);
    }

    #[test]
    fn a_message_round_trips_with_its_task_and_a_foreign_version_is_refused() {
        let (reply, _) = tokio::sync::oneshot::channel();
        let add = TaskOp::Add {
            queue: "q".to_owned(),
            entry: 0,
            value: b"{\"x\":1}".to_vec(),
        };
        let append = Append::new(vec![entry("1 a:b:c 0")], vec![add], None, reply);
        let planned = plan(&append);
        let bytes = serde_json::to_vec(&planned[0].record).expect("encode");
        let replicated = decode(5, &bytes).expect("decode");
        assert_eq!(replicated.seq, 5);
        assert_eq!(
            replicated.task,
            Some(("q".to_owned(), b"{\"x\":1}".to_vec()))
        );
        let foreign = br#"{"v": 2}"#;
        assert!(matches!(
            decode(6, foreign),
            Err(RecordError::Version { version: 2, .. })
        ));
        assert!(matches!(decode(7, b"{"), Err(RecordError::Decode { .. })));
    }
}
