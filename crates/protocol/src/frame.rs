//! Length-prefixed framing: `u32` little-endian body length, then the postcard body.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{message::Envelope, MAX_CHUNK, MAX_FRAME};

/// Why a frame could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// A data message carried more than [`MAX_CHUNK`] bytes.
    #[error("data chunk of {0} bytes exceeds the {MAX_CHUNK}-byte limit")]
    ChunkTooLarge(usize),
    /// The body did not decode as a known message.
    #[error("malformed frame")]
    Malformed(#[source] postcard::Error),
    /// The body decoded but had bytes left over.
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
    /// A message could not be encoded.
    #[error("cannot encode message")]
    Encode(#[source] postcard::Error),
    /// The stream ended in the middle of a frame.
    #[error("connection closed mid-frame")]
    Truncated,
    /// Reading from the stream failed.
    #[error("channel read failed")]
    Io(#[source] std::io::Error),
}

/// Encodes one message for operation `op` as a complete frame (length prefix included).
pub fn encode<M: Serialize>(op: u32, msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut out =
        postcard::to_extend(&Envelope { op, msg }, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let body = out.len() - 4;
    if body > MAX_FRAME {
        return Err(FrameError::TooLarge(body));
    }
    out[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(out)
}

/// Decodes a frame body (without its length prefix) into an operation id and a message,
/// rejecting trailing bytes. Pure and allocation-bounded by the body: the fuzz target's entry.
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<Envelope<M>, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let (env, rest) =
        postcard::take_from_bytes::<Envelope<M>>(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(env)
}

/// Reads whole frame bodies from a byte stream, never buffering more than [`MAX_FRAME`].
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// Reads the next frame body; `Ok(None)` on a clean end of stream between frames.
    pub async fn next_body(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = self
                .inner
                .read(&mut len[got..])
                .await
                .map_err(FrameError::Io)?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            got += n;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        self.buf.resize(len, 0);
        self.inner
            .read_exact(&mut self.buf)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        Ok(Some(&self.buf))
    }

    /// Reads and decodes the next message; `Ok(None)` on a clean end of stream.
    pub async fn next<M: DeserializeOwned>(&mut self) -> Result<Option<Envelope<M>>, FrameError> {
        match self.next_body().await? {
            None => Ok(None),
            Some(body) => decode(body).map(Some),
        }
    }
}

/// Checks a decoded data payload against [`MAX_CHUNK`].
pub fn check_chunk(len: usize) -> Result<(), FrameError> {
    if len > MAX_CHUNK {
        Err(FrameError::ChunkTooLarge(len))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMsg, HostMsg};
    use tokio::io::AsyncWriteExt;

    /// Splits a complete frame into its announced length and its body.
    fn split(frame: &[u8]) -> (usize, &[u8]) {
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        (len, &frame[4..])
    }

    #[test]
    fn round_trips_every_shape() {
        let msgs = [
            GuestMsg::Done,
            GuestMsg::Started(u32::MAX),
            GuestMsg::Stdout(vec![0xAB; MAX_CHUNK]),
            GuestMsg::Credit(7),
            GuestMsg::FileEnd(u64::MAX),
        ];
        for (i, msg) in msgs.into_iter().enumerate() {
            let op = 1000 + i as u32;
            let frame = encode(op, &msg).unwrap();
            let (len, body) = split(&frame);
            assert_eq!(len, body.len(), "length prefix must match the body");
            let env = decode::<GuestMsg>(body).unwrap();
            assert_eq!((env.op, env.msg), (op, msg));
        }
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let frame = encode(3, &HostMsg::Ping(9)).unwrap();
        let mut body = frame[4..].to_vec();
        body.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode::<HostMsg>(&body),
            Err(FrameError::Trailing(2))
        ));
    }

    #[test]
    fn decode_rejects_bodies_over_max_frame() {
        // A valid message followed by padding: the size check must fire before decoding.
        let mut body = encode(1, &GuestMsg::Done).unwrap()[4..].to_vec();
        body.resize(MAX_FRAME + 1, 0);
        assert!(matches!(
            decode::<GuestMsg>(&body),
            Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1
        ));
    }

    #[test]
    fn decode_rejects_garbage_and_truncated_bodies() {
        assert!(matches!(
            decode::<GuestMsg>(&[]),
            Err(FrameError::Malformed(_))
        ));
        // Op 1, variant index far past the end of GuestMsg.
        assert!(matches!(
            decode::<GuestMsg>(&[1, 0x7f]),
            Err(FrameError::Malformed(_))
        ));
        // A Stdout announcing 100 bytes but carrying 3.
        let frame = encode(1, &GuestMsg::Stdout(vec![1; 100])).unwrap();
        assert!(matches!(
            decode::<GuestMsg>(&frame[4..10]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn encode_refuses_bodies_over_max_frame() {
        let fits = HostMsg::Stdin(vec![0; MAX_FRAME - 16]);
        assert!(encode(1, &fits).is_ok());
        let too_big = HostMsg::Stdin(vec![0; MAX_FRAME]);
        match encode(1, &too_big) {
            Err(FrameError::TooLarge(n)) => assert!(n > MAX_FRAME),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn chunk_limit_is_inclusive() {
        assert!(check_chunk(MAX_CHUNK).is_ok());
        assert!(matches!(
            check_chunk(MAX_CHUNK + 1),
            Err(FrameError::ChunkTooLarge(n)) if n == MAX_CHUNK + 1
        ));
    }

    #[tokio::test]
    async fn reader_reads_frames_then_clean_eof() {
        let mut wire = encode(1, &GuestMsg::Started(5)).unwrap();
        wire.extend(encode(2, &GuestMsg::Stdout(b"out".to_vec())).unwrap());
        let mut r = FrameReader::new(&wire[..]);
        let a = r.next::<GuestMsg>().await.unwrap().unwrap();
        assert_eq!((a.op, a.msg), (1, GuestMsg::Started(5)));
        let b = r.next::<GuestMsg>().await.unwrap().unwrap();
        assert_eq!((b.op, b.msg), (2, GuestMsg::Stdout(b"out".to_vec())));
        assert!(r.next::<GuestMsg>().await.unwrap().is_none());
        // Stays at clean EOF.
        assert!(r.next_body().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_reports_truncation_mid_header_and_mid_body() {
        let frame = encode(1, &GuestMsg::Stdout(vec![7; 32])).unwrap();
        for cut in [1, 3, 4, 5, frame.len() - 1] {
            let mut r = FrameReader::new(&frame[..cut]);
            assert!(
                matches!(r.next_body().await, Err(FrameError::Truncated)),
                "cut at {cut} must be Truncated"
            );
        }
    }

    #[tokio::test]
    async fn reader_handles_bytes_arriving_one_at_a_time() {
        let frame = encode(9, &GuestMsg::Pong(0xDEAD_BEEF)).unwrap();
        let (mut tx, rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            for b in frame {
                tx.write_all(&[b]).await.unwrap();
            }
        });
        let mut r = FrameReader::new(rx);
        let env = r.next::<GuestMsg>().await.unwrap().unwrap();
        assert_eq!((env.op, env.msg), (9, GuestMsg::Pong(0xDEAD_BEEF)));
        writer.await.unwrap();
        assert!(r.next_body().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_rejects_oversized_header_without_reading_the_body() {
        for announced in [MAX_FRAME as u32 + 1, u32::MAX] {
            // The header is followed by more bytes; none of them may be consumed.
            let mut wire = announced.to_le_bytes().to_vec();
            wire.extend_from_slice(b"rest-of-stream");
            let mut src = &wire[..];
            let mut r = FrameReader::new(&mut src);
            assert!(matches!(
                r.next_body().await,
                Err(FrameError::TooLarge(n)) if n == announced as usize
            ));
            assert!(r.buf.capacity() < MAX_FRAME, "nothing may be allocated");
            drop(r);
            assert_eq!(src, b"rest-of-stream", "only the header may be read");
        }
    }

    #[tokio::test]
    async fn reader_accepts_a_body_of_exactly_max_frame() {
        let mut wire = (MAX_FRAME as u32).to_le_bytes().to_vec();
        wire.resize(4 + MAX_FRAME, 0);
        let mut r = FrameReader::new(&wire[..]);
        assert_eq!(r.next_body().await.unwrap().unwrap().len(), MAX_FRAME);
    }
}
