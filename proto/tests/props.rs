//! Property tests of the protocol core: frames round-trip, the decoder never panics and never
//! buffers beyond its bound, and range sets agree with a `BTreeSet` model.

use std::collections::BTreeSet;

use proptest::collection::vec;
use proptest::prelude::*;
use telemesh_proto::codec::{encode_frame, DecodeError, FrameDecoder, HEADER_LEN};
use telemesh_proto::frame::{
    Compression, ConsumerStatus, DeadLetter, Delivered, DeliveredGap, OriginStatus, Rejection,
    UpstreamStatus,
};
use telemesh_proto::replication::{NotSelected, Replicated, ReplicatedItem};
use telemesh_proto::{
    ErrorCode, Event, Frame, Gap, GapKind, GapReason, Headers, RangeSet, Role, Start,
};

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9/+#$ é-]{0,24}"
}

fn headers() -> impl Strategy<Value = Option<Box<Headers>>> {
    proptest::option::of(
        (
            vec((text(), text()), 0..3),
            proptest::option::of(text()),
            proptest::option::of(text()),
        )
            .prop_map(|(user_properties, content_type, traceparent)| {
                Box::new(Headers {
                    user_properties,
                    content_type,
                    traceparent,
                })
            }),
    )
}

fn event() -> impl Strategy<Value = Event> {
    (
        any::<u64>(),
        text(),
        vec(any::<u8>(), 0..200),
        any::<u64>(),
        0u8..3,
        headers(),
    )
        .prop_map(|(seq, topic, payload, ts_us, qos, headers)| Event {
            seq,
            topic,
            payload,
            ts_us,
            qos,
            headers,
        })
}

fn gap() -> impl Strategy<Value = Gap> {
    let kind = prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(first, last)| GapKind::Range { first, last }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(after, count)| GapKind::Unsequenced { after, count }),
    ];
    let reason = prop_oneof![
        Just(GapReason::Evicted),
        Just(GapReason::Refused),
        Just(GapReason::Overrun),
        Just(GapReason::StorageFailed),
        Just(GapReason::Retention),
    ];
    (kind, reason, any::<u64>()).prop_map(|(kind, reason, ts_us)| Gap {
        kind,
        reason,
        ts_us,
    })
}

fn code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode)
}

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        Just(Start::Earliest),
        Just(Start::Latest),
        any::<u64>().prop_map(Start::Seq),
        any::<u64>().prop_map(Start::Time),
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Uplink), Just(Role::Peer), Just(Role::Consumer)]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd)]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            role(),
            text(),
            any::<u32>(),
            vec(compression(), 0..3)
        )
            .prop_map(
                |(version, role, id, max_event_bytes, compression)| Frame::Hello {
                    version,
                    role,
                    id,
                    max_event_bytes,
                    compression
                }
            ),
        (
            any::<u16>(),
            text(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            compression()
        )
            .prop_map(
                |(version, node_id, incarnation, max_event_bytes, max_frame_bytes, compression)| {
                    Frame::Welcome {
                        version,
                        node_id,
                        incarnation,
                        max_event_bytes,
                        max_frame_bytes,
                        compression,
                    }
                }
            ),
        (code(), text()).prop_map(|(code, reason)| Frame::Reject { code, reason }),
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            vec(event(), 0..8),
            vec(gap(), 0..3)
        )
            .prop_map(|(id, origin, epoch, events, gaps)| Frame::Batch {
                id,
                origin,
                epoch,
                events,
                gaps
            }),
        (
            any::<u64>(),
            vec(
                (any::<u64>(), code(), text()).prop_map(|(seq, code, reason)| Rejection {
                    seq,
                    code,
                    reason
                }),
                0..3
            )
        )
            .prop_map(|(id, rejected)| Frame::Ack { id, rejected }),
        (any::<u64>(), code(), text()).prop_map(|(id, code, reason)| Frame::BatchRefused {
            id,
            code,
            reason
        }),
        (
            vec(text(), 0..4),
            start(),
            proptest::option::of(text()),
            any::<u32>(),
            any::<bool>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(filters, start, durable, credit, gaps, incarnation)| {
                Frame::Subscribe {
                    filters,
                    start,
                    durable,
                    credit,
                    gaps,
                    incarnation,
                }
            }),
        any::<u64>().prop_map(|from| Frame::Subscribed { from }),
        (
            vec(
                (any::<u64>(), any::<u64>(), text(), any::<u64>(), event()).prop_map(
                    |(node_seq, ingest_us, origin, epoch, event)| Delivered {
                        node_seq,
                        ingest_us,
                        origin,
                        epoch,
                        event
                    }
                ),
                0..4
            ),
            vec(
                (any::<u64>(), text(), any::<u64>(), gap()).prop_map(
                    |(node_seq, origin, epoch, gap)| DeliveredGap {
                        node_seq,
                        origin,
                        epoch,
                        gap
                    }
                ),
                0..2
            )
        )
            .prop_map(|(events, gaps)| Frame::Deliver { events, gaps }),
        any::<u32>().prop_map(|events| Frame::Credit { events }),
        any::<u64>().prop_map(|through| Frame::ConsumerAck { through }),
        any::<u64>().prop_map(|through| Frame::Scanned { through }),
        (any::<u64>(), any::<u64>()).prop_map(|(requested, earliest)| Frame::Truncated {
            requested,
            earliest
        }),
        (code(), text()).prop_map(|(code, reason)| Frame::Error { code, reason }),
        Just(Frame::StatusRequest),
        (
            text(),
            any::<u64>(),
            vec(
                (
                    text(),
                    any::<u64>(),
                    vec((any::<u64>(), any::<u64>()), 0..3),
                    vec((any::<u64>(), any::<u64>()), 0..3)
                )
                    .prop_map(|(origin, epoch, held, lost)| OriginStatus {
                        origin,
                        epoch,
                        rejected: lost.clone(),
                        not_selected: held.clone(),
                        held,
                        lost
                    }),
                0..3
            ),
            vec(
                (text(), text(), any::<u64>()).prop_map(|(identity, name, acked)| ConsumerStatus {
                    identity,
                    name,
                    acked
                }),
                0..2
            )
        )
            .prop_map(|(node_id, committed, origins, consumers)| Frame::Status {
                node_id,
                committed,
                origins,
                consumers,
                dead_letters: vec![DeadLetter {
                    origin: "gw".into(),
                    epoch: committed,
                    seq: 3,
                    topic: "t/+".into(),
                    code: ErrorCode::INVALID_TOPIC,
                    reason: "wildcard".into(),
                    ts_us: 9,
                }],
                upstreams: vec![UpstreamStatus {
                    from: "127.0.0.1:7800".into(),
                    node_id: "node-b".into(),
                    connected: true,
                    through: committed,
                    behind: 4,
                    lag_ms: 2,
                }],
            }),
        (
            any::<u64>(),
            any::<u64>(),
            vec(
                (
                    any::<u64>(),
                    text(),
                    vec((text(), any::<u64>()), 0..3),
                    event()
                )
                    .prop_map(|(node_seq, origin, path, event)| Replicated {
                        node_seq,
                        ingest_us: node_seq,
                        origin,
                        epoch: 7,
                        path,
                        item: ReplicatedItem::Event(event),
                    }),
                0..4
            ),
            vec(
                (text(), any::<u64>(), any::<u64>()).prop_map(|(origin, first, last)| {
                    NotSelected {
                        origin,
                        epoch: 1,
                        first,
                        last,
                    }
                }),
                0..3
            )
        )
            .prop_map(|(through, head, records, not_selected)| Frame::Replicate {
                through,
                head,
                records,
                not_selected
            }),
    ]
}

/// Feeds `wire` to `dec` in chunks of the given sizes (cycled), collecting frames.
fn feed_chunked(
    dec: &mut FrameDecoder,
    wire: &[u8],
    chunks: &[usize],
) -> Result<Vec<Frame>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = wire;
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks[i % chunks.len()].clamp(1, rest.len());
        i += 1;
        let mut input = &rest[..n];
        rest = &rest[n..];
        while let Some(f) = dec.decode(&mut input)? {
            out.push(f);
        }
        assert!(
            input.is_empty(),
            "decoder left input unread without a frame"
        );
        assert!(dec.buffered() <= HEADER_LEN + dec.max_frame() as usize);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip(frames in vec(frame(), 1..6), chunks in vec(1usize..64, 1..8)) {
        let mut wire = Vec::new();
        for f in &frames {
            encode_frame(f, &mut wire).unwrap();
        }
        let mut dec = FrameDecoder::new(1 << 20);
        let got = feed_chunked(&mut dec, &wire, &chunks).unwrap();
        prop_assert_eq!(got, frames);
        prop_assert_eq!(dec.finish(), Ok(()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096), chunks in vec(1usize..512, 1..8)) {
        let mut dec = FrameDecoder::new(1024);
        match feed_chunked(&mut dec, &bytes, &chunks) {
            Ok(_) => {}
            Err(e) => {
                // Once failed, it stays failed.
                let mut more: &[u8] = &[0, 0, 0, 0];
                prop_assert_eq!(dec.decode(&mut more), Err(DecodeError::Poisoned));
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn truncated_frames_are_reported(f in frame(), cut_seed in any::<usize>()) {
        let mut wire = Vec::new();
        encode_frame(&f, &mut wire).unwrap();
        let cut = 1 + cut_seed % (wire.len() - 1);
        let mut dec = FrameDecoder::new(1 << 20);
        let mut input = &wire[..cut];
        prop_assert_eq!(dec.decode(&mut input), Ok(None));
        let truncated = matches!(dec.finish(), Err(DecodeError::Truncated { .. }));
        prop_assert!(truncated, "a cut frame must be reported as truncated");
    }

    #[test]
    fn oversized_frames_are_refused(f in frame()) {
        let mut wire = Vec::new();
        let len = encode_frame(&f, &mut wire).unwrap();
        prop_assume!(len > 1);
        let max = (len - 1) as u32;
        let mut dec = FrameDecoder::new(max);
        let mut input = &wire[..];
        prop_assert_eq!(
            dec.decode(&mut input),
            Err(DecodeError::TooLarge { len: len as u32, max })
        );
        prop_assert_eq!(dec.buffered(), HEADER_LEN);
    }

    #[test]
    fn range_set_agrees_with_model(ops in vec((0u64..300, 0u64..20, any::<bool>()), 0..200)) {
        let mut set = RangeSet::new();
        let mut model = BTreeSet::new();
        for (start, width, single) in ops {
            if single {
                prop_assert_eq!(set.insert(start), model.insert(start));
            } else {
                let last = start + width;
                let fresh = (start..=last).filter(|s| !model.contains(s)).count() as u64;
                model.extend(start..=last);
                prop_assert_eq!(set.insert_range(start, last), fresh);
            }
        }
        prop_assert_eq!(set.len(), model.len() as u64);
        for s in 0..330 {
            prop_assert_eq!(set.contains(s), model.contains(&s), "seq {}", s);
        }
        // Ranges are disjoint, ordered and never touch (compact).
        let ranges: Vec<_> = set.ranges().collect();
        for w in ranges.windows(2) {
            prop_assert!(w[0].end() + 1 < *w[1].start());
        }
        let missing: Vec<u64> = set.missing(0, 329).into_iter().flatten().collect();
        let model_missing: Vec<u64> = (0..330).filter(|s| !model.contains(s)).collect();
        prop_assert_eq!(missing, model_missing);
        for lo in [0u64, 50, 150] {
            let mut cut = set.clone();
            cut.remove_below(lo);
            let expect: Vec<u64> = model.iter().copied().filter(|&s| s >= lo).collect();
            let got: Vec<u64> = cut.ranges().flatten().collect();
            prop_assert_eq!(got, expect);
        }
    }
}
