//! Events, their identity, and gap records.
//!
//! An event is named at the edge, when it is appended to the agent's buffer, by
//! [`EventId`] `{ origin, epoch, seq }`, and keeps that name on its whole way through the
//! mesh. Within a batch the origin and epoch are carried once and each [`Event`] carries
//! only its `seq`, which keeps the framing per event small (see `benches/codec.rs`).

use serde::{Deserialize, Serialize};

/// The identity of an event: who made it, in which epoch of its buffer, at which seq.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventId {
    /// The edge agent's id, which is the name on its certificate.
    pub origin: String,
    /// Chosen when a buffer is created and anew after every unclean stop: clock
    /// milliseconds × 2048 + 11 random bits, below 2^53.
    pub epoch: u64,
    /// 1, 2, 3 … without gaps within an epoch; never reused for other content.
    pub seq: u64,
}

/// One telemetry event as it travels in a batch whose origin and epoch are given once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The event's seq within its batch's origin and epoch.
    pub seq: u64,
    /// The MQTT topic name it was published to.
    pub topic: String,
    /// The payload bytes, opaque to telemesh.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// When the edge received it, in microseconds since the Unix epoch.
    pub ts_us: u64,
    /// The QoS the device published with, as far as the edge could see it (0, 1 or 2).
    pub qos: u8,
    /// Optional headers; `None` costs one byte on the wire.
    pub headers: Option<Box<Headers>>,
}

impl Event {
    /// The bytes this event counts for in size limits: its topic, payload and headers.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.headers.as_ref().map_or(0, |h| h.size())
    }
}

/// Whether an event of this topic, payload and headers can travel through a mesh whose
/// events may be at most `max_event` bytes (as [`Event::size`] counts them) and carry at
/// most [`crate::bounded::MAX_USER_PROPERTIES`] user properties. The edge checks every event
/// when it arrives, so that none it stores is refused downstream for its size.
pub fn check_event_size(
    topic: &str,
    payload: &[u8],
    headers: Option<&Headers>,
    max_event: usize,
) -> Result<(), String> {
    let properties = headers.map_or(0, |h| h.user_properties.len());
    if properties > crate::bounded::MAX_USER_PROPERTIES {
        return Err(format!(
            "{properties} user properties, more than {}",
            crate::bounded::MAX_USER_PROPERTIES
        ));
    }
    let size = topic.len() + payload.len() + headers.map_or(0, Headers::size);
    if size > max_event {
        return Err(format!(
            "event of {size} bytes (topic, payload and headers) exceeds {max_event}"
        ));
    }
    Ok(())
}

/// Headers that travel with an event end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers {
    /// MQTT 5 user properties, in the order the device sent them (at most
    /// [`crate::bounded::MAX_USER_PROPERTIES`]).
    #[serde(
        deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_USER_PROPERTIES }>"
    )]
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// A W3C `traceparent`, when the device sent one as a user property or header.
    pub traceparent: Option<String>,
}

impl Headers {
    /// The bytes the headers count for in size limits: each user property's key and value,
    /// the content type and the traceparent.
    pub fn size(&self) -> usize {
        self.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + self.content_type.as_ref().map_or(0, String::len)
            + self.traceparent.as_ref().map_or(0, String::len)
    }

    /// True when there is nothing to carry.
    pub fn is_empty(&self) -> bool {
        self.user_properties.is_empty() && self.content_type.is_none() && self.traceparent.is_none()
    }
}

/// A record of events that were lost at the edge: loss is data, not silence.
///
/// Gaps belong to an origin and an epoch (given by the batch or the store that holds them)
/// and are ordered with the events by their position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// Which events were lost.
    pub kind: GapKind,
    /// Why they were lost.
    pub reason: GapReason,
    /// When the loss was recorded, in microseconds since the Unix epoch.
    pub ts_us: u64,
}

/// The largest seq an event may have (and the largest count of events a gap may record):
/// 2^53 − 1, so that JSON keeps every seq exact. A value beyond it is refused where it
/// enters, so no arithmetic on seqs can overflow.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

impl Gap {
    /// Checks a gap record from the wire: a range `1 <= first <= last <= MAX_SEQ`, or an
    /// unsequenced loss of `1..=MAX_SEQ` events after a seq `<= MAX_SEQ`.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            GapKind::Range { first, last } => {
                if first == 0 || first > last || last > MAX_SEQ {
                    return Err(format!(
                        "gap range {first}..={last} is empty, reversed or beyond seq {MAX_SEQ}"
                    ));
                }
            }
            GapKind::Unsequenced { after, count } => {
                if count == 0 || count > MAX_SEQ || after > MAX_SEQ {
                    return Err(format!(
                        "gap of {count} events after seq {after} is empty or beyond {MAX_SEQ}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many events the gap records (saturating: a validated gap never saturates).
    pub fn count(&self) -> u64 {
        match self.kind {
            GapKind::Range { first, last } => last.saturating_sub(first).saturating_add(1),
            GapKind::Unsequenced { count, .. } => count,
        }
    }

    /// The seq this gap is ordered after: events with a seq up to this one come before it.
    pub fn position(&self) -> u64 {
        match self.kind {
            GapKind::Range { first, .. } => first.saturating_sub(1),
            GapKind::Unsequenced { after, .. } => after,
        }
    }
}

/// The extent of a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GapKind {
    /// Events that had seqs `first..=last` and were dropped before a node acknowledged them.
    Range {
        /// The first lost seq.
        first: u64,
        /// The last lost seq (inclusive).
        last: u64,
    },
    /// `count` events that never got a seq, lost after seq `after` of the epoch (0: before
    /// its first event).
    Unsequenced {
        /// The seq after which they were lost.
        after: u64,
        /// How many were lost.
        count: u64,
    },
}

/// Why events were lost. New reasons are added at the end; none is ever renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GapReason {
    /// The edge buffer was full and `overflow = "drop-oldest"` evicted unacknowledged events.
    Evicted,
    /// The edge buffer was full and new events were refused (`drop-newest`, or the broker
    /// port under `block`).
    Refused,
    /// The embedded broker skipped events because its reader fell behind (an overrun).
    Overrun,
    /// The edge could not store events because its disk failed or filled.
    StorageFailed,
    /// A node's retention deleted events before a replica or consumer read them.
    Retention,
}

impl GapReason {
    /// A stable lowercase name for logs, metrics and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Evicted => "evicted",
            GapReason::Refused => "refused",
            GapReason::Overrun => "overrun",
            GapReason::StorageFailed => "storage_failed",
            GapReason::Retention => "retention",
        }
    }
}

impl std::fmt::Display for GapReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_positions_order_with_events() {
        let range = Gap {
            kind: GapKind::Range { first: 5, last: 9 },
            reason: GapReason::Evicted,
            ts_us: 0,
        };
        assert_eq!(range.position(), 4);
        let unseq = Gap {
            kind: GapKind::Unsequenced { after: 0, count: 3 },
            reason: GapReason::Overrun,
            ts_us: 0,
        };
        assert_eq!(unseq.position(), 0);
    }

    #[test]
    fn gaps_that_are_empty_reversed_or_absurd_are_refused() {
        let gap = |kind| Gap {
            kind,
            reason: GapReason::Evicted,
            ts_us: 0,
        };
        for ok in [
            GapKind::Range { first: 1, last: 1 },
            GapKind::Range {
                first: 5,
                last: MAX_SEQ,
            },
            GapKind::Unsequenced { after: 0, count: 1 },
        ] {
            assert!(gap(ok).validate().is_ok(), "{ok:?}");
        }
        for bad in [
            GapKind::Range {
                first: 0,
                last: u64::MAX,
            },
            GapKind::Range { first: 9, last: 5 },
            GapKind::Range { first: 0, last: 3 },
            GapKind::Range {
                first: 1,
                last: MAX_SEQ + 1,
            },
            GapKind::Unsequenced { after: 3, count: 0 },
            GapKind::Unsequenced {
                after: 0,
                count: u64::MAX,
            },
        ] {
            assert!(gap(bad).validate().is_err(), "{bad:?}");
        }
        assert_eq!(
            gap(GapKind::Range {
                first: 0,
                last: u64::MAX
            })
            .count(),
            u64::MAX
        );
    }

    #[test]
    fn headers_emptiness() {
        assert!(Headers::default().is_empty());
        let h = Headers {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..Headers::default()
        };
        assert!(!h.is_empty());
    }
}
