//! The node side of tests: node.toml for a mesh on 127.0.0.1, and client configs.

use std::path::{Path, PathBuf};

use telemesh_client::ClientConfig;
use telemesh_mesh::config::NodeConfig;

/// A node.toml built for a test: node `id` with its certificate from `certs/` (as
/// [`crate::mesh_certs`] writes them), its data in a directory of the test's, listening on
/// 127.0.0.1, a 64 MiB map unless said otherwise; then `[[access]]`, `[[replicate]]` or any
/// other sections.
#[derive(Debug, Clone)]
pub struct NodeToml {
    id: String,
    certs: PathBuf,
    data_dir: PathBuf,
    listen: String,
    map_size: String,
    node_keys: String,
    sections: String,
}

impl NodeToml {
    /// Node `id`: certificates in `certs`, data in `data_dir`, listening on port 0.
    pub fn new(id: &str, certs: &Path, data_dir: &Path) -> NodeToml {
        NodeToml {
            id: id.to_owned(),
            certs: certs.to_owned(),
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".into(),
            map_size: "64MiB".into(),
            node_keys: String::new(),
            sections: String::new(),
        }
    }

    /// Listens on `addr` (`host:port`).
    pub fn listen(mut self, addr: &str) -> NodeToml {
        self.listen = addr.to_owned();
        self
    }

    /// `node.map_size`.
    pub fn map_size(mut self, size: &str) -> NodeToml {
        self.map_size = size.to_owned();
        self
    }

    /// `node.sync` (`always`, `interval` or `none`).
    pub fn sync(self, mode: &str) -> NodeToml {
        self.node_key(&format!("sync = \"{mode}\""))
    }

    /// Any other `key = value` line of `[node]`.
    pub fn node_key(mut self, line: &str) -> NodeToml {
        self.node_keys.push_str(line);
        self.node_keys.push('\n');
        self
    }

    /// An `[[access]]` entry: `identity`, `role`, and further lines (`publish = [...]`,
    /// `read = [...]`, or nothing).
    pub fn access(self, identity: &str, role: &str, more: &str) -> NodeToml {
        self.section(&format!(
            "[[access]]\nidentity = \"{identity}\"\nrole = \"{role}\"\n{more}"
        ))
    }

    /// Any further section, as TOML text.
    pub fn section(mut self, text: &str) -> NodeToml {
        self.sections.push_str(text);
        if !text.ends_with('\n') {
            self.sections.push('\n');
        }
        self
    }

    /// The TOML text.
    pub fn text(&self) -> String {
        let c = self.certs.display();
        format!(
            "[node]\nid = \"{id}\"\ndata_dir = \"{d}\"\nlisten = \"{listen}\"\n\
             ca = \"{c}/ca.pem\"\ncert = \"{c}/{id}.pem\"\nkey = \"{c}/{id}.key\"\n\
             map_size = \"{map}\"\n{keys}{sections}",
            id = self.id,
            d = self.data_dir.display(),
            listen = self.listen,
            map = self.map_size,
            keys = self.node_keys,
            sections = self.sections,
        )
    }

    /// Parsed and validated.
    pub fn config(&self) -> NodeConfig {
        NodeConfig::from_toml(&self.text()).unwrap()
    }

    /// Written to `path`, for a `telemesh node` process; returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text()).unwrap();
        path.to_owned()
    }
}

/// A client.toml's settings: `identity`'s certificate from `certs/`, the node at `node`
/// verified as `server_name`.
pub fn client_config(certs: &Path, node: &str, server_name: &str, identity: &str) -> ClientConfig {
    ClientConfig {
        node: node.to_owned(),
        server_name: Some(server_name.to_owned()),
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{identity}.pem")),
        key: certs.join(format!("{identity}.key")),
    }
}

/// Writes `client.toml` into `dir` for [`client_config`]'s settings; returns its path.
pub fn write_client_toml(
    dir: &Path,
    certs: &Path,
    node: &str,
    server_name: &str,
    identity: &str,
) -> PathBuf {
    let c = certs.display();
    let path = dir.join(format!("client-{identity}.toml"));
    std::fs::write(
        &path,
        format!(
            "node = \"{node}\"\nserver_name = \"{server_name}\"\nca = \"{c}/ca.pem\"\n\
             cert = \"{c}/{identity}.pem\"\nkey = \"{c}/{identity}.key\"\n"
        ),
    )
    .unwrap();
    path
}
