//! `telemesh status`: a status request (the first frame of a consumer's stream) is answered
//! with the completeness view (held, lost, rejected and not-selected seqs per origin and
//! epoch), the durable consumers and what they acknowledged, the newest dead letters and the
//! replication upstreams.

use telemesh_proto::{ErrorCode, Frame};
use telemesh_quic::wire::write_frame;

use super::Ctx;

/// Answers a status request on `send` and finishes the stream.
pub(super) async fn answer(ctx: &Ctx, mut send: quinn::SendStream) {
    let frame = match ctx.log.completeness() {
        Ok(c) => Frame::Status {
            node_id: ctx.cfg.node.id.clone(),
            committed: *ctx.log.committed().borrow(),
            origins: c.origins,
            consumers: c.consumers,
            dead_letters: c.dead_letters,
            upstreams: ctx.upstreams.iter().map(|u| u.status()).collect(),
        },
        Err(e) => Frame::Error {
            code: ErrorCode::INTERNAL,
            reason: e.to_string(),
        },
    };
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
}
