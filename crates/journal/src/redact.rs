//! Secret values never reach a journal: every string in a record's attributes has each
//! configured secret replaced before the line is written.

use std::sync::{Arc, RwLock};

use serde_json::Value;

/// What a secret is replaced by.
pub const REDACTED: &str = "[REDACTED]";

/// The secret values to take out of records.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<String>,
    /// Values shared with other journals and added to while they run.
    live: Option<LiveSecrets>,
}

/// Secret values every journal of a host redacts, added to while the journals are open (a
/// secret set or rotated is redacted from the next line on). Values are only added: one rotated
/// out stays redacted.
#[derive(Debug, Clone, Default)]
pub struct LiveSecrets(Arc<RwLock<Redactor>>);

impl LiveSecrets {
    /// Redacts `secrets` too from now on.
    pub fn add(&self, secrets: impl IntoIterator<Item = String>) {
        self.0.write().expect("live secrets").extend(secrets);
    }
}

impl Redactor {
    /// A redactor for `secrets` (empty ones ignored).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut r = Redactor::default();
        r.extend(secrets);
        r
    }

    /// Adds more secrets.
    pub fn extend(&mut self, secrets: impl IntoIterator<Item = String>) {
        self.secrets
            .extend(secrets.into_iter().filter(|s| !s.is_empty()));
        self.secrets
            .sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        self.secrets.dedup();
    }

    /// The same, also redacting what `live` holds whenever a record is written.
    pub fn with_live(mut self, live: LiveSecrets) -> Redactor {
        self.live = Some(live);
        self
    }

    /// `value` with every secret in every string (and object key) replaced.
    pub fn redact(&self, value: &mut Value) {
        match &self.live {
            Some(live) => {
                let live = live.0.read().expect("live secrets");
                self.walk(value, &live.secrets);
            }
            None => self.walk(value, &[]),
        }
    }

    /// Redacts this redactor's secrets and `extra` (sorted the same way) from `value`.
    fn walk(&self, value: &mut Value, extra: &[String]) {
        if self.secrets.is_empty() && extra.is_empty() {
            return;
        }
        match value {
            Value::String(s) => self.redact_str(s, extra),
            Value::Array(items) => items.iter_mut().for_each(|v| self.walk(v, extra)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (mut k, mut v) in entries {
                    self.redact_str(&mut k, extra);
                    self.walk(&mut v, extra);
                    map.insert(k, v);
                }
            }
            _ => {}
        }
    }

    /// Replaces the secrets of both lists, longest first across the two (so that a secret
    /// containing another is replaced whole, whichever list holds it).
    fn redact_str(&self, s: &mut String, extra: &[String]) {
        let (mut a, mut b) = (self.secrets.iter().peekable(), extra.iter().peekable());
        loop {
            let secret = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.len() >= y.len() => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => return,
            };
            let secret = secret.expect("peeked");
            if s.contains(secret.as_str()) {
                *s = s.replace(secret.as_str(), REDACTED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_replaced_in_strings_arrays_and_keys() {
        let r = Redactor::new(["hunter2".to_string(), "hunter22".into(), String::new()]);
        let mut v =
            serde_json::json!({"argv": ["echo", "pw=hunter22 hunter2"], "hunter2": 1, "n": 5});
        r.redact(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"argv": ["echo", "pw=[REDACTED] [REDACTED]"], "[REDACTED]": 1, "n": 5})
        );
    }

    #[test]
    fn live_secrets_added_later_are_redacted_from_then_on() {
        let live = LiveSecrets::default();
        let r = Redactor::new(["spec-value".to_string()]).with_live(live.clone());
        let mut before = serde_json::json!(["spec-value", "rotated-value"]);
        r.redact(&mut before);
        assert_eq!(before, serde_json::json!(["[REDACTED]", "rotated-value"]));
        // A live value containing the spec's is replaced whole.
        live.add(["rotated-value".to_string(), "x-spec-value-y".into()]);
        let mut after = serde_json::json!(["spec-value", "rotated-value", "x-spec-value-y"]);
        r.redact(&mut after);
        assert_eq!(
            after,
            serde_json::json!(["[REDACTED]", "[REDACTED]", "[REDACTED]"])
        );
    }
}
