//! The telemesh client library for cloud services.
//!
//! A telemesh mesh carries telemetry from devices at the edge to broker nodes, where it is
//! stored in a durable log. This crate connects a service to one node over QUIC with mutual
//! TLS, as a **consumer**: it subscribes with MQTT topic filters and a start position, and
//! receives every stored event with its full identity. It depends on the protocol crate and
//! the shared QUIC crate only: no LMDB, no HTTP server, no node code.
//!
//! # Connecting
//!
//! A consumer needs a certificate signed by the mesh CA (`telemesh certs --client NAME`)
//! and an `[[access]]` entry on the node naming it with `role = "consumer"` and the filters
//! it may `read`. [`ClientConfig`] is `client.toml`:
//!
//! ```toml
//! node = "node-a.example:7800"   # host:port of the node (UDP)
//! server_name = "node-a"         # optional: the name on the node's certificate
//! ca = "certs/ca.pem"
//! cert = "certs/analytics.pem"   # its first DNS name is the identity access rules name
//! key = "certs/analytics.key"
//! ```
//!
//! # Consuming
//!
//! [`Client::subscribe`] opens a [`Subscription`] on its own stream (one connection may carry
//! several). The node first replays what its log holds from the start position, then follows
//! new commits: catch-up and the live tail are one loop, with no gap and no duplicate at the
//! switch. [`Subscription::next`] yields [`Item`]s:
//!
//! - [`Item::Event`]: a [`Delivered`] event. Its identity `(origin, epoch, event.seq)` is
//!   given once at the edge and never changes: delivery is at-least-once, so a service that
//!   must not count an event twice keys on it. `node_seq` is its position in this node's log.
//! - [`Item::Gap`] (only with [`SubscribeOptions::gaps`]): events an edge lost (its buffer
//!   was full, its broker overran), with the range and the reason. Loss is reported, never
//!   silent.
//! - [`Item::Truncated`]: the start lay before what retention kept; delivery continues at
//!   the earliest event the node still holds.
//!
//! A **durable** consumer ([`SubscribeOptions::durable`]) has a name, scoped to the client's
//! identity, under which the node stores what it acknowledged ([`Subscription::ack`],
//! cumulative by `node_seq`): after a restart of the service or the node it resumes right
//! after its last ack, whatever start it asks for. A name is exclusive (a second connection
//! with it is refused) and keeps its filters.
//!
//! Flow control is credit: the node never sends more than `credit_window` events ahead, and
//! the library grants more as items are taken, so a slow service costs the node nothing.
//!
//! ```no_run
//! use telemesh_client::{Client, ClientConfig, ClientError, Item, Start, SubscribeOptions};
//!
//! # async fn service() -> Result<(), ClientError> {
//! let cfg = ClientConfig::load(std::path::Path::new("client.toml"))?;
//! let client = Client::connect(&cfg).await?;
//! let opts = SubscribeOptions::new(vec!["site-a/+/temp".into()])
//!     .durable("billing") // resume where the last run acknowledged
//!     .start(Start::Earliest) // only for the first run of the name
//!     .gaps(true);
//! let mut sub = client.subscribe(opts).await?;
//! while let Some(item) = sub.next().await? {
//!     match item {
//!         Item::Event(e) => {
//!             // (origin, epoch, seq) names the event everywhere in the mesh.
//!             let id = (&e.origin, e.epoch, e.event.seq);
//!             println!("{id:?} {} {} bytes", e.event.topic, e.event.payload.len());
//!             sub.ack(e.node_seq).await?; // everything through here is done
//!         }
//!         Item::Gap(g) => eprintln!("{} lost events: {:?}", g.origin, g.gap),
//!         Item::Truncated { requested, earliest } => {
//!             eprintln!("retention deleted {requested}..{earliest} before it was read")
//!         }
//!     }
//! }
//! sub.finish().await?; // the last ack is stored before this returns
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Status
//!
//! [`Client::status`] returns the node's completeness view (per origin and epoch: the seqs
//! held, known lost, rejected and not selected), its durable consumers and what they
//! acknowledged, and its replication upstreams — what `telemesh status` prints.
//!
//! # Errors
//!
//! Every call returns [`ClientError`]. A refusal by the node ([`ClientError::Refused`])
//! carries a stable numeric [`ErrorCode`] and a reason: for example a filter outside what the
//! identity may read, or a durable name in use.

#![deny(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use telemesh_proto::frame::Compression;
use telemesh_proto::{Role, PROTOCOL_VERSION};

pub use telemesh_proto::frame::{Delivered, DeliveredGap};
pub use telemesh_proto::{
    ErrorCode, Event, EventId, Frame, Gap, GapKind, GapReason, Headers, Start,
};

use telemesh_quic::tls::{self, Identity};
use telemesh_quic::wire::{write_frame, FrameReader, WireError};

/// The largest frame the client accepts from a node (the node sizes its deliveries to it).
pub const MAX_FRAME: u32 = 64 << 20;

/// `client.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The node, `host:port`.
    pub node: String,
    /// The name to verify on the node's certificate (default: the host).
    pub server_name: Option<String>,
    /// The mesh CA.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's key.
    pub key: PathBuf,
}

impl ClientConfig {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ClientError::Config(e.to_string()))
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The config is unusable.
    #[error("config: {0}")]
    Config(String),
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The node refused.
    #[error("refused: {code} {reason}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// Why.
        reason: String,
    },
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The node sent something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A connection to a node.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    identity: String,
}

/// What to subscribe to.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// MQTT filters.
    pub filters: Vec<String>,
    /// Where to start (ignored for an existing durable consumer).
    pub start: Start,
    /// A durable consumer's name.
    pub durable: Option<String>,
    /// Whether gap records are wanted too.
    pub gaps: bool,
    /// Events the node may send ahead.
    pub credit_window: u32,
}

impl SubscribeOptions {
    /// `filters`, from the latest event on, 1,000 events of credit.
    pub fn new(filters: Vec<String>) -> Self {
        SubscribeOptions {
            filters,
            start: Start::Latest,
            durable: None,
            gaps: false,
            credit_window: 1_000,
        }
    }

    /// Start here.
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// As the durable consumer `name`.
    pub fn durable(mut self, name: &str) -> Self {
        self.durable = Some(name.to_owned());
        self
    }

    /// Deliver gap records too.
    pub fn gaps(mut self, gaps: bool) -> Self {
        self.gaps = gaps;
        self
    }
}

/// One thing a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event.
    Event(Delivered),
    /// A gap record (with `gaps`).
    Gap(DeliveredGap),
    /// The start lay before what the node still holds.
    Truncated {
        /// The node seq asked for.
        requested: u64,
        /// Where delivery starts instead.
        earliest: u64,
    },
}

/// A running subscription.
#[derive(Debug)]
pub struct Subscription {
    /// The id of the node serving the subscription.
    pub node_id: String,
    send: quinn::SendStream,
    reader: FrameReader,
    pending: std::collections::VecDeque<Item>,
    window: u32,
    taken: u32,
    /// The first node seq the subscription may deliver.
    pub from: u64,
    /// The last node seq the node scanned or delivered.
    pub position: u64,
}

impl Client {
    /// Connects as a consumer.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        let roots = tls::load_roots(&cfg.ca)?;
        let client = tls::client_config(roots, Identity::load(&cfg.cert, &cfg.key)?)?;
        let identity = Identity::load(&cfg.cert, &cfg.key)?
            .name()
            .ok_or_else(|| ClientError::Config("the certificate names no one".into()))?;
        let addr: SocketAddr = tokio::net::lookup_host(&cfg.node)
            .await
            .map_err(|e| ClientError::Connect(format!("{}: {e}", cfg.node)))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("{}: no address", cfg.node)))?;
        let host = cfg
            .node
            .rsplit_once(':')
            .map(|(h, _)| h.to_owned())
            .unwrap_or_default();
        let name = cfg.server_name.clone().unwrap_or(host);
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|e: std::net::AddrParseError| ClientError::Connect(e.to_string()))?;
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(client);
        let conn = endpoint
            .connect(addr, &name)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Client {
            endpoint,
            conn,
            identity,
        })
    }

    /// This client's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Opens a stream and says hello as a consumer.
    async fn open(&self) -> Result<(quinn::SendStream, FrameReader, String), ClientError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        write_frame(
            &mut send,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Consumer,
                id: self.identity.clone(),
                // A subscriber names the largest frame it accepts.
                max_event_bytes: MAX_FRAME,
                compression: vec![Compression::None],
            },
        )
        .await?;
        let mut reader = FrameReader::new(recv, MAX_FRAME);
        match reader.next().await? {
            Some(Frame::Welcome { node_id, .. }) => Ok((send, reader, node_id)),
            Some(Frame::Reject { code, reason }) => Err(ClientError::Refused { code, reason }),
            other => Err(ClientError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// The node's completeness view: per origin and epoch, what it holds and knows lost, and
    /// its durable consumers.
    pub async fn status(&self) -> Result<Frame, ClientError> {
        let (mut send, mut reader, _) = self.open().await?;
        write_frame(&mut send, &Frame::StatusRequest).await?;
        match reader.next().await? {
            Some(f @ Frame::Status { .. }) => Ok(f),
            Some(Frame::Error { code, reason }) => Err(ClientError::Refused { code, reason }),
            other => Err(ClientError::Protocol(format!(
                "expected status, got {other:?}"
            ))),
        }
    }

    /// Starts a subscription on its own stream.
    pub async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, ClientError> {
        let (mut send, mut reader, node_id) = self.open().await?;
        write_frame(
            &mut send,
            &Frame::Subscribe {
                filters: opts.filters,
                start: opts.start,
                durable: opts.durable,
                credit: opts.credit_window,
                gaps: opts.gaps,
                incarnation: None,
            },
        )
        .await?;
        let mut pending = std::collections::VecDeque::new();
        let from = loop {
            match reader.next().await? {
                Some(Frame::Subscribed { from }) => break from,
                Some(Frame::Truncated {
                    requested,
                    earliest,
                }) => pending.push_back(Item::Truncated {
                    requested,
                    earliest,
                }),
                Some(Frame::Error { code, reason }) => {
                    return Err(ClientError::Refused { code, reason })
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected subscribed, got {other:?}"
                    )))
                }
            }
        };
        Ok(Subscription {
            node_id,
            send,
            reader,
            pending,
            window: opts.credit_window.max(1),
            taken: 0,
            from,
            position: from.saturating_sub(1),
        })
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

impl Subscription {
    /// The next item; `None` when the node ended the subscription.
    pub async fn next(&mut self) -> Result<Option<Item>, ClientError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if matches!(item, Item::Event(_)) {
                    self.taken += 1;
                    // Grant more once half the window is used.
                    if self.taken >= self.window / 2 {
                        write_frame(&mut self.send, &Frame::Credit { events: self.taken }).await?;
                        self.taken = 0;
                    }
                }
                return Ok(Some(item));
            }
            match self.reader.next().await? {
                Some(Frame::Deliver { events, gaps }) => {
                    // Interleave by node seq.
                    let mut items: Vec<(u64, Item)> = events
                        .into_iter()
                        .map(|e| (e.node_seq, Item::Event(e)))
                        .chain(gaps.into_iter().map(|g| (g.node_seq, Item::Gap(g))))
                        .collect();
                    items.sort_by_key(|(s, _)| *s);
                    if let Some((last, _)) = items.last() {
                        self.position = self.position.max(*last);
                    }
                    self.pending.extend(items.into_iter().map(|(_, i)| i));
                }
                Some(Frame::Scanned { through }) => self.position = self.position.max(through),
                Some(Frame::Truncated {
                    requested,
                    earliest,
                }) => self.pending.push_back(Item::Truncated {
                    requested,
                    earliest,
                }),
                Some(Frame::Error { code, reason }) => {
                    return Err(ClientError::Refused { code, reason })
                }
                Some(other) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {}",
                        other.kind()
                    )))
                }
                None => return Ok(None),
            }
        }
    }

    /// Ends the subscription cleanly: returns once the node has processed everything sent
    /// before (so a last [`Subscription::ack`] is stored).
    pub async fn finish(mut self) -> Result<(), ClientError> {
        let _ = self.send.finish();
        // The node ends its side after the frames before our end; skip what is still coming.
        while self.reader.next().await?.is_some() {}
        Ok(())
    }

    /// Acknowledges everything through `node_seq` (for a durable consumer: where it resumes).
    pub async fn ack(&mut self, node_seq: u64) -> Result<(), ClientError> {
        write_frame(&mut self.send, &Frame::ConsumerAck { through: node_seq }).await?;
        Ok(())
    }
}

impl Item {
    /// One JSON object, as `telemesh sub --json` prints it: events with `origin`, `epoch`,
    /// `seq`, `topic`, `payload` (UTF-8 text, or base64 with `"encoding":"base64"`), `ts_us`
    /// (edge receive time), `ingest_us`, `node` and `node_seq`, plus `qos` and `headers` when
    /// present; gaps and truncations with `"type"`.
    pub fn to_json(&self, node: &str) -> serde_json::Value {
        use base64::Engine;
        use serde_json::json;
        match self {
            Item::Event(d) => {
                let e = &d.event;
                let mut v = json!({
                    "type": "event",
                    "origin": d.origin,
                    "epoch": d.epoch,
                    "seq": e.seq,
                    "topic": e.topic,
                    "ts_us": e.ts_us,
                    "ingest_us": d.ingest_us,
                    "qos": e.qos,
                    "node": node,
                    "node_seq": d.node_seq,
                });
                match std::str::from_utf8(&e.payload) {
                    Ok(text) => v["payload"] = json!(text),
                    Err(_) => {
                        v["payload"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(&e.payload));
                        v["encoding"] = json!("base64");
                    }
                }
                if let Some(h) = &e.headers {
                    v["headers"] = json!({
                        "user_properties": h.user_properties,
                        "content_type": h.content_type,
                        "traceparent": h.traceparent,
                    });
                }
                v
            }
            Item::Gap(g) => {
                let (first, last, after, count) = match g.gap.kind {
                    telemesh_proto::GapKind::Range { first, last } => {
                        (Some(first), Some(last), None, Some(g.gap.count()))
                    }
                    telemesh_proto::GapKind::Unsequenced { after, count } => {
                        (None, None, Some(after), Some(count))
                    }
                };
                json!({
                    "type": "gap",
                    "origin": g.origin,
                    "epoch": g.epoch,
                    "first": first,
                    "last": last,
                    "after": after,
                    "count": count,
                    "reason": g.gap.reason.as_str(),
                    "node": node,
                    "node_seq": g.node_seq,
                })
            }
            Item::Truncated {
                requested,
                earliest,
            } => json!({
                "type": "truncated",
                "requested": requested,
                "earliest": earliest,
                "node": node,
            }),
        }
    }
}
