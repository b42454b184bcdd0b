//! What a `heartbeat` payload holds, read leniently as the system agentgate replaces did.
//!
//! That system acknowledged every heartbeat and stored missing fields as empty, so agent
//! builds that send fewer fields, or new ones, kept working. Here every heartbeat is
//! acknowledged and stored: the known fields with their value when it has the right type
//! and `null` otherwise, unknown fields as sent (the Engine.IO payload limit bounds them).
//! A payload that is not an object, or a known field of the wrong type, is also reported
//! to the agent with an `error` event, never instead of the acknowledgement.

use serde_json::{Map, Value};

/// The fields DESIGN.md names, with the JSON type each must have.
const KNOWN: [(&str, Expect); 4] = [
    ("cpu_usage", Expect::Number),
    ("memory_usage", Expect::Number),
    ("disk_usage", Expect::Number),
    ("timestamp", Expect::String),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Number,
    String,
}

impl Expect {
    fn accepts(self, v: &Value) -> bool {
        match self {
            Self::Number => v.is_number(),
            Self::String => v.is_string(),
        }
    }

    fn article(self) -> &'static str {
        match self {
            Self::Number => "a number",
            Self::String => "a string",
        }
    }
}

/// A heartbeat as stored, and what was wrong with it, if anything.
#[derive(Debug)]
pub(crate) struct Reading {
    /// Always an object holding every known field (value or `null`) and the unknown ones.
    pub stored: Value,
    pub problem: Option<Problem>,
}

/// Why the agent gets an `error` event beside its `heartbeat_ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// The payload is missing or is not a JSON object (`what` it is instead).
    NotAnObject(String),
    /// Known fields whose value has the wrong type, each with the type it must have.
    WrongType(Vec<(&'static str, &'static str)>),
}

impl Problem {
    /// The label of `agentgate_heartbeats_malformed_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotAnObject(_) => "not_an_object",
            Self::WrongType(_) => "wrong_type",
        }
    }

    /// The `message` of the `error` event.
    pub fn message(&self) -> String {
        match self {
            Self::NotAnObject(what) => format!(
                "heartbeat payload must be a JSON object, got {what}; acknowledged and stored with every field null"
            ),
            Self::WrongType(fields) => {
                let list: Vec<String> = fields
                    .iter()
                    .map(|(f, t)| format!("`{f}` must be {t}"))
                    .collect();
                format!(
                    "heartbeat field {}; acknowledged and stored with {} null",
                    list.join(", field "),
                    if fields.len() == 1 {
                        "that field"
                    } else {
                        "those fields"
                    }
                )
            }
        }
    }
}

/// Reads a heartbeat payload; `data` is the parser's result (an error when the event
/// carried no data or data that is not JSON).
pub(crate) fn read(data: Result<Value, String>) -> Reading {
    let mut object = match data {
        Ok(Value::Object(o)) => o,
        Ok(other) => return not_an_object(kind(&other).to_owned()),
        Err(e) => return not_an_object(format!("no usable data ({e})")),
    };
    let mut wrong = Vec::new();
    for (field, expect) in KNOWN {
        match object.get_mut(field) {
            None => {
                object.insert(field.to_owned(), Value::Null);
            }
            Some(Value::Null) => {}
            Some(v) if expect.accepts(v) => {}
            Some(v) => {
                *v = Value::Null;
                wrong.push((field, expect.article()));
            }
        }
    }
    Reading {
        stored: Value::Object(object),
        problem: (!wrong.is_empty()).then_some(Problem::WrongType(wrong)),
    }
}

fn not_an_object(what: String) -> Reading {
    let stored: Map<String, Value> = KNOWN
        .iter()
        .map(|(f, _)| ((*f).to_owned(), Value::Null))
        .collect();
    Reading {
        stored: Value::Object(stored),
        problem: Some(Problem::NotAnObject(what)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_full_heartbeat_is_stored_as_sent() {
        let hb = json!({"cpu_usage": 0.5, "memory_usage": 1, "disk_usage": 2, "timestamp": "2025-11-13T12:00:00"});
        let r = read(Ok(hb.clone()));
        assert_eq!((r.stored, r.problem), (hb, None));
    }

    #[test]
    fn missing_fields_are_null_and_not_a_problem() {
        let r = read(Ok(json!({"cpu_usage": 0.5, "gpu_usage": 0.25})));
        assert_eq!(r.problem, None);
        assert_eq!(
            r.stored,
            json!({"cpu_usage": 0.5, "memory_usage": null, "disk_usage": null, "timestamp": null, "gpu_usage": 0.25})
        );
    }

    #[test]
    fn a_mistyped_known_field_is_null_and_named() {
        let r = read(Ok(
            json!({"cpu_usage": "high", "memory_usage": 1, "disk_usage": 1, "timestamp": 5, "extra": [1]}),
        ));
        assert_eq!(
            r.stored,
            json!({"cpu_usage": null, "memory_usage": 1, "disk_usage": 1, "timestamp": null, "extra": [1]})
        );
        let problem = r.problem.unwrap();
        assert_eq!(problem.label(), "wrong_type");
        assert_eq!(
            problem.message(),
            "heartbeat field `cpu_usage` must be a number, field `timestamp` must be a string; acknowledged and stored with those fields null"
        );
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_stored_empty() {
        for (data, what) in [
            (Ok(json!("text")), "a string"),
            (Ok(json!([1, 2])), "an array"),
            (Ok(Value::Null), "null"),
            (Err("invalid event data".to_owned()), "no usable data"),
        ] {
            let r = read(data);
            assert_eq!(
                r.stored,
                json!({"cpu_usage": null, "memory_usage": null, "disk_usage": null, "timestamp": null})
            );
            let problem = r.problem.unwrap();
            assert_eq!(problem.label(), "not_an_object");
            assert!(problem.message().contains(what), "{}", problem.message());
            assert!(problem.message().starts_with("heartbeat"));
        }
    }
}
