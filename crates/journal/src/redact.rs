//! Secret values never reach a journal: every string in a record's attributes has each
//! configured secret replaced before the line is written.

use serde_json::Value;

/// What a secret is replaced by.
pub const REDACTED: &str = "[REDACTED]";

/// The secret values to take out of records.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<String>,
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

    /// `value` with every secret in every string (and object key) replaced.
    pub fn redact(&self, value: &mut Value) {
        if self.secrets.is_empty() {
            return;
        }
        match value {
            Value::String(s) => self.redact_str(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact(v)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (mut k, mut v) in entries {
                    self.redact_str(&mut k);
                    self.redact(&mut v);
                    map.insert(k, v);
                }
            }
            _ => {}
        }
    }

    fn redact_str(&self, s: &mut String) {
        for secret in &self.secrets {
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
}
