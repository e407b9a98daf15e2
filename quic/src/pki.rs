//! Certificates for a mesh (`telemesh certs`): one CA, and certificates for nodes, edge agents
//! and clients signed by it, written as `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME.key`.
//!
//! - Every certificate's name is its first DNS SAN and its common name: that is the identity
//!   a node's `[[access]]` rules name.
//! - Node certificates carry both server and client authentication (nodes dial out to peers)
//!   and also name `localhost`, `127.0.0.1` and `::1`, so a mesh on one machine needs no DNS.
//! - Edge and client certificates carry client authentication only.
//! - The CA key is written as `DIR/ca.key` (mode 0600) so more certificates can be issued later.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A mesh node: server and client, plus loopback names.
    Node,
    /// An edge agent (uplink client).
    Edge,
    /// A cloud client (consumer).
    Client,
}

/// Errors making certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters.
    #[error("certificate for {name}: {source}")]
    Rcgen {
        /// Which certificate.
        name: String,
        /// Why.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name that cannot be a DNS name.
    #[error("invalid certificate name {0:?}: use letters, digits, '-' and '.'")]
    BadName(String),
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= telemesh_proto::MAX_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && name != "ca";
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// A CA that can issue certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// An issued certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl Authority {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Authority, PkiError> {
        let err = |source| PkiError::Rcgen {
            name: name.to_owned(),
            source,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        let key_pem = key.serialize_pem();
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM.
    /// Loads an existing CA from its certificate and key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let err = |source| PkiError::Rcgen {
            name: "ca".to_owned(),
            source,
        };
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        Ok(Authority {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `name`.
    pub fn issue(&self, name: &str, kind: Kind) -> Result<Issued, PkiError> {
        self.issue_with(name, kind, |_| {})
    }

    /// Issues a certificate for `name`, letting `adjust` change its parameters (validity, for
    /// tests of expired certificates).
    pub fn issue_with(
        &self,
        name: &str,
        kind: Kind,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, PkiError> {
        check_name(name)?;
        let err = |source| PkiError::Rcgen {
            name: name.to_owned(),
            source,
        };
        let mut sans = vec![name.to_owned()];
        if kind == Kind::Node {
            sans.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        let mut params = CertificateParams::new(sans).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match kind {
            Kind::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Kind::Edge | Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        adjust(&mut params);
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write(path: PathBuf, text: &str, secret: bool) -> Result<(), PkiError> {
    std::fs::write(&path, text).map_err(|source| PkiError::Io {
        path: path.clone(),
        source,
    })?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| PkiError::Io { path, source })?;
    }
    Ok(())
}

/// Writes a CA and the named certificates into `dir` (created if needed); returns the paths
/// written.
pub fn write_mesh(
    dir: &Path,
    nodes: &[String],
    edges: &[String],
    clients: &[String],
) -> Result<Vec<PathBuf>, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    // A directory that already holds a CA gets more certificates from the same CA, so a
    // mesh can grow site by site.
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut written = Vec::new();
    let ca = if ca_pem.exists() && ca_key.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| PkiError::Io {
                path: p.to_owned(),
                source,
            })
        };
        Authority::load(&read(&ca_pem)?, &read(&ca_key)?)?
    } else {
        let ca = Authority::new("telemesh CA")?;
        write(ca_pem.clone(), ca.cert_pem(), false)?;
        write(ca_key.clone(), &ca.key_pem, true)?;
        written.extend([ca_pem, ca_key]);
        ca
    };
    let all = nodes
        .iter()
        .map(|n| (n, Kind::Node))
        .chain(edges.iter().map(|n| (n, Kind::Edge)))
        .chain(clients.iter().map(|n| (n, Kind::Client)));
    for (name, kind) in all {
        let issued = ca.issue(name, kind)?;
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        write(cert.clone(), &issued.cert_pem, false)?;
        write(key.clone(), &issued.key_pem, true)?;
        written.extend([cert, key]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn verify_server(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        verifier
            .verify_server_cert(
                &cert,
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn node_certificates_verify_for_their_name_and_loopback() {
        let ca = Authority::new("test CA").unwrap();
        let node = ca.issue("node-a", Kind::Node).unwrap();
        for name in ["node-a", "localhost", "127.0.0.1", "::1"] {
            verify_server(ca.cert_pem(), &node.cert_pem, name).unwrap();
        }
        assert!(verify_server(ca.cert_pem(), &node.cert_pem, "node-b").is_err());
        // Another CA's certificate is not trusted.
        let other = Authority::new("other CA").unwrap();
        assert!(verify_server(other.cert_pem(), &node.cert_pem, "node-a").is_err());
        // An edge certificate is not a server certificate.
        let edge = ca.issue("gw-1", Kind::Edge).unwrap();
        assert!(verify_server(ca.cert_pem(), &edge.cert_pem, "gw-1").is_err());
    }

    #[test]
    fn write_mesh_writes_every_file_and_refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_mesh(
            dir.path(),
            &["node-a".into()],
            &["site-a-gw-1".into()],
            &["analytics".into()],
        )
        .unwrap();
        assert_eq!(files.len(), 8);
        for f in &files {
            assert!(f.exists(), "{}", f.display());
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("site-a-gw-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_mesh(dir.path(), &["bad/name".into()], &[], &[]).unwrap_err();
        assert!(
            err.to_string().contains("invalid certificate name"),
            "{err}"
        );
    }

    #[test]
    fn a_second_run_issues_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        write_mesh(dir.path(), &["node-a".into()], &[], &[]).unwrap();
        let ca_before = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        let files = write_mesh(dir.path(), &["node-b".into()], &[], &[]).unwrap();
        assert_eq!(
            files.len(),
            2,
            "only the new certificate and key: {files:?}"
        );
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        assert_eq!(ca, ca_before, "the CA is kept");
        let b = std::fs::read_to_string(dir.path().join("node-b.pem")).unwrap();
        verify_server(&ca, &b, "node-b").unwrap();
    }
}
