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
