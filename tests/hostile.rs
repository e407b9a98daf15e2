//! Attacks on real `telemesh node` processes (real QUIC, certificates and LMDB), one test per
//! attack. After each, the same checks: a good uplink (the real gateway draining an edge
//! buffer) is still acknowledged, a good consumer (`telemesh sub`) still gets every event,
//! nothing acknowledged was lost, `/healthz` answers 200, and the node's RssAnon stayed
//! under [`NODE_RSS_ANON_MIB`].

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use telemesh_proto::{ErrorCode, Frame, Gap, GapKind, GapReason, Role};
use telemesh_quic::wire::write_frame;
use telemesh_testkit::quic::{dial, events, hello, hello_with};

/// The bound on the node's anonymous memory after every attack: a debug build serving these
/// tests holds a few MiB, about 55 MiB after taking 10 MiB batches (freed heap stays mapped).
const NODE_RSS_ANON_MIB: u64 = 128;

/// A node process with an uplink `gw-1` (publish `site/#`), a consumer `analytics` (read
/// `site/#`) and `/metrics` on.
struct Node {
    dir: tempfile::TempDir,
    process: Process,
    addr: SocketAddr,
    http: SocketAddr,
    client_toml: PathBuf,
}

impl Node {
    fn start() -> Node {
        Node::start_with("")
    }

    /// A node with further `[node]` keys (`key = value` lines).
    fn start_with(node_keys: &str) -> Node {
        let dir = mesh_certs(&["node-a"], &["gw-1", "gw-2"], &["analytics", "stranger"]);
        let certs = dir.path().join("certs");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut config = NodeToml::new("node-a", &certs, &dir.path().join("node"))
            .listen(&addr.to_string())
            .map_size("512MiB");
        for line in node_keys.lines().filter(|l| !l.trim().is_empty()) {
            config = config.node_key(line);
        }
        let config = config
            .section(&format!("[metrics]\nlisten = \"{http}\""))
            .access("gw-1", "uplink", "publish = [\"site/#\"]")
            .access("gw-2", "uplink", "publish = [\"site/#\"]")
            .access("analytics", "consumer", "read = [\"site/#\"]")
            .write(&dir.path().join("node.toml"));
        let process = spawn_role("node", &config);
        wait_listening(http);
        let client_toml =
            write_client_toml(dir.path(), &certs, &addr.to_string(), "node-a", "analytics");
        Node {
            dir,
            process,
            addr,
            http,
            client_toml,
        }
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    async fn dial(&self, name: &str) -> quinn::Connection {
        dial(
            &self.certs(),
            name,
            &self.certs().join("ca.pem"),
            self.addr,
            "node-a",
        )
        .await
        .unwrap()
    }

    /// Runs `telemesh sub` against the node as `analytics` (off the runtime's threads).
    async fn sub(&self, args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
        let toml = self.client_toml.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sub(&toml, &args)
        })
        .await
        .unwrap()
    }

    /// `telemesh sub` of `site/#` from the earliest event until `count` events (JSON lines).
    async fn read_all(
        &self,
        count: usize,
        timeout: &str,
    ) -> (bool, Vec<serde_json::Value>, String) {
        let count = count.to_string();
        self.sub(&[
            "--filter",
            "site/#",
            "--from",
            "earliest",
            "--json",
            "--count",
            &count,
            "--timeout",
            timeout,
        ])
        .await
    }

    fn rss_anon_mib(&self) -> u64 {
        rss_anon_kib(self.process.id()) / 1024
    }

    /// What must hold after an attack: `n` events from a good uplink are acknowledged, a
    /// good consumer reads all `total` events the node holds, `/healthz` is 200 and the
    /// memory bound held.
    async fn still_serves_good_clients(&self, n: u64, total: usize) {
        let buffer = test_buffer(&self.dir.path().join("edge"), "gw-1", 8 << 20);
        let up = RunningUplink::start(
            "gw-1",
            uplink_options(&self.certs(), vec![self.addr.to_string()]),
            &self.certs(),
            "gw-1",
            &buffer,
        );
        append(&buffer, 0, n);
        let epoch = buffer.epoch();
        let reader = buffer.reader();
        wait_for_async(
            "the good uplink's events acknowledged",
            Duration::from_secs(30),
            || reader.state().unwrap().acked == Some((epoch, n)),
        )
        .await;
        up.stop().await;
        let (ok, lines, err) = self.read_all(total, "30s").await;
        assert!(ok, "the good consumer is served: {err}");
        assert_eq!(lines.len(), total, "every stored event is delivered");
        let health = http_get(self.http, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let rss = self.rss_anon_mib();
        eprintln!("node RssAnon after the attack: {rss} MiB");
        assert!(
            rss < NODE_RSS_ANON_MIB,
            "node RssAnon {rss} MiB over its bound of {NODE_RSS_ANON_MIB} MiB"
        );
    }
}

/// The regression of the review's C1: `telemesh sub --durable` with a 600-byte name made LMDB
/// refuse the cursor key, which stopped the log writer for good (every later batch
/// STORAGE_FAILED, `/healthz` 503). The name is refused with its code; nothing else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_600_byte_durable_name_is_refused_and_the_writer_goes_on() {
    let node = Node::start();
    let long = "x".repeat(600);
    let (ok, lines, err) = node
        .sub(&[
            "--filter",
            "site/#",
            "--durable",
            &long,
            "--count",
            "1",
            "--timeout",
            "10s",
        ])
        .await;
    assert!(!ok, "sub fails");
    assert!(lines.is_empty());
    assert!(
        err.contains("invalid_name") && err.contains("600 bytes"),
        "refused with its code and why: {err}"
    );
    // Names at the bound and with other characters: the bound is served, the rest refused.
    let (ok, _, err) = node
        .sub(&[
            "--filter",
            "site/#",
            "--durable",
            "a/b",
            "--count",
            "1",
            "--timeout",
            "10s",
        ])
        .await;
    assert!(!ok && err.contains("invalid_name"), "{err}");
    node.still_serves_good_clients(1_000, 1_000).await;
}

/// A hostile uplink sends gap records that are empty, reversed or absurd (`0..=u64::MAX`) and
/// events with seqs 0 and `u64::MAX`: the gaps refuse their batch with INVALID_GAP, the
/// events are refused alone with INVALID_SEQ, nothing overflows, and the connection and the
/// node go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_gap_ranges_and_seqs_are_refused_with_codes() {
    let node = Node::start();
    let conn = dial(
        &node.certs(),
        "gw-2",
        &node.certs().join("ca.pem"),
        node.addr,
        "node-a",
    )
    .await
    .unwrap();
    let (mut send, mut reader, welcome) = hello(&conn, "gw-2", Role::Uplink).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    let gap = |kind| Gap {
        kind,
        reason: GapReason::Evicted,
        ts_us: 0,
    };
    let bad_gaps = [
        GapKind::Range {
            first: 0,
            last: u64::MAX,
        },
        GapKind::Range { first: 9, last: 3 },
        GapKind::Unsequenced { after: 0, count: 0 },
        GapKind::Unsequenced {
            after: u64::MAX,
            count: u64::MAX,
        },
    ];
    for (id, kind) in bad_gaps.into_iter().enumerate() {
        let batch = Frame::Batch {
            id: id as u64,
            origin: "gw-2".into(),
            epoch: 5,
            events: events(1..=3, "site/x"),
            gaps: vec![gap(kind)],
        };
        write_frame(&mut send, &batch).await.unwrap();
        match reader.next().await.unwrap().unwrap() {
            Frame::BatchRefused { id: got, code, .. } => {
                assert_eq!((got, code), (id as u64, ErrorCode::INVALID_GAP));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let mut evs = events(1..=3, "site/x");
    evs[0].seq = 0;
    evs[2].seq = u64::MAX;
    write_frame(
        &mut send,
        &Frame::Batch {
            id: 10,
            origin: "gw-2".into(),
            epoch: 5,
            events: evs,
            gaps: vec![],
        },
    )
    .await
    .unwrap();
    match reader.next().await.unwrap().unwrap() {
        Frame::Ack { id, rejected } => {
            assert_eq!(id, 10);
            let refused: Vec<_> = rejected.iter().map(|r| (r.seq, r.code)).collect();
            assert_eq!(
                refused,
                [
                    (0, ErrorCode::INVALID_SEQ),
                    (u64::MAX, ErrorCode::INVALID_SEQ)
                ]
            );
        }
        other => panic!("expected an ack, got {other:?}"),
    }
    conn.close(0u32.into(), b"done");
    // gw-2's event seq 2 was stored: 1 + the good uplink's 500.
    node.still_serves_good_clients(500, 501).await;
}

/// The code a connection was closed with by the node.
async fn closed_with(conn: &quinn::Connection) -> ErrorCode {
    match tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the node closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            ErrorCode(u16::try_from(c.error_code.into_inner()).unwrap())
        }
        other => panic!("closed otherwise: {other}"),
    }
}

/// The review's C2: a peer with any certificate of the mesh CA (here one with no access
/// entry at all) announces a 16 MiB first frame on every stream it may open, and trickles
/// it. The hello is read with a 4 KiB limit: each stream is refused at its length prefix,
/// before anything is buffered or decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_first_frame_is_refused_at_its_length_before_any_access_check() {
    let node = Node::start();
    let before = node.rss_anon_mib();
    for _ in 0..8 {
        // "stranger" has a certificate from the mesh CA and no [[access]] entry.
        let conn = node.dial("stranger").await;
        let mut streams = Vec::new();
        // As many streams as the node lets it open before it closes the connection.
        for _ in 0..8 {
            let Ok((mut send, _recv)) = conn.open_bi().await else {
                break;
            };
            let announced = send.write_all(&(16u32 << 20).to_le_bytes()).await;
            let trickled = send.write_all(&[0u8; 64 * 1024]).await;
            streams.push(send);
            if announced.is_err() || trickled.is_err() {
                break;
            }
        }
        assert_eq!(closed_with(&conn).await, ErrorCode::FRAME_TOO_LARGE);
    }
    let after = node.rss_anon_mib();
    eprintln!("node RssAnon before the attack {before} MiB, after {after} MiB");
    assert!(
        after <= before + 16,
        "RssAnon grew from {before} to {after} MiB"
    );
    node.still_serves_good_clients(200, 200).await;
}

/// A stream that opens and never says hello holds nothing for long: the connection is
/// closed with HELLO_TIMEOUT after `node.hello_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_hello_is_closed_after_the_hello_timeout() {
    let node = Node::start_with("hello_timeout = \"300ms\"");
    let conn = node.dial("gw-1").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // A hello's first two bytes, and then silence.
    send.write_all(&[40, 0]).await.unwrap();
    let t = std::time::Instant::now();
    assert_eq!(closed_with(&conn).await, ErrorCode::HELLO_TIMEOUT);
    assert!(t.elapsed() < Duration::from_secs(10));
    node.still_serves_good_clients(100, 100).await;
}

/// Connections per identity are capped (`node.max_connections_per_identity`): the one over
/// the cap is closed with LIMIT_EXCEEDED, the others keep working, and once one ends a new
/// one is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_identity_cap_are_closed_with_limit_exceeded() {
    let node = Node::start_with("max_connections_per_identity = 3");
    let mut held = Vec::new();
    for _ in 0..3 {
        let conn = node.dial("gw-2").await;
        let (_send, _reader, welcome) = hello(&conn, "gw-2", Role::Uplink).await;
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        held.push(conn);
    }
    let over = node.dial("gw-2").await;
    assert_eq!(closed_with(&over).await, ErrorCode::LIMIT_EXCEEDED);
    // Another identity is not affected.
    node.still_serves_good_clients(100, 100).await;
    // One ends; a new one is admitted.
    held.pop().unwrap().close(0u32.into(), b"bye");
    let admitted = wait_admitted(&node, "gw-2").await;
    let (_send, _reader, welcome) = hello(&admitted, "gw-2", Role::Uplink).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
}

/// Dials until a connection of `name` is not closed for the cap (the node learns of a
/// closed connection a moment after the peer closed it).
async fn wait_admitted(node: &Node, name: &str) -> quinn::Connection {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let conn = node.dial(name).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        drop((send.write_all(&[]).await, recv));
        match tokio::time::timeout(Duration::from_millis(200), conn.closed()).await {
            Err(_) => return conn,
            Ok(_) => assert!(std::time::Instant::now() < until, "never admitted again"),
        }
    }
}

/// Nobody may open unidirectional streams (their limit is 0), bidirectional ones are capped
/// at 8 per connection, and a subscription with more than 64 filters is refused as it is
/// decoded (its collection bound), closing only that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_and_collection_bounds_hold() {
    let node = Node::start();
    let conn = node.dial("analytics").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.open_uni())
            .await
            .is_err(),
        "a unidirectional stream cannot be opened"
    );
    let mut open = Vec::new();
    for _ in 0..8 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[1]).await.unwrap();
        open.push((send, recv));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), async {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&[1]).await.unwrap();
        })
        .await
        .is_err(),
        "a ninth concurrent stream waits"
    );
    drop(open);
    conn.close(0u32.into(), b"done");
    // A subscriber whose frames could not carry this node's largest event is refused.
    let conn = node.dial("analytics").await;
    let (_send, _reader, answer) = hello_with(&conn, "analytics", Role::Consumer, 65_536).await;
    assert!(
        matches!(answer, Frame::Reject { code, .. } if code == ErrorCode::LIMITS_MISMATCH),
        "{answer:?}"
    );
    let conn = node.dial("analytics").await;
    // Filters of 10 KB in all are refused with LIMIT_EXCEEDED; the connection stays.
    let (mut send, mut reader, welcome) = hello(&conn, "analytics", Role::Consumer).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    let long = Frame::Subscribe {
        filters: (0..10)
            .map(|i| format!("site/{i}/{}", "x".repeat(1_000)))
            .collect(),
        start: telemesh_proto::Start::Earliest,
        durable: None,
        credit: 10,
        gaps: false,
        incarnation: None,
    };
    write_frame(&mut send, &long).await.unwrap();
    match reader.next().await.unwrap().unwrap() {
        Frame::Error { code, .. } => assert_eq!(code, ErrorCode::LIMIT_EXCEEDED),
        other => panic!("{other:?}"),
    }
    let (mut send, _reader, welcome) = hello(&conn, "analytics", Role::Consumer).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    let subscribe = Frame::Subscribe {
        filters: (0..65).map(|i| format!("site/{i}")).collect(),
        start: telemesh_proto::Start::Earliest,
        durable: None,
        credit: 10,
        gaps: false,
        incarnation: None,
    };
    write_frame(&mut send, &subscribe).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::MALFORMED_FRAME);
    node.still_serves_good_clients(100, 100).await;
}

/// An edge agent (a real `telemesh edge`) with a durable port and an uplink to `node`.
fn start_edge(node: &Node) -> (Process, SocketAddr) {
    let c = node.certs();
    let durable: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = node.dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nid = \"gw-2\"\ndata_dir = \"{d}\"\n\
             [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
             [durable]\nlisten = \"{durable}\"\n\
             [buffer]\nmax_bytes = \"64MiB\"\nmap_size = \"128MiB\"\nsync = \"none\"\n\
             [uplink]\nnodes = [\"{node}\"]\nserver_name = \"node-a\"\nca = \"{c}/ca.pem\"\n\
             cert = \"{c}/gw-2.pem\"\nkey = \"{c}/gw-2.key\"\nbackoff_max = \"200ms\"\n",
            d = node.dir.path().join("edge").display(),
            c = c.display(),
            mqtt = free_port(),
            node = node.addr,
        ),
    )
    .unwrap();
    let agent = spawn_agent(&path);
    wait_listening(durable);
    (agent, durable)
}

/// Publishes `count` MQTT 5 QoS 1 messages on `site/v5` with `props` user properties of
/// `value_bytes` each; returns how many were acknowledged before the connection ended.
async fn publish_v5(
    addr: SocketAddr,
    client: &str,
    count: usize,
    props: usize,
    value_bytes: usize,
) -> usize {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    let mut o = MqttOptions::new(client, addr.ip().to_string(), addr.port());
    o.set_max_packet_size(Some(8 << 20));
    let (c, mut ev) = AsyncClient::new(o, 10);
    tokio::spawn(async move {
        for n in 0..count {
            let properties = PublishProperties {
                user_properties: (0..props)
                    .map(|i| (format!("k{i}"), "v".repeat(value_bytes)))
                    .collect(),
                ..Default::default()
            };
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            if c.publish_with_properties("site/v5", qos, false, n.to_string(), properties)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(20), ev.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    acked
}

/// The review's H1: events whose MQTT 5 user properties dwarf their payload. Headers count
/// in every size limit now: 70 events of ~250 KiB of properties each are stored and
/// forwarded in batches the node accepts (before, they made one frame over 16 MiB that the
/// node refused, and the uplink resent it forever). An event the mesh could never take —
/// more than 1,024 properties, or larger than the agent's maximum event — is refused at
/// the durable port without a PUBACK; everything acknowledged reaches the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_heavy_events_never_stall_the_uplink() {
    let node = Node::start();
    let (_agent, durable) = start_edge(&node);
    assert_eq!(publish_v5(durable, "heavy", 70, 50, 5_000).await, 70);
    assert_eq!(
        publish_v5(durable, "many", 1, 1_100, 1).await,
        0,
        "1,100 properties refused"
    );
    assert_eq!(
        publish_v5(durable, "huge", 1, 100, 4_000).await,
        0,
        "over max_event refused"
    );
    assert_eq!(publish_v5(durable, "after", 30, 1, 10).await, 30);
    // Every acknowledged event reaches a consumer: the uplink never stalled.
    let (ok, lines, err) = node.read_all(100, "60s").await;
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 100);
    node.still_serves_good_clients(100, 200).await;
}

/// The review's H1, repro 2: events near the node's maximum size, more of them than one
/// frame to a consumer could hold. Deliveries are bounded in bytes by what the consumer
/// accepts (its hello) and the node reads its log in byte-bounded rounds, so `telemesh sub`
/// gets all 80 MiB in frames it accepts (before, one 80 MiB frame: refused by the client,
/// which reconnected at the same cursor for ever) and the node's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_large_events_fit_the_consumers_frame_limit() {
    let node = Node::start();
    let conn = node.dial("gw-2").await;
    let (mut send, mut reader, welcome) = hello(&conn, "gw-2", Role::Uplink).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    for b in 0..8u64 {
        let mut evs = events(b * 10 + 1..=b * 10 + 10, "site/big");
        for e in &mut evs {
            e.payload = vec![b'x'; 1_000_000];
        }
        let batch = Frame::Batch {
            id: b,
            origin: "gw-2".into(),
            epoch: 9,
            events: evs,
            gaps: vec![],
        };
        write_frame(&mut send, &batch).await.unwrap();
        match reader.next().await.unwrap().unwrap() {
            Frame::Ack { id, rejected } => assert!(id == b && rejected.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    let (ok, lines, err) = node.read_all(80, "60s").await;
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 80);
    let rss = node.rss_anon_mib();
    eprintln!("node RssAnon after delivering 80 MiB: {rss} MiB");
    assert!(rss < NODE_RSS_ANON_MIB, "{rss} MiB");
    node.still_serves_good_clients(100, 180).await;
}

/// The HTTP side (review M10): clients that connect and send nothing (slowloris) hold a
/// slot for at most the header timeout (5 s); past 64 connections a new one is closed at
/// once; scrapes work again as soon as slots free, and a flood of scrapes reads the
/// completeness view once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_bounds_idle_clients_and_keeps_answering() {
    use tokio::io::AsyncReadExt;
    let node = Node::start();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(node.http).await.unwrap());
    }
    // The 65th is closed as soon as it is accepted.
    let mut over = tokio::net::TcpStream::connect(node.http).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut b))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection over the cap is closed");
    // The idle ones are closed after the header timeout.
    let t = std::time::Instant::now();
    for mut s in idle {
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b))
            .await
            .expect("an idle client is dropped")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Scrapes in a burst are all answered.
    for _ in 0..50 {
        let text = http_get(node.http, "/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    node.still_serves_good_clients(100, 100).await;
}

/// The review's H2: under `overflow = "block"` with the uplink down and the buffer full,
/// one client streams QoS 0 PUBLISHes of 200 KiB. Appends waiting for room (queued or
/// parked) are bounded in bytes (`buffer.queue_bytes`), so the durable port stops reading
/// the socket — TCP backpressure — and the agent's memory stays bounded; it keeps
/// answering new connections and `/healthz` (a full buffer is policy, not ill health).
#[test]
fn a_flood_into_a_full_blocking_buffer_is_pushed_back_not_held() {
    use std::io::Write;
    let (_dir, agent, durable, http) = durable_agent(
        "max_packet = \"1MiB\"",
        "max_bytes = \"2MiB\"\nmap_size = \"16MiB\"\noverflow = \"block\"\nqueue_bytes = \"4MiB\"",
    );
    let mut s = telemesh_testkit::mqtt::connect_raw(durable, "flood");
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut body = Vec::new();
    telemesh_testkit::mqtt::string(b"site/flood", &mut body);
    body.extend_from_slice(&vec![b'x'; 200 * 1024]);
    let publish = telemesh_testkit::mqtt::packet(0x30, &body);
    let mut sent = 0usize;
    while sent < 400 << 20 {
        match s.write_all(&publish) {
            Ok(()) => sent += publish.len(),
            Err(_) => break,
        }
    }
    let rss = rss_anon_kib(agent.id()) / 1024;
    eprintln!(
        "the port stopped reading after {} MiB; agent RssAnon {rss} MiB",
        sent >> 20
    );
    assert!(
        sent < 64 << 20,
        "the port kept reading: {} MiB taken",
        sent >> 20
    );
    assert!(rss < 96, "agent RssAnon {rss} MiB");
    // The agent still answers: a new connection gets its CONNACK, /healthz is 200.
    let _other = telemesh_testkit::mqtt::connect_raw(durable, "other");
    let health = http_get_blocking(http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// An edge agent process with only a durable port (no uplink) and `/metrics`; `durable` and
/// `buffer` are further lines of those sections.
fn durable_agent(
    durable_keys: &str,
    buffer_keys: &str,
) -> (tempfile::TempDir, Process, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let durable: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nid = \"gw-hostile\"\ndata_dir = \"{d}\"\n\
             [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
             [durable]\nlisten = \"{durable}\"\n{durable_keys}\n\
             [buffer]\nsync = \"none\"\n{buffer_keys}\n\
             [metrics]\nlisten = \"{http}\"\n",
            d = dir.path().join("data").display(),
            mqtt = free_port(),
        ),
    )
    .unwrap();
    let agent = spawn_agent(&path);
    wait_listening(durable);
    (dir, agent, durable, http)
}

/// The review's M5: a client that sets keep-alive 0 ("off") and then stays silent no longer
/// holds its connection slot for ever: it is closed after `durable.idle_timeout`; a client
/// that keeps talking is not.
#[test]
fn a_silent_keep_alive_zero_client_is_closed_after_the_idle_timeout() {
    use std::io::Write;
    use telemesh_testkit::mqtt::{closed_by_server, connect_packet, open, publish_qos, read_n};
    let (_dir, _agent, durable, http) = durable_agent(
        "idle_timeout = \"700ms\"",
        "max_bytes = \"8MiB\"\nmap_size = \"32MiB\"",
    );
    let (mut silent, ack) = open(durable, &connect_packet(4, "silent", true, 0, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    let (mut talker, ack) = open(durable, &connect_packet(4, "talker", true, 0, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    // The talker speaks while the silent one is watched (100 ms reads) until it is closed.
    let t = std::time::Instant::now();
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pkid = 0u16;
    loop {
        pkid += 1;
        talker
            .write_all(&publish_qos(4, 1, false, pkid, b"site/talk", b"hi"))
            .unwrap();
        assert_eq!(read_n(&mut talker, 4), [0x40, 2, 0, pkid as u8]);
        if closed_by_server(&mut silent) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the silent client was never closed"
        );
    }
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "not before its idle limit"
    );
    // The talker outlived the silent one's limit and is still served.
    pkid += 1;
    talker
        .write_all(&publish_qos(4, 1, false, pkid, b"site/talk", b"hi"))
        .unwrap();
    assert_eq!(read_n(&mut talker, 4), [0x40, 2, 0, pkid as u8]);
    let health = http_get_blocking(http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// The review's M4: a client publishes QoS 2 and never sends PUBREL, so its exactly-once
/// state (stored with the events) would grow without bound. Past 4,096 packet ids stored and
/// not released the port closes the connection (0x93 on MQTT 5), on this and later
/// connections of the same client id, until PUBRELs free places; other clients are served.
#[test]
fn qos2_state_of_one_client_is_capped() {
    use std::io::Write;
    use telemesh_testkit::mqtt::{closed_by_server, connect_packet, open, publish_qos, read_n};
    let (_dir, _agent, durable, http) =
        durable_agent("", "max_bytes = \"64MiB\"\nmap_size = \"256MiB\"");
    let (mut s, ack) = open(durable, &connect_packet(4, "hoarder", false, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    for chunk in (1..=4_096u16).collect::<Vec<_>>().chunks(512) {
        for &pkid in chunk {
            s.write_all(&publish_qos(4, 2, false, pkid, b"site/q2", b"x"))
                .unwrap();
        }
        for &pkid in chunk {
            assert_eq!(read_n(&mut s, 4), [0x50, 2, (pkid >> 8) as u8, pkid as u8]);
        }
    }
    // The 4,097th is refused: the connection closes without a PUBREC.
    s.write_all(&publish_qos(4, 2, false, 5_000, b"site/q2", b"x"))
        .unwrap();
    assert!(closed_by_server(&mut s));
    // A later connection of the same client id is held to the same state.
    let (mut s, ack) = open(durable, &connect_packet(4, "hoarder", false, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 1, 0], "session present");
    s.write_all(&publish_qos(4, 2, false, 5_001, b"site/q2", b"x"))
        .unwrap();
    assert!(closed_by_server(&mut s));
    // PUBREL frees a place: then one more is taken.
    let (mut s, _) = open(durable, &connect_packet(4, "hoarder", false, 30, None), 4);
    s.write_all(&telemesh_testkit::mqtt::packet(0x62, &[0, 1]))
        .unwrap();
    assert_eq!(read_n(&mut s, 4), [0x70, 2, 0, 1], "PUBCOMP");
    s.write_all(&publish_qos(4, 2, false, 5_002, b"site/q2", b"x"))
        .unwrap();
    assert_eq!(
        read_n(&mut s, 4),
        [0x50, 2, (5_002u16 >> 8) as u8, 5_002u16 as u8]
    );
    // Others are served.
    let (mut other, ack) = open(durable, &connect_packet(4, "other", true, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    other
        .write_all(&publish_qos(4, 2, false, 1, b"site/q2", b"y"))
        .unwrap();
    assert_eq!(read_n(&mut other, 4), [0x50, 2, 0, 1]);
    let health = http_get_blocking(http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// `node.max_connections` holds before the handshake: with a cap of 2 a third connection is
/// refused (whoever asks), the two keep working, and a new one is admitted once one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_cap_are_refused_before_the_handshake() {
    let node = Node::start_with("max_connections = 2");
    let a = node.dial("gw-1").await;
    let b = node.dial("analytics").await;
    let refused = dial(
        &node.certs(),
        "gw-2",
        &node.certs().join("ca.pem"),
        node.addr,
        "node-a",
    )
    .await;
    assert!(refused.is_err(), "a third connection is refused");
    let (_send, _reader, welcome) = hello(&a, "gw-1", Role::Uplink).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    let (_send, _reader, welcome) = hello(&b, "analytics", Role::Consumer).await;
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    a.close(0u32.into(), b"bye");
    b.close(0u32.into(), b"bye");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let again = dial(
            &node.certs(),
            "gw-2",
            &node.certs().join("ca.pem"),
            node.addr,
            "node-a",
        )
        .await;
        if again.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < until, "never admitted again");
    }
}
