//! Frames over quinn streams: a reader that feeds stream chunks to the size-bounded
//! [`FrameDecoder`] without copying whole frames, and a writer helper.
//!
//! Where the handshake chose zstd, a sender may wrap frames in [`Frame::Compressed`]; the
//! reader, once told with [`FrameReader::accept_compressed`], unwraps them after checking
//! the announced size against its frame limit (decompression never allocates beyond it) and
//! refuses a compressed frame inside another. Without that call a compressed frame is an
//! error.

use bytes::{Buf, Bytes};
use telemesh_proto::codec::{encode_frame, DecodeError, FrameDecoder};
use telemesh_proto::frame::Compression;
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
    /// A compressed frame that was not agreed, too large, or not decodable.
    #[error("compressed frame: {0}")]
    Compressed(String),
}

impl WireError {
    /// The stable code a peer is told when this error closes its connection.
    pub fn code(&self) -> telemesh_proto::ErrorCode {
        match self {
            WireError::Decode(DecodeError::TooLarge { .. }) => {
                telemesh_proto::ErrorCode::FRAME_TOO_LARGE
            }
            _ => telemesh_proto::ErrorCode::MALFORMED_FRAME,
        }
    }
}

/// Reads frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    chunk: Bytes,
    max_frame: u32,
    compressed: bool,
}

impl FrameReader {
    /// Frames of at most `max_frame` bytes from `recv`.
    pub fn new(recv: quinn::RecvStream, max_frame: u32) -> Self {
        FrameReader {
            recv,
            dec: FrameDecoder::new(max_frame),
            chunk: Bytes::new(),
            max_frame,
            compressed: false,
        }
    }

    /// The limit for the frames after the current one (see [`FrameDecoder::set_max_frame`]).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.dec.set_max_frame(max_frame);
        self.max_frame = max_frame;
    }

    /// From now on, unwrap [`Frame::Compressed`] frames (the handshake chose zstd).
    pub fn accept_compressed(&mut self) {
        self.compressed = true;
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
                    return match f {
                        Frame::Compressed { .. } if !self.compressed => {
                            Err(WireError::Compressed("compression was not agreed".into()))
                        }
                        Frame::Compressed { .. } => inflate(f, self.max_frame).map(Some),
                        f => Ok(Some(f)),
                    };
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

/// A [`Frame::Compressed`] holding `frame`, zstd level 3.
pub fn deflate(frame: &Frame) -> Result<Frame, WireError> {
    let raw =
        postcard::to_allocvec(frame).map_err(|e| WireError::Compressed(format!("encode: {e}")))?;
    let data = zstd::bulk::compress(&raw, 3).map_err(|e| WireError::Compressed(e.to_string()))?;
    Ok(Frame::Compressed {
        codec: Compression::Zstd,
        raw_len: raw.len() as u32,
        data,
    })
}

/// The frame inside a [`Frame::Compressed`], at most `max_frame` bytes before compression.
pub fn inflate(frame: Frame, max_frame: u32) -> Result<Frame, WireError> {
    let Frame::Compressed {
        codec,
        raw_len,
        data,
    } = frame
    else {
        return Ok(frame);
    };
    if codec != Compression::Zstd {
        return Err(WireError::Compressed(format!("unknown codec {codec:?}")));
    }
    if raw_len > max_frame {
        return Err(WireError::Compressed(format!(
            "{raw_len} bytes exceed the frame limit {max_frame}"
        )));
    }
    let raw = zstd::bulk::decompress(&data, raw_len as usize)
        .map_err(|e| WireError::Compressed(e.to_string()))?;
    if raw.len() != raw_len as usize {
        return Err(WireError::Compressed(format!(
            "{} bytes, announced {raw_len}",
            raw.len()
        )));
    }
    match postcard::from_bytes::<Frame>(&raw) {
        Ok(Frame::Compressed { .. }) => Err(WireError::Compressed("nested compression".into())),
        Ok(f) => Ok(f),
        Err(e) => Err(WireError::Compressed(format!("decode: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemesh_proto::Event;

    fn batch() -> Frame {
        Frame::Batch {
            id: 1,
            origin: "gw".into(),
            epoch: 7,
            events: (1..=100)
                .map(|seq| Event {
                    seq,
                    topic: "site-a/line1/temp".into(),
                    payload: format!("{{\"t\":{seq},\"v\":21.5}}").into_bytes(),
                    ts_us: 1_700_000_000_000_000 + seq,
                    qos: 1,
                    headers: None,
                })
                .collect(),
            gaps: vec![],
        }
    }

    #[test]
    fn compressed_frames_round_trip_and_shrink() {
        let f = batch();
        let raw = postcard::to_allocvec(&f).unwrap().len();
        let c = deflate(&f).unwrap();
        let Frame::Compressed { data, .. } = &c else {
            panic!()
        };
        assert!(data.len() * 3 < raw, "{} of {raw}", data.len());
        assert_eq!(inflate(c, 1 << 20).unwrap(), f);
    }

    proptest::proptest! {
        /// Arbitrary compressed payloads and announced sizes never panic and never yield more
        /// than the limit: a frame or an error.
        #[test]
        fn arbitrary_compressed_frames_are_frames_or_errors(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            raw_len in 0u32..(1 << 20),
        ) {
            let f = Frame::Compressed { codec: Compression::Zstd, raw_len, data };
            let _ = inflate(f, 1 << 16);
        }

        /// Valid zstd around arbitrary bytes: decoded as a frame or refused, never a panic.
        #[test]
        fn compressed_garbage_is_refused_or_a_frame(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let data = zstd::bulk::compress(&raw, 1).unwrap();
            let f = Frame::Compressed { codec: Compression::Zstd, raw_len: raw.len() as u32, data };
            if let Ok(inner) = inflate(f, 1 << 16) {
                let nested = matches!(inner, Frame::Compressed { .. });
                proptest::prop_assert!(!nested, "a nested compressed frame came out");
            }
        }

        /// Every frame survives deflate and inflate.
        #[test]
        fn deflate_inflate_round_trips(n in 0u64..300, text in "[a-z/]{0,40}") {
            let f = Frame::Error { code: telemesh_proto::ErrorCode(n as u16), reason: text.repeat(n as usize % 7) };
            proptest::prop_assert_eq!(inflate(deflate(&f).unwrap(), 1 << 20).unwrap(), f);
        }
    }

    #[test]
    fn bombs_lies_and_nesting_are_refused() {
        let f = batch();
        // Announced larger than the limit: refused before decompressing.
        let c = deflate(&f).unwrap();
        assert!(inflate(c, 100).is_err());
        // A small announcement for a large content: decompression stops at the bound.
        let Frame::Compressed { data, .. } = deflate(&f).unwrap() else {
            panic!()
        };
        let lie = Frame::Compressed {
            codec: Compression::Zstd,
            raw_len: 10,
            data,
        };
        assert!(inflate(lie, 1 << 20).is_err());
        // A zstd bomb: 64 MiB of zeros announced as such, over a 16 MiB limit.
        let zeros = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let bomb = Frame::Compressed {
            codec: Compression::Zstd,
            raw_len: 64 << 20,
            data: zeros,
        };
        assert!(inflate(bomb, 16 << 20).is_err());
        // Garbage and nesting.
        let junk = Frame::Compressed {
            codec: Compression::Zstd,
            raw_len: 50,
            data: vec![1, 2, 3],
        };
        assert!(inflate(junk, 1 << 20).is_err());
        let nested = deflate(&deflate(&f).unwrap()).unwrap();
        assert!(inflate(nested, 1 << 20).is_err());
    }
}
