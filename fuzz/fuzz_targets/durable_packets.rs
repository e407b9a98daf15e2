//! Fuzzes the durable port's packet handling: arbitrary bytes as a client's stream, in
//! arbitrary chunks, through the CONNECT check and the MQTT 3.1.1/5 packet reader the port
//! runs, and every PUBLISH through the checks the port applies before it stores anything
//! (topic name, event size and header count). Never a panic; the buffer never holds more
//! than one packet beyond the limit; a packet that reads is answered and encodes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use telemesh_edge::durable::codec::{connect_level, read, write, In, Out, Version};
use telemesh_proto::check_event_size;
use telemesh_proto::topic::validate_topic_name;

const MAX_PACKET: usize = 64 * 1024;
const MAX_EVENT: usize = 32 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    let mut version = None;
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        let v = match version {
            Some(v) => v,
            None => match connect_level(&buf, MAX_PACKET) {
                Ok(Some(4)) => *version.insert(Version::V4),
                Ok(Some(5)) => *version.insert(Version::V5),
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => continue,
            },
        };
        loop {
            match read(v, &mut buf, MAX_PACKET) {
                Ok(Some(packet)) => {
                    if let In::Publish {
                        topic,
                        payload,
                        headers,
                        pkid,
                        qos,
                        ..
                    } = &packet
                    {
                        if validate_topic_name(topic).is_ok()
                            && check_event_size(topic, payload, headers.as_deref(), MAX_EVENT)
                                .is_ok()
                        {
                            assert!(topic.len() + payload.len() <= MAX_EVENT);
                        }
                        if *qos == 1 {
                            let mut out = BytesMut::new();
                            write(v, &Out::PubAck(*pkid), &mut out, 100, MAX_PACKET as u32);
                            assert!(!out.is_empty());
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        // What is left is part of one packet, never more than the limit and its header.
        assert!(buf.len() <= MAX_PACKET + 5 + chunk);
    }
});
