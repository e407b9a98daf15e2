//! Fuzzes the streaming frame decoder: arbitrary bytes, fed in arbitrary chunks, must yield
//! frames or an error — never a panic, never a buffer beyond one maximum frame — and every
//! frame that decodes must encode back to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemesh_proto::codec::{encode_frame, FrameDecoder, HEADER_LEN};

const MAX_FRAME: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let (chunk, bytes) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut dec = FrameDecoder::new(MAX_FRAME);
    for piece in bytes.chunks(chunk) {
        let mut input = piece;
        loop {
            match dec.decode(&mut input) {
                Ok(Some(frame)) => {
                    let mut wire = Vec::new();
                    encode_frame(&frame, &mut wire).expect("a decoded frame encodes");
                    let mut again = FrameDecoder::new(u32::MAX);
                    let back = again.decode(&mut &wire[..]).expect("re-decodes");
                    assert_eq!(back, Some(frame));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= HEADER_LEN + MAX_FRAME as usize);
    }
});
