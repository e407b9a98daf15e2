//! Frames over quinn streams: a reader that feeds stream chunks to the size-bounded
//! [`FrameDecoder`] without copying whole frames, and a writer helper.

use bytes::{Buf, Bytes};
use telemesh_proto::codec::{encode_frame, DecodeError, FrameDecoder};
use telemesh_proto::Frame;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes are not a valid frame (or too large).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream failed.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// Encoding failed.
    #[error("encode: {0}")]
    Encode(#[from] telemesh_proto::codec::EncodeError),
}

/// Reads frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    chunk: Bytes,
}

impl FrameReader {
    /// Frames of at most `max_frame` bytes from `recv`.
    pub fn new(recv: quinn::RecvStream, max_frame: u32) -> Self {
        FrameReader {
            recv,
            dec: FrameDecoder::new(max_frame),
            chunk: Bytes::new(),
        }
    }

    /// The next frame, or `None` at a clean end of the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if !self.chunk.is_empty() {
                let mut input: &[u8] = &self.chunk;
                let before = input.len();
                let frame = self.dec.decode(&mut input)?;
                let used = before - input.len();
                self.chunk.advance(used);
                if let Some(f) = frame {
                    return Ok(Some(f));
                }
            }
            match self.recv.read_chunk(256 * 1024, true).await? {
                Some(c) => self.chunk = c.bytes,
                None => {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Encodes and writes one frame; returns the bytes written.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<usize, WireError> {
    let mut buf = Vec::new();
    encode_frame(frame, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(buf.len())
}
