//! Encoding and decoding an uplink batch of 1,000 events with 100-byte payloads.
//!
//! `cargo bench --bench codec` measures; `cargo test --benches` runs each benchmark once.
//! The framing overhead per event (wire bytes beyond topic and payload) is printed once.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use telemesh_proto::codec::{encode_frame, FrameDecoder, DEFAULT_MAX_FRAME};
use telemesh_proto::{Event, Frame};

const EVENTS: u64 = 1_000;

fn batch() -> Frame {
    let base_us = 1_764_150_000_000_000u64;
    let events = (1..=EVENTS)
        .map(|seq| Event {
            seq: 1_000_000 + seq,
            topic: format!("site-a/line{}/sensor{}/temp", seq % 4, seq % 50),
            payload: vec![b'x'; 100],
            ts_us: base_us + seq * 37,
            qos: 1,
            headers: None,
        })
        .collect();
    Frame::Batch {
        id: 12_345,
        origin: "site-a-gw-1".into(),
        epoch: 1_764_150_000_000 * 2048 + 1_234,
        events,
        gaps: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let frame = batch();
    let mut wire = Vec::new();
    encode_frame(&frame, &mut wire).expect("encode");
    if let Frame::Batch { events, .. } = &frame {
        let content: usize = events.iter().map(Event::size).sum();
        let overhead = (wire.len() - content) as f64 / events.len() as f64;
        println!(
            "codec: {} events, {} wire bytes, {:.2} bytes of framing per event beyond topic and payload",
            events.len(),
            wire.len(),
            overhead
        );
    }

    let mut group = c.benchmark_group("batch_1000x100B");
    group.throughput(Throughput::Elements(EVENTS));
    let mut out = Vec::with_capacity(wire.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode_frame(black_box(&frame), &mut out).expect("encode");
            black_box(out.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter_batched(
            || FrameDecoder::new(DEFAULT_MAX_FRAME),
            |mut dec| {
                let mut input = black_box(&wire[..]);
                dec.decode(&mut input)
                    .expect("decode")
                    .expect("a whole frame")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
