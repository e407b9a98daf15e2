//! Uplink ingest: batches are validated (origin, topics, access, sizes — a poison pill is
//! refused alone), queued for the log writer in arrival order, and acknowledged in batch
//! order by the acker task as each commit completes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use telemesh_proto::frame::Rejection;
use telemesh_proto::topic::{matches, validate_topic_name};
use telemesh_proto::{ErrorCode, Frame, MAX_SEQ};
use tokio::sync::mpsc;
use tracing::warn;

use super::handshake::protocol_error;
use super::{Ctx, NodeMetrics};
use crate::config::Access;
use crate::log::{wait_commit, LogError, Pending};
use telemesh_quic::wire::{write_frame, FrameReader, WireError};

enum AckItem {
    /// A batch queued for the writer, with its events' edge receive times.
    Pending(u64, Vec<Rejection>, Pending, Vec<u64>),
    Refused(u64, ErrorCode, String),
}

pub(super) async fn uplink(
    conn: quinn::Connection,
    identity: String,
    access: Access,
    mut reader: FrameReader,
    send: quinn::SendStream,
    ctx: Arc<Ctx>,
) {
    let (tx, rx) = mpsc::channel::<AckItem>(64);
    let acker = tokio::spawn(acker(send, rx, ctx.metrics.clone()));
    let max_event = ctx.cfg.node.max_event_bytes.as_u64() as usize;
    let mut refused_logged = 0u64;
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(WireError::Read(_)) => break,
            Err(e) => {
                protocol_error(&ctx, &conn, e.code(), &e.to_string());
                break;
            }
        };
        let Frame::Batch {
            id,
            origin,
            epoch,
            events,
            gaps,
        } = frame
        else {
            protocol_error(
                &ctx,
                &conn,
                ErrorCode::UNEXPECTED_FRAME,
                "an uplink sends batches only",
            );
            break;
        };
        if origin != identity {
            let why = format!("batch origin {origin:?} is not the uplink's identity {identity:?}");
            if tx
                .send(AckItem::Refused(id, ErrorCode::ORIGIN_MISMATCH, why))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        // Gap records are checked by the log API (`NodeLog::submit`): an empty, reversed or
        // absurd range refuses the batch with INVALID_GAP below.
        let mut rejected = Vec::new();
        let mut refused_topics = std::collections::HashMap::new();
        let mut accepted = Vec::with_capacity(events.len());
        for ev in events {
            let refusal = if ev.seq == 0 || ev.seq > MAX_SEQ {
                Some((
                    ErrorCode::INVALID_SEQ,
                    format!("seq {} is outside 1..={MAX_SEQ}", ev.seq),
                ))
            } else if let Err(e) = validate_topic_name(&ev.topic) {
                Some((ErrorCode::INVALID_TOPIC, e.to_string()))
            } else if !access.publish.iter().any(|f| matches(f, &ev.topic)) {
                Some((
                    ErrorCode::PUBLISH_DENIED,
                    format!(
                        "topic {:?} is outside this uplink's publish filters",
                        ev.topic
                    ),
                ))
            } else if ev.size() > max_event {
                Some((
                    ErrorCode::EVENT_TOO_LARGE,
                    format!("event of {} bytes exceeds {max_event}", ev.size()),
                ))
            } else {
                None
            };
            match refusal {
                Some((code, reason)) => {
                    // Logged once per connection (with the first reason); every refusal is
                    // counted by code and answered in the ack.
                    if refused_logged == 0 {
                        warn!(seq = ev.seq, %code, %reason, "event refused (further refusals on this connection are counted, not logged)");
                    }
                    refused_logged += 1;
                    refused_topics.insert(ev.seq, ev.topic.clone());
                    rejected.push(Rejection {
                        seq: ev.seq,
                        code,
                        reason,
                    });
                }
                None => accepted.push(ev),
            }
        }
        ctx.metrics
            .events_rejected
            .fetch_add(rejected.len() as u64, Relaxed);
        for r in &rejected {
            ctx.metrics.count_error(r.code, 1);
        }
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        // An event without a valid seq has no identity to keep: it is refused, not stored.
        let dead: Vec<telemesh_proto::frame::DeadLetter> = rejected
            .iter()
            .filter(|r| r.code != ErrorCode::INVALID_SEQ)
            .map(|r| telemesh_proto::frame::DeadLetter {
                origin: origin.clone(),
                epoch,
                seq: r.seq,
                topic: refused_topics.get(&r.seq).cloned().unwrap_or_default(),
                code: r.code,
                reason: r.reason.clone(),
                ts_us: now_us,
            })
            .collect();
        let received: Vec<u64> = accepted.iter().map(|e| e.ts_us).collect();
        match ctx.log.submit(origin, epoch, accepted, gaps, dead).await {
            Ok(pending) => {
                if tx
                    .send(AckItem::Pending(id, rejected, pending, received))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(LogError::Refused { code, reason }) => {
                let _ = tx.send(AckItem::Refused(id, code, reason)).await;
            }
            Err(e) => {
                let _ = tx
                    .send(AckItem::Refused(
                        id,
                        ErrorCode::STORAGE_FAILED,
                        e.to_string(),
                    ))
                    .await;
            }
        }
    }
    drop(tx);
    let _ = acker.await;
    if refused_logged > 1 {
        warn!(
            refused = refused_logged,
            "events refused on this connection"
        );
    }
}

async fn acker(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<AckItem>,
    metrics: Arc<NodeMetrics>,
) {
    while let Some(item) = rx.recv().await {
        let frame = match item {
            AckItem::Pending(id, rejected, pending, received) => match wait_commit(pending).await {
                Ok(outcome) => {
                    // Resent batches would count their first journey twice: left out.
                    if outcome.duplicates == 0 {
                        let now = crate::log::now_us();
                        for t in received {
                            metrics.ingest_latency.observe_us(now.saturating_sub(t));
                        }
                    }
                    metrics.batches_acked.fetch_add(1, Relaxed);
                    metrics.events_stored.fetch_add(outcome.stored, Relaxed);
                    metrics.duplicates.fetch_add(outcome.duplicates, Relaxed);
                    Frame::Ack { id, rejected }
                }
                Err(e) => {
                    metrics.batches_refused.fetch_add(1, Relaxed);
                    let full = matches!(&e, crate::log::LogError::Writer(w) if w == crate::log::STORAGE_FULL);
                    let code = if full {
                        ErrorCode::STORAGE_FULL
                    } else {
                        ErrorCode::STORAGE_FAILED
                    };
                    metrics.count_error(code, 1);
                    Frame::BatchRefused {
                        id,
                        code,
                        reason: e.to_string(),
                    }
                }
            },
            AckItem::Refused(id, code, reason) => {
                metrics.batches_refused.fetch_add(1, Relaxed);
                metrics.count_error(code, 1);
                Frame::BatchRefused { id, code, reason }
            }
        };
        if write_frame(&mut send, &frame).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
