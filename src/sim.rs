//! `telemesh sim`: a device simulator and MQTT load generator that works against any broker.
//!
//! N devices, each its own MQTT connection, publish `count / N` messages at `rate / N` per
//! second (flat out when the rate is 0) to `topic` with `{device}` replaced by the device
//! number. Each payload starts with the send time (µs since the Unix epoch, u64 LE) and the
//! message number (u64 LE), padded to `payload_bytes`, so a consumer can measure end-to-end
//! latency. The report gives published and acknowledged counts and rates and the
//! acknowledgement latency (PUBACK for QoS 1, PUBCOMP for QoS 2), measured from the moment
//! the client wrote the PUBLISH.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinSet;

use telemesh_edge::buffer::now_us;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The broker.
    pub mqtt: SocketAddr,
    /// Devices (connections).
    pub devices: usize,
    /// Messages per second, in total; 0 is as fast as the broker takes them.
    pub rate: u64,
    /// Messages in total.
    pub count: u64,
    /// Payload size (at least 16: time and number).
    pub payload_bytes: usize,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Topic pattern; `{device}` becomes the device number.
    pub topic: String,
    /// Publishes in flight per device.
    pub inflight: u16,
    /// How long to wait for outstanding acknowledgements at the end.
    pub drain_timeout: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            mqtt: SocketAddr::from(([127, 0, 0, 1], 1883)),
            devices: 10,
            rate: 0,
            count: 100_000,
            payload_bytes: 100,
            qos: 1,
            topic: "sim/dev{device}/telemetry".into(),
            inflight: 100,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Messages handed to the broker.
    pub published: u64,
    /// Messages acknowledged (for QoS 0: written).
    pub acked: u64,
    /// From the first connect to the last acknowledgement.
    pub elapsed: Duration,
    /// Acknowledgement latency in µs: p50, p99, max.
    pub ack_latency_us: (u64, u64, u64),
    /// Devices that failed, with why.
    pub errors: Vec<String>,
}

impl SimReport {
    /// Acknowledged messages per second.
    pub fn acked_rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p50, p99, max) = self.ack_latency_us;
        write!(
            f,
            "published {} acked {} in {:.3}s: {:.0} acked/s, ack latency p50 {}us p99 {}us max {}us, {} device errors",
            self.published,
            self.acked,
            self.elapsed.as_secs_f64(),
            self.acked_rate(),
            p50,
            p99,
            max,
            self.errors.len()
        )
    }
}

struct DeviceResult {
    published: u64,
    acked: u64,
    latency: Histogram<u64>,
    error: Option<String>,
}

/// Builds a payload of `len` bytes: send time, message number, padding.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(16));
    p.extend_from_slice(&now_us().to_le_bytes());
    p.extend_from_slice(&n.to_le_bytes());
    p.resize(len.max(16), b'.');
    p
}

/// Runs the simulation to its end.
pub async fn run(opts: SimOptions) -> SimReport {
    let devices = opts.devices.max(1);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for d in 0..devices {
        let share =
            opts.count / devices as u64 + u64::from((d as u64) < opts.count % devices as u64);
        tasks.spawn(device(d, share, opts.clone()));
    }
    let mut latency = Histogram::<u64>::new(3).expect("histogram bounds");
    let (mut published, mut acked, mut errors) = (0, 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(r) => {
                published += r.published;
                acked += r.acked;
                let _ = latency.add(&r.latency);
                errors.extend(r.error);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    SimReport {
        published,
        acked,
        elapsed: started.elapsed(),
        ack_latency_us: (
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.max(),
        ),
        errors,
    }
}

async fn device(d: usize, count: u64, opts: SimOptions) -> DeviceResult {
    let qos = match opts.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let mut mqtt = MqttOptions::new(
        format!("telemesh-sim-{}-{d}", std::process::id()),
        opts.mqtt.ip().to_string(),
        opts.mqtt.port(),
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_inflight(opts.inflight.max(1));
    mqtt.set_max_packet_size(opts.payload_bytes + 4096, opts.payload_bytes + 4096);
    let (client, mut events) = AsyncClient::new(mqtt, usize::from(opts.inflight.max(1)) * 2);
    let topic = opts.topic.replace("{device}", &d.to_string());
    let per_device_rate = opts.rate as f64 / opts.devices.max(1) as f64;
    let payload_bytes = opts.payload_bytes;
    let producer = tokio::spawn(async move {
        let mut ticker = (per_device_rate > 0.0).then(|| {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / per_device_rate));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let mut sent = 0;
        for n in 0..count {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            if client
                .publish(topic.clone(), qos, false, payload(n, payload_bytes))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        (client, sent)
    });
    let mut result = DeviceResult {
        published: 0,
        acked: 0,
        latency: Histogram::new(3).expect("histogram bounds"),
        error: None,
    };
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65_536];
    let mut drain_deadline: Option<Instant> = None;
    while result.acked < count {
        if producer.is_finished() && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + opts.drain_timeout);
        }
        let poll = events.poll();
        let ev = match drain_deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), poll).await {
                Ok(ev) => ev,
                Err(_) => {
                    result.error = Some(format!("device {d}: acknowledgements timed out"));
                    break;
                }
            },
            None => poll.await,
        };
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                result.published += 1;
                if qos == QoS::AtMostOnce {
                    result.acked += 1;
                } else {
                    sent_at[usize::from(pkid)] = Some(Instant::now());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) if qos == QoS::AtLeastOnce => {
                ack(&mut result, &mut sent_at, a.pkid);
            }
            Ok(Event::Incoming(Packet::PubComp(c))) if qos == QoS::ExactlyOnce => {
                ack(&mut result, &mut sent_at, c.pkid);
            }
            Ok(_) => {}
            Err(e) => {
                result.error = Some(format!("device {d}: {e}"));
                break;
            }
        }
    }
    producer.abort();
    result
}

fn ack(result: &mut DeviceResult, sent_at: &mut [Option<Instant>], pkid: u16) {
    result.acked += 1;
    if let Some(t) = sent_at[usize::from(pkid)].take() {
        let _ = result.latency.record(t.elapsed().as_micros() as u64);
    }
}
