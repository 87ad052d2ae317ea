//! Secret values never reach a journal: every string in a record's attributes has each
//! configured secret replaced before the line is written, and session recordings have them
//! replaced in the text they record ([`StreamRedactor`]: output comes in chunks, and a secret
//! split across two is replaced whole).

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
        self.with_secrets(|extra| self.walk(value, extra));
    }

    /// `text` with every secret replaced.
    pub fn redact_text(&self, text: &mut String) {
        self.with_secrets(|extra| self.redact_str(text, extra));
    }

    /// Runs `f` with the live secrets (none without live ones), under their lock.
    fn with_secrets<T>(&self, f: impl FnOnce(&[String]) -> T) -> T {
        match &self.live {
            Some(live) => f(&live.0.read().expect("live secrets").secrets),
            None => f(&[]),
        }
    }

    /// The length of the longest proper prefix of a secret that `text` ends with: what a
    /// stream must hold back until its next chunk shows whether the secret follows.
    fn open_prefix(&self, text: &str) -> usize {
        self.with_secrets(|extra| {
            self.secrets
                .iter()
                .chain(extra)
                .map(|secret| {
                    let longest = (secret.len() - 1).min(text.len());
                    (1..=longest)
                        .rev()
                        .find(|&k| text.as_bytes().ends_with(&secret.as_bytes()[..k]))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0)
        })
    }

    /// Whether there is nothing to redact.
    fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.with_secrets(<[String]>::is_empty)
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

/// Redaction of text that comes in chunks (one stream of a session recording): a secret split
/// across chunks is replaced whole, since the end of a chunk that could begin a secret is held
/// back until the next chunk shows whether it does.
#[derive(Debug, Default)]
pub struct StreamRedactor {
    redactor: Redactor,
    held: String,
}

impl StreamRedactor {
    /// Redacts the secrets of `redactor`.
    pub fn new(redactor: Redactor) -> StreamRedactor {
        StreamRedactor {
            redactor,
            held: String::new(),
        }
    }

    /// The text of `chunk` that can be written now, secrets replaced; what could begin a
    /// secret is held back.
    pub fn push(&mut self, chunk: &str) -> String {
        if self.held.is_empty() && self.redactor.is_empty() {
            return chunk.to_string();
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(chunk);
        self.redactor.redact_text(&mut text);
        // The held part starts with a secret's first byte: a character boundary.
        let keep = text.len() - self.redactor.open_prefix(&text);
        self.held = text.split_off(keep);
        text
    }

    /// The stream's end: what was held back (it began no secret after all).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The stream was cut: what was held back (the start of a secret, perhaps) is dropped;
    /// its length.
    pub fn discard(&mut self) -> usize {
        std::mem::take(&mut self.held).len()
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
    fn a_secret_split_across_chunks_is_replaced_whole() {
        let live = LiveSecrets::default();
        let mut s = StreamRedactor::new(
            Redactor::new(["s3cr3t-value".to_string()]).with_live(live.clone()),
        );
        let mut out = s.push("token=s3c");
        assert_eq!(out, "token=", "the start of a secret is held back");
        out += &s.push("r3t");
        out += &s.push("-value and s3");
        // A live secret added mid-stream is redacted from then on, across chunks too.
        live.add(["another-one".to_string()]);
        out += &s.push("x another");
        out += &s.push("-one ☃ s3cr");
        assert_eq!(out, "token=[REDACTED] and s3x [REDACTED] ☃ ");
        // At the end, what was held back began no secret after all.
        out += &s.finish();
        assert_eq!(out, "token=[REDACTED] and s3x [REDACTED] ☃ s3cr");
        // Cut instead, a held start of a secret is dropped.
        let mut cut = StreamRedactor::new(Redactor::new(["s3cr3t-value".to_string()]));
        assert_eq!(cut.push("ab s3cr3t-"), "ab ");
        assert_eq!(cut.discard(), "s3cr3t-".len());
        assert_eq!(cut.finish(), "");
    }

    #[test]
    fn without_secrets_a_stream_passes_as_it_is() {
        let mut s = StreamRedactor::default();
        assert_eq!(s.push("anything"), "anything");
        assert_eq!(s.finish(), "");
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
