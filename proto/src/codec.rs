//! Framing: a 4-byte little-endian length, then one postcard-encoded [`Frame`].
//!
//! ```text
//! +----------------+----------------------------+
//! | len: u32 (LE)  | postcard(Frame), len bytes |
//! +----------------+----------------------------+
//! ```
//!
//! The decoder checks `len` against its maximum before it buffers or allocates anything for
//! the frame, buffers at most one frame, and decodes a frame that arrived whole straight from
//! the caller's bytes without copying them. A frame must use exactly `len` bytes. Decoding
//! never panics: every malformed input is a [`DecodeError`].

use crate::frame::Frame;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The default maximum frame size: 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix names a frame larger than the maximum; nothing was buffered.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The maximum in force.
        max: u32,
    },
    /// The length prefix is zero.
    #[error("empty frame")]
    Empty,
    /// The frame's bytes are not a valid postcard frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame decoded but left bytes unused.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An earlier error left the decoder unusable; the stream must be closed.
    #[error("decoder failed earlier")]
    Poisoned,
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The frame is larger than a length prefix can say.
    #[error("frame of {0} bytes is too large to encode")]
    TooLarge(usize),
    /// Serialization failed.
    #[error("cannot encode frame: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Appends `frame`, length-prefixed, to `out`; returns the frame's encoded length.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let taken = std::mem::take(out);
    let filled = match postcard::to_extend(frame, taken) {
        Ok(v) => v,
        Err(e) => return Err(EncodeError::Postcard(e)),
    };
    *out = filled;
    let len = out.len() - start - HEADER_LEN;
    let Ok(len32) = u32::try_from(len) else {
        out.truncate(start);
        return Err(EncodeError::TooLarge(len));
    };
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(len)
}

/// Decodes the body of one frame (without its length prefix), which must be used entirely.
pub fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    match postcard::take_from_bytes::<Frame>(body) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(DecodeError::Trailing(rest.len())),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// A streaming frame decoder for one stream.
///
/// Feed it the bytes as they arrive with [`FrameDecoder::decode`]; it takes from them only
/// what the next frame needs, so at most one frame (of at most `max_frame` bytes) is ever
/// buffered.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: u32,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The announced body length once the header is complete.
    need: Option<usize>,
    body: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        FrameDecoder {
            max_frame,
            header: [0; HEADER_LEN],
            header_len: 0,
            need: None,
            body: Vec::new(),
            poisoned: false,
        }
    }

    /// The maximum frame size in force.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Changes the maximum for frames whose length prefix has not arrived yet (a stream's
    /// first frame is read with a small limit; the role's limit applies after it).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Bytes held for a frame not yet complete.
    pub fn buffered(&self) -> usize {
        self.header_len + self.body.len()
    }

    /// Takes bytes from the front of `input` and returns the next complete frame, or `None`
    /// when `input` is used up before a frame is complete. Call it again with the same
    /// `input` while it returns frames. After an error the decoder stays failed.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        let result = self.decode_inner(input);
        if result.is_err() {
            self.poisoned = true;
            self.body = Vec::new();
        }
        result
    }

    fn decode_inner(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        let need = match self.need {
            Some(n) => n,
            None => {
                let take = (HEADER_LEN - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len < HEADER_LEN {
                    return Ok(None);
                }
                let len = u32::from_le_bytes(self.header);
                if len > self.max_frame {
                    return Err(DecodeError::TooLarge {
                        len,
                        max: self.max_frame,
                    });
                }
                if len == 0 {
                    return Err(DecodeError::Empty);
                }
                self.need = Some(len as usize);
                len as usize
            }
        };
        // Fast path: the whole body is in `input`, so decode it in place.
        if self.body.is_empty() && input.len() >= need {
            let (body, rest) = input.split_at(need);
            *input = rest;
            self.reset();
            return decode_body(body).map(Some);
        }
        let take = (need - self.body.len()).min(input.len());
        if self.body.capacity() == 0 {
            // `need` is bounded by `max_frame`, checked above.
            self.body.reserve_exact(need);
        }
        self.body.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.body.len() < need {
            return Ok(None);
        }
        let body = std::mem::take(&mut self.body);
        self.reset();
        decode_body(&body).map(Some)
    }

    fn reset(&mut self) {
        self.header_len = 0;
        self.need = None;
    }

    /// Call at the end of the stream: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        match self.need {
            None if self.header_len == 0 => Ok(()),
            None => Err(DecodeError::Truncated {
                have: self.header_len,
                need: HEADER_LEN,
            }),
            Some(need) => Err(DecodeError::Truncated {
                have: self.body.len(),
                need,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Gap, GapKind, GapReason, Headers};
    use crate::frame::{Compression, ErrorCode, Role, Start};

    fn sample_batch() -> Frame {
        Frame::Batch {
            id: 3,
            origin: "site-a-gw-1".into(),
            epoch: 1_700_000_000_000 * 2048 + 17,
            events: vec![
                Event {
                    seq: 1,
                    topic: "site-a/line1/temp".into(),
                    payload: b"21.5".to_vec(),
                    ts_us: 1_700_000_000_000_000,
                    qos: 1,
                    headers: None,
                },
                Event {
                    seq: 2,
                    topic: "site-a/line1/temp".into(),
                    payload: vec![0, 255, 7],
                    ts_us: 1_700_000_000_000_100,
                    qos: 0,
                    headers: Some(Box::new(Headers {
                        user_properties: vec![("unit".into(), "C".into())],
                        content_type: Some("text/plain".into()),
                        traceparent: None,
                    })),
                },
            ],
            gaps: vec![Gap {
                kind: GapKind::Unsequenced {
                    after: 2,
                    count: 10,
                },
                reason: GapReason::Overrun,
                ts_us: 5,
            }],
        }
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: 1,
                role: Role::Uplink,
                id: "gw".into(),
                max_event_bytes: 65536,
                compression: vec![Compression::Zstd, Compression::None],
            },
            Frame::Welcome {
                version: 1,
                node_id: "node-a".into(),
                incarnation: 42,
                max_event_bytes: 1 << 20,
                max_frame_bytes: 1 << 24,
                compression: Compression::None,
            },
            Frame::Reject {
                code: ErrorCode::ROLE_DENIED,
                reason: "no".into(),
            },
            sample_batch(),
            Frame::Subscribe {
                filters: vec!["site-a/#".into()],
                start: Start::Time(99),
                durable: Some("analytics".into()),
                credit: 1000,
                gaps: true,
                incarnation: None,
            },
            Frame::Credit { events: 10 },
            Frame::Truncated {
                requested: 1,
                earliest: 100,
            },
        ]
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let frames = all_frames();
        let mut wire = Vec::new();
        for f in &frames {
            encode_frame(f, &mut wire).unwrap();
        }
        // All at once.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut input = &wire[..];
        let mut got = Vec::new();
        while let Some(f) = dec.decode(&mut input).unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames);
        assert!(input.is_empty());
        dec.finish().unwrap();
        // One byte at a time.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for b in &wire {
            let mut input = std::slice::from_ref(b);
            while let Some(f) = dec.decode(&mut input).unwrap() {
                got.push(f);
            }
            assert!(input.is_empty());
        }
        assert_eq!(got, frames);
        dec.finish().unwrap();
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(1024);
        let mut input: &[u8] = &[0x01, 0x04, 0x00, 0x00, 1, 2, 3];
        assert_eq!(
            dec.decode(&mut input),
            Err(DecodeError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        // Only the header was taken; nothing of the body was buffered or allocated.
        assert_eq!(dec.buffered(), HEADER_LEN);
        assert_eq!(dec.body.capacity(), 0);
        assert_eq!(input, &[1, 2, 3]);
        assert_eq!(dec.decode(&mut input), Err(DecodeError::Poisoned));
    }

    #[test]
    fn zero_length_trailing_and_truncated_are_errors() {
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(
            dec.decode(&mut &[0u8, 0, 0, 0][..]),
            Err(DecodeError::Empty)
        );

        // Credit { events: 7 } is 2 bytes; announce 3.
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(
            dec.decode(&mut &[3u8, 0, 0, 0, 9, 7, 0][..]),
            Err(DecodeError::Trailing(1))
        );

        let mut dec = FrameDecoder::new(1024);
        let mut input: &[u8] = &[5, 0, 0, 0, 9];
        assert_eq!(dec.decode(&mut input), Ok(None));
        assert_eq!(
            dec.finish(),
            Err(DecodeError::Truncated { have: 1, need: 5 })
        );

        let mut dec = FrameDecoder::new(1024);
        assert!(matches!(
            dec.decode(&mut &[1u8, 0, 0, 0, 200][..]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
