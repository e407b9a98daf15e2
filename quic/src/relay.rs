//! A UDP relay that forwards one client's datagrams to a target and back, and can cut the
//! path (drop everything both ways) — how `telemesh demo` and the tests cut a QUIC link
//! without touching either end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// A running relay; its tasks end when the runtime does.
#[derive(Debug, Clone)]
pub struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Relay {
    /// Starts relaying between the returned address and `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(target).await?;
        let relay = Relay {
            addr: front.local_addr()?,
            cut: Arc::default(),
            dropped: Arc::default(),
        };
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (f, b, c, r) = (front.clone(), back.clone(), client.clone(), relay.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                if r.cut.load(Relaxed) {
                    r.dropped.fetch_add(1, Relaxed);
                } else {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        let r = relay.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap_or_else(|p| p.into_inner());
                if r.cut.load(Relaxed) {
                    r.dropped.fetch_add(1, Relaxed);
                } else if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        Ok(relay)
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (true) or heals (false) the path.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Relaxed);
    }

    /// Whether the path is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Relaxed)
    }

    /// Datagrams dropped while cut.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}
