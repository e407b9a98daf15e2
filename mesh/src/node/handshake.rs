//! Connection set-up: every connection's identity comes from its certificate, and every
//! stream opens with a hello that is checked (version, identity, `[[access]]`, limits) and
//! answered with a welcome or a reject before the stream is handed to its role.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use telemesh_proto::frame::Compression;
use telemesh_proto::{validate_name, ErrorCode, Frame, Role, PROTOCOL_VERSION};
use tracing::{debug, warn, Instrument};

use super::ingest::uplink;
use super::subscribe::consumer;
use super::subscribe::Subscriber;
use super::Ctx;
use crate::config::{
    FRAME_HEADROOM, HELLO_MAX_FRAME, LEGACY_SUBSCRIBER_FRAME, SUBSCRIBER_MAX_FRAME,
};
use telemesh_quic::tls::{self};
use telemesh_quic::wire::{write_frame, FrameReader};

fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(
        quinn::VarInt::from_u32(u32::from(code.0)),
        reason.as_bytes(),
    );
}

/// A malformed or unexpected frame: counted, logged, and the connection closed with `code`.
pub(super) fn protocol_error(ctx: &Ctx, conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    ctx.metrics.protocol_errors.fetch_add(1, Relaxed);
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "protocol error: closing the connection");
    close(conn, code, reason);
}

async fn reject(
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    ctx: &Ctx,
    code: ErrorCode,
    reason: String,
) {
    ctx.metrics.refused.fetch_add(1, Relaxed);
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "connection refused");
    let _ = write_frame(
        send,
        &Frame::Reject {
            code,
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = send.stopped().await;
    close(conn, code, &reason);
}

pub(super) async fn connection(conn: quinn::Connection, ctx: Arc<Ctx>) {
    let Some(identity) = tls::peer_identity(&conn) else {
        ctx.metrics.refused.fetch_add(1, Relaxed);
        ctx.metrics.count_error(ErrorCode::UNKNOWN_IDENTITY, 1);
        close(
            &conn,
            ErrorCode::UNKNOWN_IDENTITY,
            "no identity in the client certificate",
        );
        return;
    };
    let over = {
        let mut per = ctx.per_identity.lock().unwrap_or_else(|p| p.into_inner());
        let n = per.entry(identity.clone()).or_default();
        *n += 1;
        *n > ctx.cfg.node.max_connections_per_identity
    };
    let _held = IdentitySlot(ctx.clone(), identity.clone());
    if over {
        ctx.metrics.refused.fetch_add(1, Relaxed);
        ctx.metrics.count_error(ErrorCode::LIMIT_EXCEEDED, 1);
        let why = format!(
            "{identity} has {} connections already (node.max_connections_per_identity)",
            ctx.cfg.node.max_connections_per_identity
        );
        close(&conn, ErrorCode::LIMIT_EXCEEDED, &why);
        return;
    }
    let span = tracing::info_span!("peer", %identity);
    // Every stream of the connection opens with its own hello (a consumer may run several
    // subscriptions on one connection).
    async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(
                stream(conn.clone(), identity.clone(), send, recv, ctx.clone())
                    .instrument(tracing::Span::current()),
            );
        }
    }
    .instrument(span)
    .await
}

async fn stream(
    conn: quinn::Connection,
    identity: String,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: Arc<Ctx>,
) {
    {
        // Nothing big before the hello: it is read with a small limit and a deadline; only
        // after the access check does the stream get its role's limit.
        let mut reader = FrameReader::new(recv, HELLO_MAX_FRAME);
        let hello = match tokio::time::timeout(ctx.cfg.node.hello_timeout, reader.next()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                protocol_error(&ctx, &conn, e.code(), &e.to_string());
                return;
            }
            Err(_) => {
                let why = format!("no hello within {:?}", ctx.cfg.node.hello_timeout);
                protocol_error(&ctx, &conn, ErrorCode::HELLO_TIMEOUT, &why);
                return;
            }
        };
        let Frame::Hello {
            version,
            role,
            id,
            max_event_bytes,
            compression: offered,
        } = hello
        else {
            protocol_error(
                &ctx,
                &conn,
                ErrorCode::UNEXPECTED_FRAME,
                "the first frame must be a hello",
            );
            return;
        };
        if version != PROTOCOL_VERSION {
            let why = format!("protocol version {version} is not {PROTOCOL_VERSION}");
            return reject(&mut send, &conn, &ctx, ErrorCode::UNSUPPORTED_VERSION, why).await;
        }
        if let Err(why) = validate_name("identity", &identity) {
            return reject(&mut send, &conn, &ctx, ErrorCode::INVALID_NAME, why).await;
        }
        if id != identity {
            let why = format!("hello id {id:?} differs from the certificate's {identity:?}");
            return reject(&mut send, &conn, &ctx, ErrorCode::IDENTITY_MISMATCH, why).await;
        }
        let Some(access) = ctx.cfg.access_for(&identity, role).cloned() else {
            let known = ctx.cfg.access.iter().any(|a| a.identity == identity);
            let (code, why) = if known {
                (
                    ErrorCode::ROLE_DENIED,
                    format!("{identity} may not connect as {}", role.as_str()),
                )
            } else {
                (
                    ErrorCode::UNKNOWN_IDENTITY,
                    format!("{identity} has no access entry"),
                )
            };
            return reject(&mut send, &conn, &ctx, code, why).await;
        };
        let node_max = ctx.cfg.node.max_event_bytes.as_u64() as u32;
        let max_frame = match role {
            Role::Uplink => ctx.cfg.node.max_frame_bytes.as_u64() as u32,
            Role::Consumer | Role::Peer => SUBSCRIBER_MAX_FRAME,
        };
        reader.set_max_frame(max_frame);
        if role == Role::Uplink && max_event_bytes > node_max {
            let why = format!("the edge's max payload {max_event_bytes} exceeds the node's maximum event size {node_max}");
            return reject(&mut send, &conn, &ctx, ErrorCode::LIMITS_MISMATCH, why).await;
        }
        // A subscriber's hello names the largest frame it accepts (0: what earlier releases
        // accept); every frame it is sent stays within it, and one event must fit.
        let accepts = match max_event_bytes {
            0 => LEGACY_SUBSCRIBER_FRAME,
            n => n,
        };
        if role != Role::Uplink
            && u64::from(accepts) < u64::from(node_max) + u64::from(FRAME_HEADROOM)
        {
            let why = format!("frames of at most {accepts} bytes cannot carry this node's events of up to {node_max} bytes");
            return reject(&mut send, &conn, &ctx, ErrorCode::LIMITS_MISMATCH, why).await;
        }
        // An uplink that offers zstd may send its batches compressed; a peer that offers it
        // gets its replication rounds compressed.
        let compression = if role != Role::Consumer && offered.contains(&Compression::Zstd) {
            if role == Role::Uplink {
                reader.accept_compressed();
            }
            Compression::Zstd
        } else {
            Compression::None
        };
        let welcome = Frame::Welcome {
            version: PROTOCOL_VERSION,
            node_id: ctx.cfg.node.id.clone(),
            incarnation: ctx.log.incarnation(),
            max_event_bytes: node_max,
            max_frame_bytes: max_frame,
            compression,
        };
        if write_frame(&mut send, &welcome).await.is_err() {
            return;
        }
        ctx.metrics.connections.fetch_add(1, Relaxed);
        debug!(role = role.as_str(), "welcomed");
        if role == Role::Consumer || role == Role::Peer {
            let zstd = compression == Compression::Zstd;
            let sub = Subscriber {
                identity,
                role,
                zstd,
                access,
                accepts,
            };
            consumer(conn, sub, reader, send, ctx).await;
        } else {
            uplink(conn, identity, access, reader, send, ctx).await;
        }
    }
}

/// One of an identity's live connections, given back when the connection ends.
struct IdentitySlot(Arc<Ctx>, String);

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut per = self
            .0
            .per_identity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}
