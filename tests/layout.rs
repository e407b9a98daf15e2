//! The crate graph ARCHITECTURE.md states, checked against the manifests and Cargo.lock: a
//! role's crate never depends on a sibling role, `proto` has no I/O crate, the client
//! library's whole dependency tree holds no LMDB, HTTP server or node code, and no library
//! crate carries a test-only dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The `[dependencies]` (normal) of the crate in `dir`.
fn deps(dir: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

fn telemesh(deps: &BTreeSet<String>) -> BTreeSet<&str> {
    deps.iter()
        .filter(|d| d.starts_with("telemesh-"))
        .map(String::as_str)
        .collect()
}

#[test]
fn each_crate_depends_only_on_the_crates_below_it() {
    let expect: [(&str, &[&str]); 8] = [
        ("proto", &[]),
        ("quic", &["telemesh-proto"]),
        ("http", &[]),
        ("client", &["telemesh-proto", "telemesh-quic"]),
        ("gateway", &["telemesh-proto", "telemesh-quic"]),
        (
            "mesh",
            &["telemesh-proto", "telemesh-quic", "telemesh-http"],
        ),
        (
            "edge",
            &[
                "telemesh-proto",
                "telemesh-quic",
                "telemesh-gateway",
                "telemesh-http",
            ],
        ),
        (
            ".",
            &[
                "telemesh-proto",
                "telemesh-quic",
                "telemesh-client",
                "telemesh-edge",
                "telemesh-mesh",
            ],
        ),
    ];
    for (dir, want) in expect {
        let got = deps(dir);
        assert_eq!(
            telemesh(&got),
            want.iter().copied().collect::<BTreeSet<_>>(),
            "telemesh crates {dir} depends on"
        );
        if dir != "." {
            for test_only in ["tempfile", "proptest", "telemesh-testkit", "rcgen"] {
                let allowed = test_only == "rcgen" && dir == "quic"; // `telemesh certs`
                assert!(
                    allowed || !got.contains(test_only),
                    "{dir} has {test_only} as a normal dependency"
                );
            }
        }
    }
    for io in ["tokio", "heed", "quinn", "rumqttd", "rumqttc"] {
        assert!(!deps("proto").contains(io), "proto depends on {io}");
    }
}

/// The workspace's library crates by package name, with their directories.
const MEMBERS: [(&str, &str); 7] = [
    ("telemesh-proto", "proto"),
    ("telemesh-quic", "quic"),
    ("telemesh-http", "http"),
    ("telemesh-client", "client"),
    ("telemesh-gateway", "gateway"),
    ("telemesh-mesh", "mesh"),
    ("telemesh-edge", "edge"),
];

/// Every package a package needs to build and run: Cargo.lock's edges for registry packages
/// (it lists their normal and build dependencies), the manifests' `[dependencies]` for the
/// workspace's own crates (Cargo.lock also lists their dev-dependencies, which a dependent
/// never links).
fn lock_closure(root: &str) -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let lock: toml::Table = toml::from_str(&text).unwrap();
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_owned();
        let deps: Vec<String> = p
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|a| {
                a.iter()
                    .map(|d| d.as_str().unwrap().split(' ').next().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        graph.entry(name).or_default().extend(deps);
    }
    for (name, dir) in MEMBERS {
        graph.insert(name.to_owned(), deps(dir).into_iter().collect());
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            todo.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_client_library_links_no_storage_no_http_server_and_no_node() {
    let tree = lock_closure("telemesh-client");
    assert!(tree.contains("quinn"), "the closure is read: {tree:?}");
    for absent in [
        "heed",
        "lmdb-master-sys",
        "axum",
        "hyper",
        "prometheus-client",
        "rumqttd",
        "telemesh-mesh",
        "telemesh-edge",
        "telemesh-gateway",
        "telemesh-http",
    ] {
        assert!(!tree.contains(absent), "telemesh-client pulls in {absent}");
    }
}

#[test]
fn the_edge_never_links_the_node() {
    let tree = lock_closure("telemesh-edge");
    assert!(tree.contains("heed"), "the closure is read: {tree:?}");
    for absent in ["telemesh-mesh", "telemesh-client"] {
        assert!(!tree.contains(absent), "telemesh-edge pulls in {absent}");
    }
}
