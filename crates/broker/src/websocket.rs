//! WebSocket upgrades on terminated connections: the upgrade request is checked and substituted
//! like any other, then the two upgraded streams are joined. Once a value went out on the
//! connection, the origin's frames are re-framed with each message's payload scrubbed (the
//! value can be reflected in a message as in any body); the guest's frames go through as
//! they are (a placeholder in a message is not an auth position).
//!
//! Extensions are not offered upstream (`Sec-WebSocket-Extensions` is dropped), so no origin
//! frame may be compressed: one with a reserved bit set ends the connection rather than
//! passing unscrubbed. Re-fragmenting a message is allowed to an intermediary when no
//! extension was negotiated (RFC 6455 §5.4).

use std::io;

use hyper::header::{self, HeaderMap};
use hyper::{Request, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::scrub::{Needle, Scrubber};

/// The largest payload read at once; a bigger data frame leaves as several.
const CHUNK: usize = 64 * 1024;
/// The largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// Whether `req` asks for a WebSocket upgrade (HTTP/1.1 `Connection: upgrade` and `Upgrade:
/// websocket`). Other upgrades are not offered upstream.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    }
    req.version() == Version::HTTP_11
        && has_token(req.headers(), header::CONNECTION, "upgrade")
        && has_token(req.headers(), header::UPGRADE, "websocket")
}

/// One frame's header.
struct Head {
    fin: bool,
    opcode: u8,
    len: u64,
}

/// Reads a frame header from the origin; `None` at a clean end of stream.
async fn read_head(from: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Head>> {
    let mut two = [0u8; 2];
    match from.read_exact(&mut two).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if two[0] & 0x70 != 0 {
        return Err(bad(
            "a WebSocket frame with a reserved bit (no extension was offered)",
        ));
    }
    if two[1] & 0x80 != 0 {
        return Err(bad("a masked WebSocket frame from the origin"));
    }
    let len = match two[1] & 0x7f {
        126 => u64::from(from.read_u16().await?),
        127 => from.read_u64().await?,
        n => u64::from(n),
    };
    Ok(Some(Head {
        fin: two[0] & 0x80 != 0,
        opcode: two[0] & 0x0f,
        len,
    }))
}

/// Writes one unmasked frame.
async fn write_frame(
    to: &mut (impl AsyncWrite + Unpin),
    fin: bool,
    opcode: u8,
    payload: &[u8],
) -> io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend((n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend((n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    to.write_all(&frame).await
}

/// Copies the origin's frames to the guest with every message's payload (and every control
/// frame's) scrubbed of `needles`; `on_hit` is told each secret found. Ends at the origin's
/// end of stream (passed on as a shutdown) or at the first malformed frame.
pub(crate) async fn scrub_frames(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    needles: Vec<Needle>,
    mut on_hit: impl FnMut(&str),
) -> io::Result<()> {
    let mut message = Scrubber::new(needles.clone());
    // The current message's type (its first frame's opcode), and whether a frame of it went
    // out already (every later one is a continuation).
    let (mut kind, mut started) = (0u8, false);
    let mut buf = vec![0u8; CHUNK];
    let result = loop {
        let head = match read_head(&mut from).await {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if head.opcode & 0x08 != 0 {
            // A control frame: alone, whole, at most 125 bytes either way.
            if head.len > MAX_CONTROL as u64 {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "an oversized WebSocket control frame",
                ));
            }
            let payload = &mut buf[..head.len as usize];
            from.read_exact(payload).await?;
            let mut scrubber = Scrubber::new(needles.clone());
            let mut clean = scrubber.all(payload);
            clean.truncate(MAX_CONTROL);
            scrubber.hits.iter().for_each(|s| on_hit(s));
            write_frame(&mut to, true, head.opcode, &clean).await?;
            to.flush().await?;
            continue;
        }
        if head.opcode != 0 {
            kind = head.opcode;
        }
        let mut left = head.len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            from.read_exact(&mut buf[..n]).await?;
            left -= n as u64;
            let out = message.push(&buf[..n]);
            if !out.is_empty() {
                let opcode = if started { 0 } else { kind };
                started = true;
                write_frame(&mut to, false, opcode, &out).await?;
            }
        }
        if head.fin {
            let rest = message.finish();
            let opcode = if started { 0 } else { kind };
            started = false;
            write_frame(&mut to, true, opcode, &rest).await?;
            message.hits.iter().for_each(|s| on_hit(s));
            message = Scrubber::new(needles.clone());
        }
        to.flush().await?;
    };
    let _ = to.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        futures::executor::block_on(write_frame(&mut v, fin, opcode, payload)).unwrap();
        v
    }

    /// The messages in a stream of unmasked frames (control frames as their own).
    fn messages(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut current: Option<(u8, Vec<u8>)> = None;
        while !data.is_empty() {
            let (fin, opcode) = (data[0] & 0x80 != 0, data[0] & 0x0f);
            let (len, at) = match data[1] & 0x7f {
                126 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(data[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let payload = &data[at..at + len];
            data = &data[at + len..];
            if opcode & 8 != 0 {
                out.push((opcode, payload.to_vec()));
                continue;
            }
            // A message's first frame names its type, every later one is a continuation.
            assert_eq!(opcode == 0, current.is_some(), "opcode {opcode}");
            let m = current.get_or_insert((opcode, Vec::new()));
            m.1.extend_from_slice(payload);
            if fin {
                out.push(current.take().unwrap());
            }
        }
        out
    }

    #[tokio::test]
    async fn a_value_split_across_fragments_and_pings_is_scrubbed() {
        let needles = crate::scrub::reflections("k", b"sk-real-value", b"hutch_ph_0123456789");
        let mut input = frame(false, 1, b"the key is sk-re");
        input.extend(frame(true, 9, b"ping sk-real-value"));
        input.extend(frame(true, 0, b"al-value, twice: sk-real-value"));
        input.extend(frame(true, 2, &vec![b'x'; 70_000]));
        let mut hits = Vec::new();
        let mut out = Vec::new();
        scrub_frames(&input[..], &mut out, needles, |s| hits.push(s.to_string()))
            .await
            .unwrap();
        let got = messages(&out);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], (9, b"ping hutch_ph_0123456789".to_vec()));
        assert_eq!(
            got[1],
            (
                1,
                b"the key is hutch_ph_0123456789, twice: hutch_ph_0123456789".to_vec()
            )
        );
        assert_eq!(got[2], (2, vec![b'x'; 70_000]));
        assert!(hits.iter().all(|h| h == "k") && hits.len() == 2, "{hits:?}");
    }

    #[tokio::test]
    async fn a_compressed_or_masked_frame_ends_the_stream() {
        for first in [0xc1u8, 0x81] {
            let mut input = frame(true, 1, b"sk-real-value");
            input[0] = first;
            if first == 0x81 {
                input[1] |= 0x80;
            }
            let mut out = Vec::new();
            let needles = crate::scrub::reflections("k", b"sk-real-value", b"ph_0123456789");
            let r = scrub_frames(&input[..], &mut out, needles, |_| {}).await;
            assert!(r.is_err() && out.is_empty(), "{first:x}: {out:?}");
        }
    }
}
