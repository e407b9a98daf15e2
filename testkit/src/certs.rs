//! Certificates for tests.

/// A temporary directory whose `certs/` holds a new mesh CA and certificates for `nodes`,
/// `edges` and `clients` (as `telemesh certs` writes them).
pub fn mesh_certs(nodes: &[&str], edges: &[&str], clients: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let own = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    telemesh_quic::pki::write_mesh(
        &dir.path().join("certs"),
        &own(nodes),
        &own(edges),
        &own(clients),
    )
    .unwrap();
    dir
}

/// Empty files named like the certificates the deploy/ configs name (`/etc/telemesh/certs`),
/// so that those configs validate.
pub fn fake_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "ca",
        "node-a",
        "node-b",
        "site-a-gw-1",
        "site-b-gw-1",
        "analytics",
    ] {
        for ext in ["pem", "key"] {
            std::fs::write(dir.path().join(format!("{name}.{ext}")), "").unwrap();
        }
    }
    dir
}
