//! Session recordings in the asciicast v2 format (what `asciinema` writes and plays): a header
//! line (`version`, `width`, `height`, `timestamp`), then one JSON array per event,
//! `[seconds, code, data]`, with `o` for output (stdout and stderr alike), `i` for input typed
//! into a terminal, `r` for a resize (`"COLSxROWS"`) and `m` for a marker.
//!
//! [`CastEncoder`] turns what an exec produced into those lines. The guest is hostile: its
//! output may be any bytes, so each stream is decoded as UTF-8 on its own (a character split
//! across two chunks is kept whole; invalid bytes become U+FFFD, which JSON can carry), and at
//! most `cap` bytes of data are recorded; past the cap one `m` event marks the cut and the rest
//! is only counted. Secret values are replaced in what is recorded ([`CastEncoder::redacting`]),
//! output and input alike, before a line is made.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::redact::{Redactor, StreamRedactor};

/// The label of the marker written where a recording was cut at its cap.
pub const TRUNCATED_MARKER: &str = "hutch: recording truncated";

/// A recording's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always 2.
    pub version: u32,
    /// Terminal columns.
    pub width: u16,
    /// Terminal rows.
    pub height: u16,
    /// When the recording started, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
}

impl Header {
    /// Its line, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a header serialises");
        line.push(b'\n');
        line
    }
}

/// Where recorded data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The process's standard output.
    Stdout,
    /// Its standard error (recorded as output too: a terminal shows both).
    Stderr,
    /// What was typed into its terminal.
    Input,
}

impl Source {
    fn code(self) -> &'static str {
        match self {
            Source::Stdout | Source::Stderr => "o",
            Source::Input => "i",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One event of a recording, as read back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CastEvent(
    /// Seconds since the recording started.
    pub f64,
    /// `o`, `i`, `r` or `m`.
    pub String,
    /// The data (text, a `COLSxROWS` size, a marker's label).
    pub String,
);

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CastError {
    /// The first line is not an asciicast v2 header.
    #[error("not an asciicast v2 header")]
    Header(#[source] Option<serde_json::Error>),
    /// A later line is not an event.
    #[error("line {line} is not an asciicast event")]
    Event {
        /// Its number (1 is the header).
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a whole recording: its header and events.
pub fn parse(bytes: &[u8]) -> Result<(Header, Vec<CastEvent>), CastError> {
    let mut lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    let first = lines.next().ok_or(CastError::Header(None))?;
    let header: Header = serde_json::from_slice(first).map_err(|e| CastError::Header(Some(e)))?;
    if header.version != 2 {
        return Err(CastError::Header(None));
    }
    let events = lines
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_slice(l).map_err(|source| CastError::Event {
                line: i + 2,
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((header, events))
}

/// Turns one session's events into asciicast lines, recording at most `cap` bytes of data.
#[derive(Debug)]
pub struct CastEncoder {
    cap: u64,
    recorded: u64,
    dropped: u64,
    truncated: bool,
    decoders: [Utf8Decoder; 3],
    redactors: [StreamRedactor; 3],
}

impl CastEncoder {
    /// An encoder that records at most `cap` bytes of data (output, input and resizes).
    pub fn new(cap: u64) -> CastEncoder {
        CastEncoder {
            cap,
            recorded: 0,
            dropped: 0,
            truncated: false,
            decoders: Default::default(),
            redactors: Default::default(),
        }
    }

    /// The same encoder, replacing the secrets of `redactor` in every stream (a secret split
    /// across chunks included: the text that could begin one is held back a chunk).
    pub fn redacting(mut self, redactor: Redactor) -> CastEncoder {
        self.redactors = [0, 1, 2].map(|_| StreamRedactor::new(redactor.clone()));
        self
    }

    /// Whether the recording was cut (at its cap, or by [`CastEncoder::cut`]).
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Bytes of data seen but not recorded.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends to `out` the lines for `data` from `source` at `t`: the part within the cap,
    /// and the truncation marker when this crosses it.
    pub fn data(&mut self, t: Duration, source: Source, data: &[u8], out: &mut Vec<u8>) {
        if self.truncated {
            self.dropped += data.len() as u64;
            return;
        }
        let room = usize::try_from(self.cap - self.recorded).unwrap_or(usize::MAX);
        let (kept, rest) = data.split_at(data.len().min(room));
        self.recorded += kept.len() as u64;
        let text = self.decoders[source.index()].decode(kept);
        let text = self.redactors[source.index()].push(&text);
        if !text.is_empty() {
            line(out, t, source.code(), &text);
        }
        if !rest.is_empty() {
            self.dropped += rest.len() as u64;
            let label = format!("{TRUNCATED_MARKER} at {} bytes", self.cap);
            self.cut(t, &label, out);
        }
    }

    /// Appends to `out` a resize of the terminal to `cols` × `rows` at `t`.
    pub fn resize(&mut self, t: Duration, cols: u16, rows: u16, out: &mut Vec<u8>) {
        let size = format!("{cols}x{rows}");
        if self.truncated || self.recorded + size.len() as u64 > self.cap {
            return;
        }
        self.recorded += size.len() as u64;
        line(out, t, "r", &size);
    }

    /// Stops recording at `t`: what is held of an incomplete character is written as U+FFFD
    /// (text held back as the start of a secret is dropped, and counted), then a marker
    /// labelled `label`; later data is only counted.
    pub fn cut(&mut self, t: Duration, label: &str, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.truncated, true) {
            return;
        }
        for r in &mut self.redactors {
            self.dropped += r.discard() as u64;
        }
        self.flush(t, out);
        line(out, t, "m", label);
    }

    /// Appends to `out` what is still held back (the end): text that began no secret after
    /// all, and an incomplete character as U+FFFD.
    pub fn flush(&mut self, t: Duration, out: &mut Vec<u8>) {
        for source in [Source::Stdout, Source::Stderr, Source::Input] {
            let mut text = self.redactors[source.index()].finish();
            if self.decoders[source.index()].flush() {
                text.push('\u{FFFD}');
            }
            if !text.is_empty() {
                line(out, t, source.code(), &text);
            }
        }
    }
}

/// Appends the event line `[t, code, text]`.
fn line(out: &mut Vec<u8>, t: Duration, code: &str, text: &str) {
    let text = serde_json::to_string(text).expect("a string serialises");
    out.extend_from_slice(format!("[{:.6}, \"{code}\", {text}]\n", t.as_secs_f64()).as_bytes());
}

/// UTF-8 decoding of one stream across its chunks.
#[derive(Debug, Default)]
struct Utf8Decoder {
    /// The start of a character whose remaining bytes have not come yet (at most 3 bytes).
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// The text of `data` after what was held back; invalid bytes become U+FFFD and the start
    /// of a character cut off at its end is held back for the next chunk.
    fn decode(&mut self, data: &[u8]) -> String {
        let joined;
        let mut rest = if self.pending.is_empty() {
            data
        } else {
            self.pending.extend_from_slice(data);
            joined = std::mem::take(&mut self.pending);
            &joined[..]
        };
        let mut text = String::with_capacity(rest.len());
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    text.push_str(s);
                    return text;
                }
                Err(e) => {
                    let (valid, bad) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("checked valid"));
                    match e.error_len() {
                        Some(n) => {
                            text.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        None => {
                            self.pending = bad.to_vec();
                            return text;
                        }
                    }
                }
            }
        }
    }

    /// Drops what is held back: whether there was anything.
    fn flush(&mut self) -> bool {
        let held = !self.pending.is_empty();
        self.pending.clear();
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1500);

    fn events(out: &[u8]) -> Vec<CastEvent> {
        let mut file = Header {
            version: 2,
            width: 80,
            height: 24,
            timestamp: Some(1),
        }
        .line();
        file.extend_from_slice(out);
        parse(&file).unwrap().1
    }

    fn ev(code: &str, data: &str) -> CastEvent {
        CastEvent(1.5, code.into(), data.into())
    }

    #[test]
    fn output_and_input_become_o_and_i_events_with_their_time() {
        let mut enc = CastEncoder::new(1 << 20);
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, b"hello\r\n", &mut out);
        enc.data(T, Source::Stderr, b"oops\n", &mut out);
        enc.data(T, Source::Input, b"ls\r", &mut out);
        assert_eq!(
            events(&out),
            [ev("o", "hello\r\n"), ev("o", "oops\n"), ev("i", "ls\r")]
        );
        assert!(std::str::from_utf8(&out)
            .unwrap()
            .starts_with("[1.500000, \"o\", "));
    }

    #[test]
    fn a_resize_is_an_r_event_of_cols_by_rows() {
        let mut enc = CastEncoder::new(1 << 20);
        let mut out = Vec::new();
        enc.resize(T, 132, 43, &mut out);
        assert_eq!(events(&out), [ev("r", "132x43")]);
    }

    #[test]
    fn a_character_split_across_chunks_is_kept_whole() {
        let mut enc = CastEncoder::new(1 << 20);
        let mut out = Vec::new();
        let snowman = "☃".as_bytes();
        enc.data(T, Source::Stdout, &snowman[..1], &mut out);
        // The other stream's chunk in between does not disturb stdout's held bytes.
        enc.data(T, Source::Stderr, b"e", &mut out);
        enc.data(T, Source::Stdout, &snowman[1..], &mut out);
        assert_eq!(events(&out), [ev("o", "e"), ev("o", "☃")]);
    }

    #[test]
    fn invalid_utf8_and_control_bytes_are_recorded_as_valid_json() {
        let mut enc = CastEncoder::new(1 << 20);
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, b"a\xffb\x00\x1b[31m\xc3", &mut out);
        enc.flush(T, &mut out);
        assert_eq!(
            events(&out),
            [ev("o", "a\u{FFFD}b\0\x1b[31m"), ev("o", "\u{FFFD}")]
        );
        // Every line is one JSON array: nothing the guest wrote breaks a line.
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
    }

    #[test]
    fn data_past_the_cap_is_cut_with_one_marker_and_counted() {
        let mut enc = CastEncoder::new(10);
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, b"0123456", &mut out);
        enc.data(T, Source::Stdout, b"789abcdef", &mut out);
        enc.data(T, Source::Stderr, b"more", &mut out);
        enc.resize(T, 100, 30, &mut out);
        let got = events(&out);
        assert_eq!(
            got,
            [
                ev("o", "0123456"),
                ev("o", "789"),
                ev("m", "hutch: recording truncated at 10 bytes"),
            ]
        );
        assert!(enc.truncated());
        assert_eq!(enc.dropped(), 6 + 4);
    }

    #[test]
    fn a_cut_inside_a_character_leaves_a_replacement_before_the_marker() {
        let mut enc = CastEncoder::new(2);
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, "a☃".as_bytes(), &mut out);
        assert_eq!(
            events(&out),
            [
                ev("o", "a"),
                ev("o", "\u{FFFD}"),
                ev("m", "hutch: recording truncated at 2 bytes")
            ]
        );
    }

    #[test]
    fn resizes_count_against_the_cap() {
        let mut enc = CastEncoder::new(6);
        let mut out = Vec::new();
        enc.resize(T, 80, 24, &mut out);
        enc.resize(T, 80, 25, &mut out);
        assert_eq!(events(&out), [ev("r", "80x24")]);
    }

    #[test]
    fn secrets_are_replaced_in_output_and_input_even_split_across_chunks() {
        let secret = "hunter2-but-longer";
        let mut enc = CastEncoder::new(1 << 20).redacting(Redactor::new([secret.to_string()]));
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, b"pw=hunter2-b", &mut out);
        enc.data(T, Source::Stderr, b"hunter2-but-longer!", &mut out);
        enc.data(T, Source::Stdout, b"ut-longer ok", &mut out);
        enc.data(T, Source::Input, b"hunter2-but-longer\r", &mut out);
        enc.data(T, Source::Stdout, b" hunt", &mut out);
        enc.flush(T, &mut out);
        assert_eq!(
            events(&out),
            [
                ev("o", "pw="),
                ev("o", "[REDACTED]!"),
                ev("o", "[REDACTED] ok"),
                ev("i", "[REDACTED]\r"),
                ev("o", " "),
                // Held back until the end, where it began no secret.
                ev("o", "hunt"),
            ]
        );
        assert!(!String::from_utf8_lossy(&out).contains("hunter2-b"));
    }

    #[test]
    fn a_cut_drops_the_start_of_a_secret_held_back() {
        let mut enc = CastEncoder::new(8).redacting(Redactor::new(["0123456789".to_string()]));
        let mut out = Vec::new();
        enc.data(T, Source::Stdout, b"ab012345678", &mut out);
        assert_eq!(
            events(&out),
            [
                ev("o", "ab"),
                ev("m", "hutch: recording truncated at 8 bytes")
            ]
        );
        assert_eq!(enc.dropped(), 3 + 6);
    }

    #[test]
    fn parse_refuses_what_is_not_asciicast_v2() {
        assert!(parse(b"").is_err());
        assert!(parse(b"{\"version\":1,\"width\":1,\"height\":1}\n").is_err());
        assert!(matches!(
            parse(b"{\"version\":2,\"width\":1,\"height\":1}\n[1, \"o\"]\n"),
            Err(CastError::Event { line: 2, .. })
        ));
    }
}
