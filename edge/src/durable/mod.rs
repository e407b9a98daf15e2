//! The durable-ack listener: an MQTT 3.1.1 and 5 port for publishing devices where PUBACK
//! (QoS 1) and PUBREC (QoS 2) are sent only after the group commit that holds the event.
//!
//! Each connection is two tasks: a reader that parses packets and queues appends to the
//! buffer's writer, and an acker that answers in order as commits complete. The queue between
//! them holds at most `max_inflight` unanswered packets; with it full, or with the writer's
//! own queue full (a slow disk, or `overflow = "block"` with a full buffer), the reader stops
//! reading its socket — TCP backpressure, not loss, and memory stays bounded.
//!
//! QoS 2 is exactly once: the (client id, packet id) is committed in the same transaction as
//! the event, so a PUBLISH resent after a crash or reconnect is recognised and answered
//! without storing it again; PUBREL forgets the id (committed before PUBCOMP). QoS 1 may store
//! a resend after a crash twice, as MQTT allows; within a live session a DUP resend of an
//! unanswered packet id is recognised. SUBSCRIBE is answered with failure codes: the port is
//! for publishers, and its events are not re-published to the embedded broker.

pub mod codec;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};

use crate::buffer::{now_us, AppendError, AppendResult, Durable, Handle, Incoming, Reader};
use crate::metrics::EdgeMetrics;
use codec::{CloseReason, CodecError, ConnCode, In, Out, Version};
use telemesh_proto::check_event_size;
use telemesh_proto::topic::validate_topic_name;

/// QoS 2 packet ids one client may have stored and not released (PUBREC sent, no PUBREL
/// yet), at most: a client past it is disconnected (0x93), so its exactly-once state cannot
/// grow without bound.
pub const MAX_QOS2_PER_CLIENT: usize = 4_096;

/// The longest client id the durable port accepts, in bytes.
pub const MAX_CLIENT_ID: usize = 128;

/// How the durable port behaves.
#[derive(Clone)]
pub struct DurableOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// TLS, if set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Username → password; when set, every client must log in.
    pub users: Option<HashMap<String, String>>,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Unanswered QoS 1/2 packets per connection before the port stops reading it.
    pub max_inflight: u16,
    /// Largest packet accepted.
    pub max_packet: usize,
    /// Time allowed for the TLS handshake and CONNECT.
    pub connect_timeout: Duration,
    /// How long a keep-alive 0 client may stay silent.
    pub idle_timeout: Duration,
    /// The largest event (topic, payload and headers) the mesh takes from this agent: a
    /// larger PUBLISH is refused without an acknowledgement (DISCONNECT 0x95 on MQTT 5).
    pub max_event: usize,
}

impl std::fmt::Debug for DurableOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableOptions")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.as_ref().map(|u| u.len()))
            .field("max_connections", &self.max_connections)
            .field("max_inflight", &self.max_inflight)
            .field("max_packet", &self.max_packet)
            .finish()
    }
}

/// The live connection of a client id.
struct Session {
    /// Held by the connection for its lifetime; a successor waits for it.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Tells the connection it was taken over.
    kick: watch::Sender<bool>,
    /// Which connection this is.
    conn: u64,
}

struct Ctx {
    opts: DurableOptions,
    handle: Handle,
    reader: Reader,
    metrics: Arc<EdgeMetrics>,
    active: AtomicUsize,
    /// Per client id: the session lock held by its live connection, and how to end it.
    sessions: Mutex<HashMap<String, Session>>,
    shutdown: watch::Receiver<bool>,
}

/// The running durable port.
#[derive(Debug)]
pub struct DurableServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl DurableServer {
    /// Binds the port and starts accepting (on the current tokio runtime).
    pub async fn start(
        opts: DurableOptions,
        handle: Handle,
        reader: Reader,
        metrics: Arc<EdgeMetrics>,
    ) -> std::io::Result<DurableServer> {
        let listener = TcpListener::bind(opts.listen).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            opts,
            handle,
            reader,
            metrics,
            active: AtomicUsize::new(0),
            sessions: Mutex::new(HashMap::new()),
            shutdown: shutdown_rx,
        });
        let task = tokio::spawn(
            accept_loop(listener, ctx).instrument(tracing::info_span!("durable", %local_addr)),
        );
        info!(%local_addr, "durable port listening");
        Ok(DurableServer {
            local_addr,
            shutdown,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection once its committed events are answered.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                if ctx.active.load(Relaxed) >= ctx.opts.max_connections {
                    ctx.metrics.durable_refused.fetch_add(1, Relaxed);
                    warn!(%peer, "connection limit reached: refused");
                    continue;
                }
                ctx.active.fetch_add(1, Relaxed);
                ctx.metrics.durable_connections.fetch_add(1, Relaxed);
                let ctx2 = ctx.clone();
                conns.spawn(async move {
                    serve(tcp, &ctx2).await;
                    ctx2.active.fetch_sub(1, Relaxed);
                    ctx2.metrics.durable_connections.fetch_sub(1, Relaxed);
                }.instrument(tracing::info_span!("conn", %peer)));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Let every connection answer what was committed and close.
    while conns.join_next().await.is_some() {}
}

async fn serve(tcp: TcpStream, ctx: &Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    match &ctx.opts.tls {
        None => connection(tcp, ctx).await,
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            match tokio::time::timeout(ctx.opts.connect_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => connection(tls, ctx).await,
                Ok(Err(e)) => {
                    ctx.metrics.durable_protocol_errors.fetch_add(1, Relaxed);
                    debug!(error = %e, "tls handshake failed");
                }
                Err(_) => {
                    ctx.metrics.durable_protocol_errors.fetch_add(1, Relaxed);
                    debug!("tls handshake timed out");
                }
            }
        }
    }
}

/// What the acker answers, in order.
enum Pending {
    /// Answer `ack` once the append commits.
    Commit(Out, oneshot::Receiver<AppendResult>),
    /// Answer `ack` once the session change commits.
    Done(Out, oneshot::Receiver<Result<(), AppendError>>),
    /// Answer at once (in order).
    Now(Out),
    /// Close, telling MQTT 5 clients why.
    Close(CloseReason),
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, ctx: &Arc<Ctx>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let max = ctx.opts.max_packet;
    let m = &ctx.metrics;

    // CONNECT, within the connect timeout.
    let first = tokio::time::timeout(ctx.opts.connect_timeout, async {
        loop {
            if let Some(level) = codec::connect_level(&buf, max)? {
                let version = match level {
                    4 => Version::V4,
                    5 => Version::V5,
                    other => return Err(CodecError::UnsupportedLevel(other)),
                };
                if let Some(p) = codec::read(version, &mut buf, max)? {
                    return Ok(Some((version, p)));
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    })
    .await;
    let (version, connect) = match first {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            m.durable_protocol_errors.fetch_add(1, Relaxed);
            debug!(error = %e, "bad CONNECT");
            if let CodecError::UnsupportedLevel(_) = e {
                // MQTT 3.1.1 §3.2.2.3: answer 0x01 and close.
                let _ = wr.write_all(&[0x20, 2, 0, 1]).await;
            }
            return;
        }
        Err(_) => {
            m.durable_protocol_errors.fetch_add(1, Relaxed);
            debug!("no CONNECT within the connect timeout");
            return;
        }
    };
    let In::Connect {
        mut client_id,
        clean,
        keep_alive,
        will,
        login,
    } = connect
    else {
        m.durable_protocol_errors.fetch_add(1, Relaxed);
        return;
    };
    let reply = |code: ConnCode, present: bool| {
        let mut out = BytesMut::new();
        codec::write(
            version,
            &Out::ConnAck(code, present),
            &mut out,
            ctx.opts.max_inflight,
            max as u32,
        );
        out
    };
    if let Some(users) = &ctx.opts.users {
        let ok = login
            .as_ref()
            .is_some_and(|(u, p)| users.get(u).is_some_and(|want| want == p));
        if !ok {
            m.durable_refused.fetch_add(1, Relaxed);
            warn!(client_id, "bad username or password");
            let _ = wr.write_all(&reply(ConnCode::BadLogin, false)).await;
            return;
        }
    }
    if client_id.is_empty() && clean {
        client_id = format!("auto-{:016x}", rand::random::<u64>());
    }
    // The client id becomes part of a storage key (QoS 2 state): at most MAX_CLIENT_ID
    // bytes of any UTF-8 but NUL (MQTT strings), refused with "client identifier not valid".
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID || client_id.contains('\0') {
        m.durable_refused.fetch_add(1, Relaxed);
        let _ = wr.write_all(&reply(ConnCode::BadClientId, false)).await;
        return;
    }

    // One live connection per client id: a new one ends the old one and waits until the
    // old one has answered (and so committed) everything it took.
    let conn_id = rand::random::<u64>();
    let (lock, mut kicked) = {
        let (kick, kicked) = watch::channel(false);
        let mut sessions = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let lock = match sessions.get(&client_id) {
            Some(old) => {
                let _ = old.kick.send(true);
                old.lock.clone()
            }
            None => Arc::new(tokio::sync::Mutex::new(())),
        };
        sessions.insert(
            client_id.clone(),
            Session {
                lock: lock.clone(),
                kick,
                conn: conn_id,
            },
        );
        (lock, kicked)
    };
    let _session = lock.lock().await;
    if clean {
        let (tx, rx) = oneshot::channel();
        if ctx
            .handle
            .clear_session(client_id.clone(), tx)
            .await
            .is_err()
            || !matches!(rx.await, Ok(Ok(())))
        {
            let _ = wr.write_all(&reply(ConnCode::Unavailable, false)).await;
            return;
        }
    }
    let present = !clean && ctx.reader.has_qos2_state(&client_id).unwrap_or(false);
    if wr
        .write_all(&reply(ConnCode::Accepted, present))
        .await
        .is_err()
    {
        return;
    }
    debug!(client_id, ?version, clean, keep_alive, "connected");

    let (pending_tx, pending_rx) =
        mpsc::channel::<Pending>(usize::from(ctx.opts.max_inflight.max(1)));
    let unanswered_q1 = Arc::new(Mutex::new(HashSet::<u16>::new()));
    let acker = tokio::spawn(ack_loop(
        wr,
        pending_rx,
        version,
        ctx.opts.max_inflight,
        max as u32,
        unanswered_q1.clone(),
        m.clone(),
    ));

    let mut graceful = false;
    let mut close: Option<CloseReason> = None;
    let mut qos2_seen: HashSet<u16> = HashSet::new();
    // QoS 2 packet ids this client has stored and not released, this session or before.
    let mut qos2_held = ctx
        .reader
        .qos2_count(&client_id, MAX_QOS2_PER_CLIENT + 1)
        .unwrap_or(0);
    let mut shutdown = ctx.shutdown.clone();
    // MQTT's 1.5 × keep-alive; keep-alive 0 ("off") still gets the port's idle limit, so a
    // silent client cannot hold a connection slot for ever.
    let idle = Some(if keep_alive > 0 {
        Duration::from_millis(u64::from(keep_alive) * 1500)
    } else {
        ctx.opts.idle_timeout
    });
    'conn: loop {
        // Every whole packet in the buffer first.
        loop {
            let packet = match codec::read(version, &mut buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    m.durable_protocol_errors.fetch_add(1, Relaxed);
                    warn!(client_id, error = %e, "closing connection");
                    close = Some(match e {
                        CodecError::TooLarge(_) => CloseReason::TooLarge,
                        _ => CloseReason::Malformed,
                    });
                    break 'conn;
                }
            };
            match packet {
                In::Publish {
                    qos,
                    dup,
                    pkid,
                    topic,
                    payload,
                    headers,
                } => {
                    if let Err(e) = validate_topic_name(&topic) {
                        m.rejected_invalid.fetch_add(1, Relaxed);
                        warn!(client_id, topic, error = %e, "invalid topic: closing connection");
                        close = Some(CloseReason::TopicInvalid);
                        break 'conn;
                    }
                    if let Err(why) =
                        check_event_size(&topic, &payload, headers.as_deref(), ctx.opts.max_event)
                    {
                        m.rejected_invalid.fetch_add(1, Relaxed);
                        warn!(client_id, topic, reason = %why, "publish too large to forward: closing connection");
                        close = Some(CloseReason::TooLarge);
                        break 'conn;
                    }
                    let event = Incoming {
                        topic,
                        payload,
                        ts_us: now_us(),
                        qos,
                        headers,
                    };
                    let next = match qos {
                        0 => {
                            if ctx
                                .handle
                                .append_durable(event, Durable::default())
                                .await
                                .is_err()
                            {
                                close = Some(CloseReason::Storage);
                                break 'conn;
                            }
                            continue;
                        }
                        1 => {
                            let fresh = unanswered_q1
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(pkid);
                            if !fresh && dup {
                                // A resend of a packet whose PUBACK is still on its way.
                                m.durable_duplicates.fetch_add(1, Relaxed);
                                continue;
                            }
                            let (tx, rx) = oneshot::channel();
                            let d = Durable {
                                notify: Some(tx),
                                qos2: None,
                            };
                            if ctx.handle.append_durable(event, d).await.is_err() {
                                close = Some(CloseReason::Storage);
                                break 'conn;
                            }
                            Pending::Commit(Out::PubAck(pkid), rx)
                        }
                        _ => {
                            let known = qos2_seen.contains(&pkid)
                                || ctx.reader.qos2(&client_id, pkid).ok().flatten().is_some();
                            qos2_seen.insert(pkid);
                            if known {
                                // Stored before (this session, or before a crash): answer
                                // without storing it again.
                                m.durable_duplicates.fetch_add(1, Relaxed);
                                Pending::Now(Out::PubRec(pkid))
                            } else {
                                if qos2_held >= MAX_QOS2_PER_CLIENT {
                                    m.rejected_invalid.fetch_add(1, Relaxed);
                                    warn!(
                                        client_id,
                                        held = qos2_held,
                                        "too many QoS 2 messages not released: closing connection"
                                    );
                                    close = Some(CloseReason::ReceiveMaximum);
                                    break 'conn;
                                }
                                qos2_held += 1;
                                let (tx, rx) = oneshot::channel();
                                let d = Durable {
                                    notify: Some(tx),
                                    qos2: Some((client_id.clone(), pkid)),
                                };
                                if ctx.handle.append_durable(event, d).await.is_err() {
                                    close = Some(CloseReason::Storage);
                                    break 'conn;
                                }
                                Pending::Commit(Out::PubRec(pkid), rx)
                            }
                        }
                    };
                    if pending_tx.send(next).await.is_err() {
                        break 'conn;
                    }
                }
                In::PubRel(pkid) => {
                    // Only a packet id that is stored frees a place (a PUBREL for an unknown
                    // one must not make room for more).
                    let stored = qos2_seen.remove(&pkid)
                        || ctx.reader.qos2(&client_id, pkid).ok().flatten().is_some();
                    if stored {
                        qos2_held = qos2_held.saturating_sub(1);
                    }
                    let (tx, rx) = oneshot::channel();
                    if ctx
                        .handle
                        .release_qos2(client_id.clone(), pkid, tx)
                        .await
                        .is_err()
                        || pending_tx
                            .send(Pending::Done(Out::PubComp(pkid), rx))
                            .await
                            .is_err()
                    {
                        break 'conn;
                    }
                }
                In::PingReq => {
                    if pending_tx.send(Pending::Now(Out::PingResp)).await.is_err() {
                        break 'conn;
                    }
                }
                In::Subscribe(pkid, n) => {
                    if pending_tx
                        .send(Pending::Now(Out::SubAckRefused(pkid, n)))
                        .await
                        .is_err()
                    {
                        break 'conn;
                    }
                }
                In::Unsubscribe(pkid, n) => {
                    if pending_tx
                        .send(Pending::Now(Out::UnsubAck(pkid, n)))
                        .await
                        .is_err()
                    {
                        break 'conn;
                    }
                }
                In::Disconnect => {
                    graceful = true;
                    break 'conn;
                }
                In::Connect { .. } | In::Unexpected(_) => {
                    m.durable_protocol_errors.fetch_add(1, Relaxed);
                    warn!(client_id, "protocol violation: closing connection");
                    close = Some(CloseReason::ProtocolError);
                    break 'conn;
                }
            }
        }
        // Then more bytes, unless the keep-alive lapses, the session is taken over or the
        // agent stops.
        let read = rd.read_buf(&mut buf);
        tokio::select! {
            r = async {
                match idle {
                    Some(d) => tokio::time::timeout(d, read).await.ok(),
                    None => Some(read.await),
                }
            } => match r {
                None => {
                    close = Some(CloseReason::KeepAlive);
                    break;
                }
                Some(Ok(0)) | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = kicked.changed() => {
                close = Some(CloseReason::TakenOver);
                graceful = true;
                break;
            }
            _ = shutdown.changed() => {
                close = Some(CloseReason::ShuttingDown);
                graceful = true;
                break;
            }
        }
    }
    if !graceful {
        if let Some(w) = will {
            if validate_topic_name(&w.topic).is_ok() {
                let event = Incoming {
                    topic: w.topic,
                    payload: w.payload,
                    ts_us: now_us(),
                    qos: 0,
                    headers: None,
                };
                let _ = ctx.handle.append_durable(event, Durable::default()).await;
            }
        }
    }
    if let Some(reason) = close {
        let _ = pending_tx.send(Pending::Close(reason)).await;
    }
    drop(pending_tx);
    let _ = acker.await;
    let mut sessions = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
    if sessions.get(&client_id).is_some_and(|s| s.conn == conn_id) {
        sessions.remove(&client_id);
    }
}

async fn ack_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut pending: mpsc::Receiver<Pending>,
    version: Version,
    receive_max: u16,
    max_packet: u32,
    unanswered_q1: Arc<Mutex<HashSet<u16>>>,
    metrics: Arc<EdgeMetrics>,
) {
    let mut out = BytesMut::with_capacity(4096);
    while let Some(p) = pending.recv().await {
        let answer = match p {
            Pending::Commit(ack, mut rx) => {
                let result = match rx.try_recv() {
                    Ok(r) => Ok(r),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        // Not committed yet: first send the acks already earned.
                        if !out.is_empty() {
                            if wr.write_all(&out).await.is_err() {
                                return;
                            }
                            out.clear();
                        }
                        rx.await
                    }
                    Err(oneshot::error::TryRecvError::Closed) => return,
                };
                match result {
                    Ok(Ok(_)) => Some(ack),
                    Ok(Err(e)) => {
                        warn!(error = %e, "event not stored: closing without acknowledging it");
                        codec::write(
                            version,
                            &Out::Disconnect(CloseReason::Storage),
                            &mut out,
                            receive_max,
                            max_packet,
                        );
                        let _ = wr.write_all(&out).await;
                        let _ = wr.shutdown().await;
                        return;
                    }
                    Err(_) => return,
                }
            }
            Pending::Done(ack, rx) => {
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                match rx.await {
                    Ok(Ok(())) => Some(ack),
                    _ => return,
                }
            }
            Pending::Now(o) => Some(o),
            Pending::Close(reason) => {
                codec::write(
                    version,
                    &Out::Disconnect(reason),
                    &mut out,
                    receive_max,
                    max_packet,
                );
                let _ = wr.write_all(&out).await;
                let _ = wr.shutdown().await;
                return;
            }
        };
        if let Some(a) = answer {
            if let Out::PubAck(pkid) = a {
                unanswered_q1
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pkid);
            }
            if matches!(a, Out::PubAck(_) | Out::PubRec(_)) {
                metrics.durable_acks.fetch_add(1, Relaxed);
            }
            codec::write(version, &a, &mut out, receive_max, max_packet);
        }
        // Write when nothing more is ready, so acks that complete together share a syscall.
        if pending.is_empty() || out.len() > 64 * 1024 {
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
    let _ = wr.write_all(&out).await;
    let _ = wr.shutdown().await;
}
