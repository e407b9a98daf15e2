//! Mutual TLS for every QUIC link of the mesh (ALPN `telemesh/1`, ring only).
//!
//! Identity: a peer is who its certificate's first DNS SAN names (its common name when it
//! has no DNS SAN), after the certificate verified against the mesh CA.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::RootCertStore;
use telemesh_proto::frame::ALPN;

/// Errors loading certificates or building configs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("tls: {0}")]
    Verifier(String),
}

fn pem_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The certificate chain and key of this peer.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads a PEM certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e))?;
        if chain.is_empty() {
            return Err(pem_err(cert, "no certificate in file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        Ok(Identity { chain, key })
    }
}

impl Identity {
    /// The identity the certificate names (first DNS SAN, or common name).
    pub fn name(&self) -> Option<String> {
        self.chain.first().and_then(|c| cert_identity(c))
    }
}

/// Loads the mesh CA certificates.
pub fn load_roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e))? {
        roots
            .add(cert.map_err(|e| pem_err(ca, e))?)
            .map_err(|e| pem_err(ca, e))?;
    }
    if roots.is_empty() {
        return Err(pem_err(ca, "no CA certificate in file"));
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both sides: keep-alive below the idle timeout, bounded
/// stream windows and stream counts.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s is a valid timeout"),
    ));
    // Every telemesh stream is bidirectional: a consumer runs a few subscriptions on one
    // connection, an uplink one stream; nobody may open unidirectional streams.
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((32u32 * 1024 * 1024).into());
    t.send_window(32 * 1024 * 1024);
    Arc::new(t)
}

/// A server config that requires client certificates from the mesh CA.
pub fn server_config(
    roots: Arc<rustls::RootCertStore>,
    id: Identity,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain, id.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    // Handshakes waiting to be accepted, at most (quinn's default is 65,536).
    config.max_incoming(1_024);
    Ok(config)
}

/// A client config presenting `id` and trusting the mesh CA.
pub fn client_config(
    roots: Arc<rustls::RootCertStore>,
    id: Identity,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(id.chain, id.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The identity a certificate names: its first DNS SAN, or its common name.
pub fn cert_identity(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some((*dns).to_owned());
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    cn
}

/// The verified identity of a connection's peer.
pub fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().and_then(|c| cert_identity(c))
}

/// A UDP socket with enlarged buffers (quinn leaves the OS default of about 208 KiB).
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
