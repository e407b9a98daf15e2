//! The broker port's options with real clients: TLS (a certificate made for the test),
//! username/password, and MQTT 5 on its own port with user properties and content type
//! carried into the buffer as headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{TlsConfiguration, Transport};
use telemesh_edge::{Agent, EdgeConfig};
use telemesh_testkit::{free_port, wait_listening};

fn tls_client(ca_der: Vec<u8>) -> Transport {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
}

#[test]
fn tls_users_and_mqtt5_headers() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("gw.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("gw.key"), cert.signing_key.serialize_pem()).unwrap();
    let ca_der = cert.cert.der().to_vec();
    let (v4, v5) = (free_port(), free_port());
    let cfg = EdgeConfig::from_toml(&format!(
        r#"
[agent]
id = "gw-tls"
data_dir = "{d}/data"
[mqtt]
listen = "127.0.0.1:{v4}"
listen_v5 = "127.0.0.1:{v5}"
tls = {{ cert = "{d}/gw.pem", key = "{d}/gw.key" }}
users = {{ "dev1" = "secret" }}
[buffer]
max_bytes = "64MiB"
map_size = "128MiB"
"#,
        d = dir.path().display()
    ))
    .unwrap();
    let agent = Agent::start(&cfg).unwrap();
    wait_listening(([127, 0, 0, 1], v4).into());
    wait_listening(([127, 0, 0, 1], v5).into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    rt.block_on(async {
        // MQTT 3.1.1 over TLS with the right password: stored.
        let mut o = rumqttc::MqttOptions::new("dev-tls", "localhost", v4);
        o.set_credentials("dev1", "secret");
        o.set_transport(tls_client(ca_der.clone()));
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish("site/tls", rumqttc::QoS::AtLeastOnce, false, "over-tls")
            .await
            .unwrap();
        loop {
            match ev.poll().await.unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => break,
                _ => continue,
            }
        }

        // A wrong password is refused at CONNECT.
        let mut o = rumqttc::MqttOptions::new("dev-bad", "localhost", v4);
        o.set_credentials("dev1", "wrong");
        o.set_transport(tls_client(ca_der.clone()));
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish(
            "site/bad",
            rumqttc::QoS::AtLeastOnce,
            false,
            "must-not-land",
        )
        .await
        .unwrap();
        let refused = loop {
            match ev.poll().await {
                Err(e) => break e.to_string(),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    panic!("a wrong password was accepted")
                }
                Ok(_) => continue,
            }
        };
        assert!(!refused.is_empty());

        // MQTT 5 on its own port, with user properties, a content type and a traceparent.
        let mut o = rumqttc::v5::MqttOptions::new("dev-v5", "localhost", v5);
        o.set_credentials("dev1", "secret");
        o.set_transport(tls_client(ca_der.clone()));
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: vec![
                ("unit".into(), "C".into()),
                (
                    "traceparent".into(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                ),
            ],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        c.publish_with_properties(
            "site/v5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "21.5",
            props,
        )
        .await
        .unwrap();
        loop {
            match ev.poll().await.unwrap() {
                rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)) => break,
                _ => continue,
            }
        }
    });

    let reader = agent.reader();
    let until = Instant::now() + Duration::from_secs(10);
    while reader.state().unwrap().events < 2 {
        assert!(Instant::now() < until, "events never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let events = reader.read(None, usize::MAX).unwrap();
    assert_eq!(events.len(), 2, "nothing from the refused client");
    assert_eq!(events[0].event.topic, "site/tls");
    assert_eq!(events[0].event.payload, b"over-tls");
    let v5 = &events[1].event;
    assert_eq!(v5.topic, "site/v5");
    let h = v5
        .headers
        .as_ref()
        .expect("MQTT 5 properties become headers");
    assert_eq!(h.content_type.as_deref(), Some("text/plain"));
    assert_eq!(h.user_properties[0], ("unit".to_string(), "C".to_string()));
    assert_eq!(
        h.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    agent.shutdown().unwrap();
}
