//! Every sample config in deploy/ parses (unknown keys would be errors) and validates, with
//! the certificate directory pointed at files that exist.

mod common;

use std::path::{Path, PathBuf};

use common::fake_certs;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_deploy_config_parses_and_validates() {
    let certs = fake_certs();
    let mut all = Vec::new();
    files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut all,
    );
    assert!(all.len() >= 5, "deploy/ holds the sample configs: {all:?}");
    for path in all {
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/etc/telemesh/certs", &certs.path().display().to_string());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match name.as_str() {
            "edge.toml" => {
                telemesh_edge::EdgeConfig::from_toml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            "node.toml" => {
                telemesh_mesh::config::NodeConfig::from_toml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            "client.toml" => {
                let f = certs.path().join("client.toml");
                std::fs::write(&f, &text).unwrap();
                telemesh_client::ClientConfig::load(&f)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            other => panic!("unexpected config {other} in deploy/"),
        }
    }
}
