//! No reflection: finds a secret's value, in the forms servers echo it, in streamed bytes and
//! replaces it. The same matcher finds placeholders in request bodies (replacing each by
//! itself) to record where they went.

use std::collections::BTreeSet;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use flate2::write::GzDecoder;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::proxy::{BoxBody, BoxError};

/// One byte string to find, what replaces it, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Needle {
    pub(crate) find: Vec<u8>,
    pub(crate) replace: Vec<u8>,
    pub(crate) secret: String,
}

/// Characters a URL component encoder leaves alone (RFC 3986 unreserved).
pub(crate) const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The base64 characters that encode `value` alone when it starts `offset` bytes into the
/// encoded data: the middle of any base64 text that contains `value` at that alignment.
fn base64_core(engine: &impl Engine, value: &[u8], offset: usize) -> Vec<u8> {
    let mut data = vec![0u8; offset];
    data.extend_from_slice(value);
    let enc = engine.encode(&data).into_bytes();
    let start = (8 * offset).div_ceil(6);
    let end = (8 * (offset + value.len())) / 6;
    enc.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
}

/// The forms of `value` a server may reflect, each paired with the same form of
/// `placeholder`: raw, base64 and base64url at every alignment, percent-encoded (two
/// character sets), JSON-escaped.
pub(crate) fn reflections(secret: &str, value: &[u8], placeholder: &[u8]) -> Vec<Needle> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![(value.to_vec(), placeholder.to_vec())];
    let std = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE;
    for offset in 0..3 {
        pairs.push((
            base64_core(&std, value, offset),
            base64_core(&std, placeholder, offset),
        ));
        pairs.push((
            base64_core(&url, value, offset),
            base64_core(&url, placeholder, offset),
        ));
    }
    if let (Ok(v), Ok(p)) = (std::str::from_utf8(value), std::str::from_utf8(placeholder)) {
        for set in [COMPONENT, NON_ALPHANUMERIC] {
            pairs.push((
                utf8_percent_encode(v, set).to_string().into_bytes(),
                utf8_percent_encode(p, set).to_string().into_bytes(),
            ));
        }
        let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let (jv, jp) = (json(v), json(p));
        pairs.push((
            jv.trim_matches('"').as_bytes().to_vec(),
            jp.trim_matches('"').as_bytes().to_vec(),
        ));
    }
    let mut needles: Vec<Needle> = Vec::new();
    for (find, replace) in pairs {
        if find.len() >= 4 && !needles.iter().any(|n| n.find == find) {
            needles.push(Needle {
                find,
                replace,
                secret: secret.to_string(),
            });
        }
    }
    needles
}

/// A streaming find-and-replace: bytes that could start a match are held back until the next
/// chunk shows whether they do.
pub(crate) struct Scrubber {
    needles: Vec<Needle>,
    finders: Vec<memchr::memmem::Finder<'static>>,
    held: Vec<u8>,
    longest: usize,
    /// Secrets whose needles matched so far.
    pub(crate) hits: BTreeSet<String>,
    /// Of those, the ones already reported.
    reported: BTreeSet<String>,
}

impl Scrubber {
    pub(crate) fn new(needles: Vec<Needle>) -> Scrubber {
        let longest = needles.iter().map(|n| n.find.len()).max().unwrap_or(0);
        let finders = needles
            .iter()
            .map(|n| memchr::memmem::Finder::new(&n.find).into_owned())
            .collect();
        Scrubber {
            needles,
            finders,
            held: Vec::new(),
            longest,
            hits: BTreeSet::new(),
            reported: BTreeSet::new(),
        }
    }

    /// The earliest complete match in `buf` from `from`.
    fn next_match(&self, buf: &[u8], from: usize) -> Option<(usize, usize)> {
        self.finders
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.find(&buf[from..]).map(|p| (from + p, i)))
            .min()
    }

    /// Feeds a chunk; returns what can be released.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(chunk);
        let buf = std::mem::take(&mut self.held);
        let mut out = Vec::with_capacity(buf.len());
        let mut at = 0;
        while let Some((pos, i)) = self.next_match(&buf, at) {
            let n = &self.needles[i];
            out.extend_from_slice(&buf[at..pos]);
            out.extend_from_slice(&n.replace);
            self.hits.insert(n.secret.clone());
            at = pos + n.find.len();
        }
        let safe = at.max(buf.len().saturating_sub(self.longest.saturating_sub(1)));
        out.extend_from_slice(&buf[at..safe]);
        self.held = buf[safe..].to_vec();
        out
    }

    /// Releases what was held back (no complete match can be in it).
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// Scrubs a whole value at once.
    pub(crate) fn all(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = self.push(data);
        out.extend(self.finish());
        out
    }
}

/// Called once per secret, when its needles first match in a body.
pub(crate) type OnHit = Box<dyn FnMut(&str) + Send>;

/// A body passed through a [`Scrubber`], gunzipped first where `gunzip` is set.
pub(crate) struct Filtered {
    inner: BoxBody,
    gunzip: Option<GzDecoder<Vec<u8>>>,
    scrubber: Scrubber,
    reported: usize,
    on_hit: OnHit,
    done: bool,
}

impl Filtered {
    pub(crate) fn new(inner: BoxBody, gunzip: bool, needles: Vec<Needle>, on_hit: OnHit) -> Self {
        Filtered {
            inner,
            gunzip: gunzip.then(|| GzDecoder::new(Vec::new())),
            scrubber: Scrubber::new(needles),
            reported: 0,
            on_hit,
            done: false,
        }
    }

    /// Trailers pass through the same needles as the body.
    fn trailers(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        let Ok(mut trailers) = frame.into_trailers() else {
            return Frame::trailers(Default::default());
        };
        // A scrubber of their own: the body's may still hold bytes back.
        let mut scrubber = Scrubber::new(self.scrubber.needles.clone());
        for value in trailers.values_mut() {
            let clean = scrubber.all(value.as_bytes());
            if clean != value.as_bytes() {
                *value = hyper::header::HeaderValue::from_bytes(&clean)
                    .unwrap_or(hyper::header::HeaderValue::from_static(""));
            }
        }
        self.scrubber.hits.extend(scrubber.hits);
        Frame::trailers(trailers)
    }

    /// Reports secrets that matched since the last call.
    fn report(&mut self) {
        if self.scrubber.hits.len() > self.reported {
            for name in self.scrubber.hits.iter() {
                if !self.scrubber.reported.contains(name) {
                    (self.on_hit)(name);
                }
            }
            self.scrubber.reported = self.scrubber.hits.clone();
            self.reported = self.scrubber.hits.len();
        }
    }

    pub(crate) fn boxed(self) -> BoxBody {
        BodyExt::boxed_unsync(self)
    }

    fn decode(&mut self, data: &[u8]) -> Result<Vec<u8>, BoxError> {
        match &mut self.gunzip {
            None => Ok(data.to_vec()),
            Some(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    fn end(&mut self) -> Result<Vec<u8>, BoxError> {
        let mut out = match self.gunzip.take() {
            Some(d) => self.scrubber.push(&d.finish()?),
            None => Vec::new(),
        };
        out.extend(self.scrubber.finish());
        self.done = true;
        Ok(out)
    }
}

impl Body for Filtered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let out = match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let out = this.decode(&data).map(|d| this.scrubber.push(&d));
                    Poll::Ready(Some(out.map(|o| Frame::data(Bytes::from(o)))))
                }
                Err(frame) => Poll::Ready(Some(Ok(this.trailers(frame)))),
            },
            Poll::Ready(None) => match this.end() {
                Ok(rest) if rest.is_empty() => Poll::Ready(None),
                Ok(rest) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest))))),
                Err(e) => Poll::Ready(Some(Err(e))),
            },
        };
        this.report();
        out
    }

    /// An empty body stays known to be empty (a GET is not sent chunked; a WebSocket upgrade
    /// has no body at all).
    fn is_end_stream(&self) -> bool {
        self.done
            || (self.inner.is_end_stream()
                && self.gunzip.is_none()
                && self.scrubber.held.is_empty())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.is_end_stream() {
            hyper::body::SizeHint::with_exact(0)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub_in_chunks(needles: Vec<Needle>, data: &[u8], size: usize) -> Vec<u8> {
        let mut s = Scrubber::new(needles);
        let mut out = Vec::new();
        for chunk in data.chunks(size) {
            out.extend(s.push(chunk));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn every_reflected_form_is_replaced_across_chunk_boundaries() {
        let value = b"sk-real/value+1";
        let ph = b"hutch_ph_abc";
        let needles = reflections("k", value, ph);
        let b64 = base64::engine::general_purpose::STANDARD;
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forms = [
            String::from_utf8(value.to_vec()).unwrap(),
            b64.encode(value),
            b64.encode(b"x-access-token:sk-real/value+1"),
            b64.encode(b"a:sk-real/value+1"),
            url.encode(b"ab:sk-real/value+1"),
            "sk-real%2Fvalue%2B1".into(),
            "sk%2Dreal%2Fvalue%2B1".into(),
            serde_json::to_string("sk-real/value+1").unwrap(),
        ];
        for form in forms {
            let text = format!("before {form} after");
            for size in [1, 3, 7, 1000] {
                let out = scrub_in_chunks(needles.clone(), text.as_bytes(), size);
                let out = String::from_utf8_lossy(&out);
                assert!(!out.contains("sk-real"), "{form} at {size}: {out}");
                assert!(
                    out.starts_with("before ") && out.ends_with(" after"),
                    "{out}"
                );
                let decoded = [b64.decode(out.split(' ').nth(1).unwrap()).ok()];
                assert!(decoded
                    .iter()
                    .flatten()
                    .all(|d| !d.windows(7).any(|w| w == b"sk-real")));
            }
        }
        let clean = scrub_in_chunks(needles, b"nothing secret here", 2);
        assert_eq!(clean, b"nothing secret here");
    }
}
