//! Subscriptions of consumers and peers: one loop over the committed log (catch-up and live
//! tail alike), bounded by the subscriber's credit; durable cursors stored through the log
//! writer; replication rounds for peers.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use telemesh_proto::replication::{PeerRound, Replicated, ReplicatedItem};
use telemesh_proto::topic::matches;
use telemesh_proto::{validate_name, ErrorCode, Frame, Role};
use tracing::warn;

use super::handshake::protocol_error;
use super::Ctx;
use crate::config::Access;
use crate::log::Record;
use telemesh_quic::wire::{write_frame, FrameReader, WireError};

/// The bytes of a subscription's filters, all together, at most (they are matched against
/// every record and stored with a durable cursor).
const MAX_FILTER_BYTES: usize = 8 * 1024;

/// Who a subscription serves, as its hello said.
pub(super) struct Subscriber {
    /// The certificate's identity.
    pub(super) identity: String,
    /// Consumer or peer.
    pub(super) role: Role,
    /// Whether replication rounds go compressed.
    pub(super) zstd: bool,
    /// Its access entry.
    pub(super) access: Access,
    /// The largest frame it accepts.
    pub(super) accepts: u32,
}

/// Releases a durable consumer's name when its connection ends.
struct DurableGuard<'a>(&'a Ctx, Option<Vec<u8>>);

impl Drop for DurableGuard<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.1.take() {
            self.0
                .active_durables
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
            // consumer_ttl counts from the end of the last connection.
            self.0.log.touch_cursor(k);
        }
    }
}

/// Refuses a subscription: the error ends its stream; the connection stays for others.
async fn send_error(send: &mut quinn::SendStream, ctx: &Ctx, code: ErrorCode, reason: String) {
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "subscription refused");
    let _ = write_frame(send, &Frame::Error { code, reason }).await;
    let _ = send.finish();
}

/// A log record as it travels to a replica.
fn replicated(node_seq: u64, rec: Record) -> Replicated {
    match rec {
        Record::Event {
            origin,
            epoch,
            ingest_us,
            event,
            path,
        } => Replicated {
            node_seq,
            ingest_us,
            origin,
            epoch,
            path,
            item: ReplicatedItem::Event(event),
        },
        Record::Gap {
            origin,
            epoch,
            ingest_us,
            gap,
            path,
        } => Replicated {
            node_seq,
            ingest_us,
            origin,
            epoch,
            path,
            item: ReplicatedItem::Gap(gap),
        },
    }
}

/// Serves one subscription: catch-up and live tail are one loop — read the committed log
/// from the cursor, and when it is reached, wait for the committed mark to move. Credit
/// bounds what is sent ahead of the consumer, so a slow consumer costs no memory.
pub(super) async fn consumer(
    conn: quinn::Connection,
    sub: Subscriber,
    mut reader: FrameReader,
    mut send: quinn::SendStream,
    ctx: Arc<Ctx>,
) {
    let Subscriber {
        identity,
        role,
        zstd,
        access,
        accepts,
    } = sub;
    // Frames to this subscriber stay within a quarter of what it accepts (and of this
    // node's frame limit), leaving room for framing; one record always fits.
    let budget = (accepts.min(ctx.cfg.node.max_frame_bytes.as_u64() as u32) / 4) as usize;
    use telemesh_proto::frame::{Delivered, DeliveredGap};
    use telemesh_proto::topic::{filter_within, validate_filter};
    use telemesh_proto::Start;

    let first = reader.next().await;
    if let Ok(Some(Frame::StatusRequest)) = first {
        return super::status::answer(&ctx, send).await;
    }
    let Ok(Some(Frame::Subscribe {
        filters,
        start,
        durable,
        credit,
        gaps: want_gaps,
        incarnation: peer_incarnation,
    })) = first
    else {
        match first {
            Err(e) if !matches!(e, WireError::Read(_)) => {
                protocol_error(&ctx, &conn, e.code(), &e.to_string())
            }
            Err(_) | Ok(None) => {}
            Ok(Some(_)) => protocol_error(
                &ctx,
                &conn,
                ErrorCode::UNEXPECTED_FRAME,
                "a consumer starts with subscribe",
            ),
        }
        return;
    };
    if filters.is_empty() {
        return send_error(
            &mut send,
            &ctx,
            ErrorCode::INVALID_FILTER,
            "no filter".into(),
        )
        .await;
    }
    let filter_bytes: usize = filters.iter().map(String::len).sum();
    if filter_bytes > MAX_FILTER_BYTES {
        let why = format!("filters of {filter_bytes} bytes in all, more than {MAX_FILTER_BYTES}");
        return send_error(&mut send, &ctx, ErrorCode::LIMIT_EXCEEDED, why).await;
    }
    for f in &filters {
        if let Err(e) = validate_filter(f) {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::INVALID_FILTER,
                format!("{f:?}: {e}"),
            )
            .await;
        }
        let allowed = access
            .read
            .as_ref()
            .is_none_or(|read| read.iter().any(|r| filter_within(f, r)));
        if !allowed {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::READ_DENIED,
                format!("{f:?} is outside what {identity} may read"),
            )
            .await;
        }
    }
    // A peer keeps its cursor in its own log: the node keeps no state for it.
    let peer = (role == Role::Peer).then(|| peer_incarnation.unwrap_or(0));
    let durable = if peer.is_some() { None } else { durable };
    // The name becomes a storage key: refused here, it never reaches the log writer.
    if let Some(Err(why)) = durable.as_deref().map(|n| validate_name("durable name", n)) {
        return send_error(&mut send, &ctx, ErrorCode::INVALID_NAME, why).await;
    }
    let key = durable
        .as_ref()
        .map(|name| crate::log::cursor_key(&identity, name));
    let stored = match &key {
        Some(k) => ctx.log.cursor(k).ok().flatten(),
        None => None,
    };
    if stored.as_ref().is_some_and(|c| c.filters != filters) {
        return send_error(
            &mut send,
            &ctx,
            ErrorCode::DURABLE_FILTERS_DIFFER,
            "the durable name has other filters".into(),
        )
        .await;
    }
    let mut guard = DurableGuard(&ctx, None);
    if let Some(k) = &key {
        let fresh = ctx
            .active_durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone());
        if !fresh {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::DURABLE_IN_USE,
                "the durable name is in use".into(),
            )
            .await;
        }
        guard.1 = Some(k.clone());
    }
    let committed_now = *ctx.log.committed().borrow();
    let mut from = match &stored {
        Some(c) => c.acked + 1,
        None => match start {
            Start::Earliest => ctx.log.first_seq().unwrap_or(1),
            Start::Latest => committed_now + 1,
            Start::Seq(n) => n.max(1),
            Start::Time(t) => ctx.log.seq_at_time(t).unwrap_or(committed_now + 1),
        },
    };
    if let (Some(k), None) = (&key, &stored) {
        let cursor = crate::log::Cursor {
            filters: filters.clone(),
            acked: from - 1,
            seen_us: crate::log::now_us(),
        };
        if ctx.log.put_cursor(k.clone(), cursor).await.is_err() {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::STORAGE_FAILED,
                "cannot store the cursor".into(),
            )
            .await;
        }
    }
    let earliest = ctx.log.first_seq().unwrap_or(1);
    if from < earliest {
        if write_frame(
            &mut send,
            &Frame::Truncated {
                requested: from,
                earliest,
            },
        )
        .await
        .is_err()
        {
            return;
        }
        from = earliest;
    }
    if write_frame(&mut send, &Frame::Subscribed { from })
        .await
        .is_err()
    {
        return;
    }
    let mut credit = u64::from(credit);
    let mut committed = ctx.log.committed();
    loop {
        let head = *committed.borrow_and_update();
        let deliverable = credit > 0 && from <= head;
        if deliverable {
            let want = credit.min(1_000) as usize;
            // Read about what the credit can take: records read past it would be decoded
            // only to be read again next round.
            // LMDB reads run off the async workers: a subscription scanning a long stretch
            // of the log never holds a runtime thread.
            let log = ctx.log.clone();
            let read =
                tokio::task::spawn_blocking(move || log.read_within(from, want.max(256), budget))
                    .await;
            let records = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    warn!(error = %e, "log read failed");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "log read task failed");
                    break;
                }
            };
            // Retention may have deleted what this subscription had not read yet.
            if let Some((first, _)) = records.first() {
                if *first > from {
                    let t = Frame::Truncated {
                        requested: from,
                        earliest: *first,
                    };
                    if write_frame(&mut send, &t).await.is_err() {
                        break;
                    }
                    from = *first;
                }
            }
            let frame = if let Some(incarnation) = peer {
                let mut round =
                    PeerRound::new(&filters, (&identity, incarnation), from, want, budget);
                for (seq, rec) in records {
                    if seq > head || !round.offer(seq, replicated(seq, rec)) {
                        break;
                    }
                }
                from = round.through() + 1;
                credit -= round.events() as u64;
                ctx.metrics
                    .replicated_out
                    .fetch_add(round.events() as u64, Relaxed);
                let frame = round.into_frame(head);
                if zstd {
                    match telemesh_quic::wire::deflate(&frame) {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(error = %e, "compression failed");
                            break;
                        }
                    }
                } else {
                    frame
                }
            } else {
                let mut events = Vec::new();
                let mut gap_items = Vec::new();
                let mut through = from - 1;
                let mut bytes = 0usize;
                for (seq, rec) in records {
                    if seq > head || events.len() >= want {
                        break;
                    }
                    let selected = match &rec {
                        Record::Event { event, .. } => {
                            filters.iter().any(|f| matches(f, &event.topic))
                        }
                        Record::Gap { .. } => want_gaps,
                    };
                    if let (true, Record::Event { event, .. }) = (selected, &rec) {
                        // Bounded in bytes too: the frame stays within the budget.
                        let size = event.size() + 64;
                        if !events.is_empty() && bytes + size > budget {
                            break;
                        }
                        bytes += size;
                    }
                    through = seq;
                    match rec {
                        Record::Event {
                            origin,
                            epoch,
                            ingest_us,
                            event,
                            ..
                        } => {
                            if selected {
                                events.push(Delivered {
                                    node_seq: seq,
                                    ingest_us,
                                    origin,
                                    epoch,
                                    event,
                                });
                            }
                        }
                        Record::Gap {
                            origin, epoch, gap, ..
                        } => {
                            if selected {
                                gap_items.push(DeliveredGap {
                                    node_seq: seq,
                                    origin,
                                    epoch,
                                    gap,
                                });
                            }
                        }
                    }
                }
                from = through + 1;
                if events.is_empty() && gap_items.is_empty() {
                    Frame::Scanned { through }
                } else {
                    credit -= events.len() as u64;
                    ctx.metrics
                        .delivered
                        .fetch_add(events.len() as u64, Relaxed);
                    let now = crate::log::now_us();
                    for e in &events {
                        ctx.metrics
                            .delivery_latency
                            .observe_us(now.saturating_sub(e.event.ts_us));
                    }
                    Frame::Deliver {
                        events,
                        gaps: gap_items,
                    }
                }
            };
            if write_frame(&mut send, &frame).await.is_err() {
                break;
            }
        }
        let deliverable = credit > 0 && from <= *committed.borrow();
        tokio::select! {
            biased;
            f = reader.next() => match f {
                Ok(Some(Frame::Credit { events })) => credit = credit.saturating_add(u64::from(events)),
                Ok(Some(Frame::ConsumerAck { through })) => {
                    if let Some(k) = &key {
                        let cursor = crate::log::Cursor { filters: filters.clone(), acked: through.min(from - 1), seen_us: crate::log::now_us() };
                        if ctx.log.put_cursor(k.clone(), cursor).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Some(f)) => {
                    let why = format!("a subscriber sends credit and acks only, not {}", f.kind());
                    protocol_error(&ctx, &conn, ErrorCode::UNEXPECTED_FRAME, &why);
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    if !matches!(e, WireError::Read(_)) {
                        protocol_error(&ctx, &conn, e.code(), &e.to_string());
                    }
                    break;
                }
            },
            r = committed.changed(), if !deliverable => if r.is_err() { break },
            _ = std::future::ready(()), if deliverable => {}
            // An idle peer link carries a heartbeat: how far the log goes, and that the
            // path works.
            _ = tokio::time::sleep(telemesh_proto::replication::HEARTBEAT), if peer.is_some() && !deliverable => {
                let beat = Frame::Replicate {
                    through: from - 1,
                    head: *committed.borrow(),
                    records: Vec::new(),
                    not_selected: Vec::new(),
                };
                if write_frame(&mut send, &beat).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(guard);
}
