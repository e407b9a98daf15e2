//! The decoder's memory stays bounded on hostile input: a frame that claims a huge number of
//! elements, or any random bytes, never makes it allocate much more than the frame itself.
//!
//! This binary counts every allocation with a global allocator, so it holds a single test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use telemesh_proto::codec::FrameDecoder;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_FRAME: u32 = 64 * 1024;

/// Decodes `wire` and returns the peak of bytes allocated meanwhile, above what was live before.
fn peak_while_decoding(wire: &[u8]) -> usize {
    let mut dec = FrameDecoder::new(MAX_FRAME);
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let mut input = wire;
    while let Ok(Some(frame)) = dec.decode(&mut input) {
        drop(frame);
    }
    PEAK.load(Ordering::SeqCst) - base
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut wire = (body.len() as u32).to_le_bytes().to_vec();
    wire.extend_from_slice(body);
    wire
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What decoding a frame of `len` bytes may allocate: decoded values are a bounded multiple
/// of their wire size, and serde caps speculative preallocation at 1 MiB per sequence.
fn bound(len: usize) -> usize {
    32 * len + 4 * 1024 * 1024
}

#[test]
fn decoding_hostile_frames_allocates_a_bounded_amount() {
    // A batch that claims 2^62 events, then 2^62-byte topics inside a frame of a few bytes.
    let mut body = vec![3u8]; // Frame::Batch
    varint(1, &mut body); // id
    body.push(2);
    body.extend_from_slice(b"gw"); // origin
    varint(7, &mut body); // epoch
    varint(1 << 62, &mut body); // events: claimed count
    varint(1, &mut body); // first event: seq
    varint(1 << 62, &mut body); // topic: claimed length
    let wire = framed(&body);
    let peak = peak_while_decoding(&wire);
    assert!(
        peak <= bound(wire.len()),
        "peak {peak} bytes for {} wire bytes",
        wire.len()
    );

    // A frame announcing more than the maximum: refused before anything is buffered.
    let mut wire = (MAX_FRAME + 1).to_le_bytes().to_vec();
    wire.extend(std::iter::repeat_n(0u8, 1024));
    assert!(peak_while_decoding(&wire) < 1024);

    // Many empty events claiming huge header lists each.
    let mut body = vec![3u8, 1, 2, b'g', b'w', 7];
    varint(5_000, &mut body);
    for seq in 0..5_000u64 {
        varint(seq, &mut body);
        body.extend_from_slice(&[0, 0, 0, 0, 1]); // topic, payload, ts, qos, Some(headers)
        varint(1 << 40, &mut body); // user properties: claimed count
    }
    let wire = framed(&body);
    let peak = peak_while_decoding(&wire);
    assert!(
        peak <= bound(wire.len()),
        "peak {peak} bytes for {} wire bytes",
        wire.len()
    );

    // Random bytes behind a valid length.
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&proptest::collection::vec(any::<u8>(), 1..16_384), |body| {
            let wire = framed(&body);
            let peak = peak_while_decoding(&wire);
            prop_assert!(
                peak <= bound(wire.len()),
                "peak {} for {} bytes",
                peak,
                wire.len()
            );
            Ok(())
        })
        .unwrap();
}
