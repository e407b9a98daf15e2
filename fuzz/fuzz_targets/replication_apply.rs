//! Fuzzes the replica's side of replication: arbitrary bytes decoded as the frames an
//! upstream sends, fed to the `Replicator` after a welcome, with every `Apply` it returns
//! stored (acknowledged) at once. Never a panic; what it asks to store only moves forward
//! (node seqs strictly increase across applies, cursors never go back), never more events
//! than the window before they are stored, and every record it would store passes the
//! checks a node applies before its writer (or is one the node refuses and skips).
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemesh_proto::codec::FrameDecoder;
use telemesh_proto::replication::{ReplicatedItem, Replicator, Step};
use telemesh_proto::frame::Compression;
use telemesh_proto::{validate_name, Frame, Start, MAX_SEQ, PROTOCOL_VERSION};

const WINDOW: u32 = 64;

fuzz_target!(|data: &[u8]| {
    let mut r = Replicator::new(7, vec!["site/#".into()], Start::Earliest, WINDOW, None);
    r.on_connected("down");
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        node_id: "up".into(),
        incarnation: 3,
        max_event_bytes: 1 << 20,
        max_frame_bytes: 1 << 24,
        compression: Compression::None,
    };
    if r.on_frame(welcome).is_err() {
        return;
    }
    let mut dec = FrameDecoder::new(1 << 20);
    let mut input = data;
    let mut last_seq = 0u64;
    let mut last_through = 0u64;
    loop {
        let frame = match dec.decode(&mut input) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        match r.on_frame(frame) {
            Ok(Step::Apply(apply)) => {
                assert!(apply.events() <= WINDOW as usize, "within the window");
                assert!(apply.cursor.through >= last_through, "the cursor only moves on");
                last_through = apply.cursor.through;
                for rec in &apply.records {
                    assert!(rec.node_seq > last_seq, "records only move forward");
                    assert!(rec.node_seq <= apply.cursor.through);
                    last_seq = rec.node_seq;
                    // What a node checks before its writer: refused records are skipped.
                    let _storable = validate_name("origin", &rec.origin).is_ok()
                        && rec.path.iter().all(|(n, _)| validate_name("node", n).is_ok())
                        && match &rec.item {
                            ReplicatedItem::Event(e) => e.seq >= 1 && e.seq <= MAX_SEQ,
                            ReplicatedItem::Gap(g) => g.validate().is_ok(),
                        };
                }
                if let Some((first, last)) = apply.truncated {
                    let _ = (first, last);
                }
                let receipt = apply.receipt();
                let _ = r.on_applied(receipt);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
});
