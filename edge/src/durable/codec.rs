//! MQTT 3.1.1 and 5 packets for the durable port, on rumqttc's packet codecs (`mqttbytes`),
//! whose packet fields are public — rumqttd's own codec hides a PUBLISH's QoS and packet id,
//! which a server needs. Each version's packets are mapped to the few the port handles.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::Error as V5Error;
use telemesh_proto::Headers;

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A client's will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Where it goes.
    pub topic: String,
    /// What it says.
    pub payload: Vec<u8>,
}

/// A packet from a client, as the port sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    /// CONNECT.
    Connect {
        /// The client id (may be empty).
        client_id: String,
        /// Clean session (3.1.1) or clean start (5).
        clean: bool,
        /// Keep-alive in seconds; 0 turns it off.
        keep_alive: u16,
        /// The will.
        will: Option<Will>,
        /// Username and password.
        login: Option<(String, String)>,
    },
    /// PUBLISH.
    Publish {
        /// 0, 1 or 2.
        qos: u8,
        /// A resend.
        dup: bool,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Topic name (empty with an MQTT 5 topic alias, which this port does not grant).
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// MQTT 5 user properties and content type.
        headers: Option<Box<Headers>>,
    },
    /// PUBREL.
    PubRel(u16),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
    /// SUBSCRIBE with its packet id and number of filters.
    Subscribe(u16, usize),
    /// UNSUBSCRIBE with its packet id and number of filters.
    Unsubscribe(u16, usize),
    /// A packet a publishing client must not send to a server (CONNACK, SUBACK…).
    Unexpected(&'static str),
}

/// Why bytes are not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The packet is larger than the port's maximum.
    #[error("packet of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The bytes are not a valid packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The CONNECT names a protocol level this port does not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

/// A CONNACK result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    /// Accepted.
    Accepted,
    /// The client id is not allowed.
    BadClientId,
    /// Wrong username or password.
    BadLogin,
    /// The port is at its connection limit.
    Unavailable,
}

/// Why the port closes a connection (sent as DISCONNECT to MQTT 5 clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Malformed packet (0x81).
    Malformed,
    /// Protocol error (0x82).
    ProtocolError,
    /// Topic name invalid (0x90).
    TopicInvalid,
    /// Packet too large (0x95).
    TooLarge,
    /// Keep-alive timeout (0x8D).
    KeepAlive,
    /// Another connection took the session (0x8E).
    TakenOver,
    /// Too many QoS 2 messages received and not released (0x93, receive maximum exceeded).
    ReceiveMaximum,
    /// The buffer cannot store (0x80 unspecified, or 0x97 quota exceeded).
    Storage,
    /// The agent is shutting down (0x8B).
    ShuttingDown,
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// CONNACK.
    ConnAck(ConnCode, bool),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC.
    PubRec(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK refusing every filter (this port is for publishers).
    SubAckRefused(u16, usize),
    /// UNSUBACK.
    UnsubAck(u16, usize),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only; for 3.1.1 the port just closes).
    Disconnect(CloseReason),
}

/// Reads the protocol level of a CONNECT at the start of `buf`, if enough bytes are there.
pub fn connect_level(buf: &[u8], max: usize) -> Result<Option<u8>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::Malformed(
            "the first packet is not CONNECT".into(),
        ));
    }
    // The remaining length: 1 to 4 bytes of 7 bits each.
    let mut len = 0usize;
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(CodecError::Malformed("malformed remaining length".into()));
        }
    }
    if len > max {
        return Err(CodecError::TooLarge(len));
    }
    // Then the protocol name ("MQTT": 2 + 4 bytes), then the level.
    Ok(buf.get(at + 6).copied())
}

fn map_v4_err(e: rumqttc::mqttbytes::Error) -> CodecError {
    match e {
        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n) => CodecError::TooLarge(n),
        rumqttc::mqttbytes::Error::InvalidProtocolLevel(l) => CodecError::UnsupportedLevel(l),
        other => CodecError::Malformed(other.to_string()),
    }
}

fn map_v5_err(e: V5Error) -> CodecError {
    match e {
        V5Error::PayloadSizeLimitExceeded { pkt_size, .. } => CodecError::TooLarge(pkt_size),
        V5Error::InvalidProtocolLevel(l) => CodecError::UnsupportedLevel(l),
        other => CodecError::Malformed(other.to_string()),
    }
}

fn qos_num(q: rumqttc::QoS) -> u8 {
    q as u8
}

fn qos5_num(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

/// Takes one packet from the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn read(version: Version, buf: &mut BytesMut, max: usize) -> Result<Option<In>, CodecError> {
    match version {
        Version::V4 => match v4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(map_v4_err(e)),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max as u32)) {
            Ok(p) => from_v5(p).map(Some),
            Err(V5Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(map_v5_err(e)),
        },
    }
}

fn from_v4(p: v4::Packet) -> In {
    match p {
        v4::Packet::Connect(c) => In::Connect {
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message.to_vec(),
            }),
            login: c.login.map(|l| (l.username, l.password)),
        },
        v4::Packet::Publish(p) => In::Publish {
            qos: qos_num(p.qos),
            dup: p.dup,
            pkid: p.pkid,
            topic: p.topic,
            payload: p.payload.to_vec(),
            headers: None,
        },
        v4::Packet::PubRel(r) => In::PubRel(r.pkid),
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect,
        v4::Packet::Subscribe(s) => In::Subscribe(s.pkid, s.filters.len()),
        v4::Packet::Unsubscribe(u) => In::Unsubscribe(u.pkid, u.topics.len()),
        v4::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v4::Packet::PubAck(_) => In::Unexpected("PUBACK"),
        v4::Packet::PubRec(_) => In::Unexpected("PUBREC"),
        v4::Packet::PubComp(_) => In::Unexpected("PUBCOMP"),
        v4::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => In::Unexpected("PINGRESP"),
    }
}

fn from_v5(p: v5::Packet) -> Result<In, CodecError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => In::Connect {
            client_id: c.client_id,
            clean: c.clean_start,
            keep_alive: c.keep_alive,
            will: will.map(|w| Will {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                payload: w.message.to_vec(),
            }),
            login: login.map(|l| (l.username, l.password)),
        },
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?;
            let headers = p.properties.and_then(|props| {
                let traceparent = props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                    .map(|(_, v)| v.clone());
                let h = Headers {
                    user_properties: props.user_properties,
                    content_type: props.content_type,
                    traceparent,
                };
                (!h.is_empty()).then(|| Box::new(h))
            });
            In::Publish {
                qos: qos5_num(p.qos),
                dup: p.dup,
                pkid: p.pkid,
                topic,
                payload: p.payload.to_vec(),
                headers,
            }
        }
        v5::Packet::PubRel(r) => In::PubRel(r.pkid),
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(_) => In::Disconnect,
        v5::Packet::Subscribe(s) => In::Subscribe(s.pkid, s.filters.len()),
        v5::Packet::Unsubscribe(u) => In::Unsubscribe(u.pkid, u.filters.len()),
        v5::Packet::Auth(_) => In::Unexpected("AUTH"),
        v5::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v5::Packet::PubAck(_) => In::Unexpected("PUBACK"),
        v5::Packet::PubRec(_) => In::Unexpected("PUBREC"),
        v5::Packet::PubComp(_) => In::Unexpected("PUBCOMP"),
        v5::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => In::Unexpected("PINGRESP"),
    })
}

/// Appends `out` encoded for `version` to `buf`.
pub fn write(version: Version, out: &Out, buf: &mut BytesMut, receive_max: u16, max_packet: u32) {
    let r = match version {
        Version::V4 => write_v4(out, buf),
        Version::V5 => write_v5(out, buf, receive_max, max_packet),
    };
    // Encoding our own well-formed acks cannot fail; a failure would be a bug, so log it.
    if let Err(e) = r {
        tracing::error!(error = %e, ?out, "cannot encode an MQTT packet");
    }
}

fn write_v4(out: &Out, buf: &mut BytesMut) -> Result<usize, String> {
    let e = |e: rumqttc::mqttbytes::Error| e.to_string();
    match out {
        Out::ConnAck(code, present) => {
            let code = match code {
                ConnCode::Accepted => v4::ConnectReturnCode::Success,
                ConnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnCode::BadLogin => v4::ConnectReturnCode::BadUserNamePassword,
                ConnCode::Unavailable => v4::ConnectReturnCode::ServiceUnavailable,
            };
            v4::ConnAck::new(code, *present).write(buf).map_err(e)
        }
        Out::PubAck(p) => v4::PubAck::new(*p).write(buf).map_err(e),
        Out::PubRec(p) => v4::PubRec::new(*p).write(buf).map_err(e),
        Out::PubComp(p) => v4::PubComp::new(*p).write(buf).map_err(e),
        Out::SubAckRefused(p, n) => v4::SubAck::new(*p, vec![v4::SubscribeReasonCode::Failure; *n])
            .write(buf)
            .map_err(e),
        Out::UnsubAck(p, _) => v4::UnsubAck::new(*p).write(buf).map_err(e),
        Out::PingResp => v4::PingResp.write(buf).map_err(e),
        Out::Disconnect(_) => Ok(0),
    }
}

fn write_v5(
    out: &Out,
    buf: &mut BytesMut,
    receive_max: u16,
    max_packet: u32,
) -> Result<usize, String> {
    let e = |e: V5Error| e.to_string();
    match out {
        Out::ConnAck(code, present) => {
            let code = match code {
                ConnCode::Accepted => v5::ConnectReturnCode::Success,
                ConnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnCode::BadLogin => v5::ConnectReturnCode::BadUserNamePassword,
                ConnCode::Unavailable => v5::ConnectReturnCode::ServerUnavailable,
            };
            let properties = v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(receive_max),
                max_qos: None,
                retain_available: Some(0),
                max_packet_size: Some(max_packet),
                assigned_client_identifier: None,
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            v5::ConnAck {
                session_present: *present,
                code,
                properties: Some(properties),
            }
            .write(buf)
            .map_err(e)
        }
        Out::PubAck(p) => v5::PubAck::new(*p, None).write(buf).map_err(e),
        Out::PubRec(p) => v5::PubRec::new(*p, None).write(buf).map_err(e),
        Out::PubComp(p) => v5::PubComp::new(*p, None).write(buf).map_err(e),
        Out::SubAckRefused(p, n) => v5::SubAck {
            pkid: *p,
            return_codes: vec![v5::SubscribeReasonCode::ImplementationSpecific; *n],
            properties: None,
        }
        .write(buf)
        .map_err(e),
        Out::UnsubAck(p, n) => v5::UnsubAck {
            pkid: *p,
            reasons: vec![v5::UnsubAckReason::Success; *n],
            properties: None,
        }
        .write(buf)
        .map_err(e),
        Out::PingResp => v5::PingResp::write(buf).map_err(e),
        Out::Disconnect(reason) => {
            let reason_code = match reason {
                CloseReason::Malformed => v5::DisconnectReasonCode::MalformedPacket,
                CloseReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                CloseReason::TopicInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                CloseReason::TooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                CloseReason::KeepAlive => v5::DisconnectReasonCode::KeepAliveTimeout,
                CloseReason::TakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                CloseReason::ReceiveMaximum => v5::DisconnectReasonCode::ReceiveMaximumExceeded,
                CloseReason::Storage => v5::DisconnectReasonCode::UnspecifiedError,
                CloseReason::ShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
            };
            v5::Disconnect {
                reason_code,
                properties: None,
            }
            .write(buf)
            .map_err(e)
        }
    }
}
