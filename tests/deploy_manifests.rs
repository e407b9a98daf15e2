//! The deployment files in deploy/ agree with the binary and the configs: every Kubernetes
//! manifest parses, its ConfigMaps hold configs that validate, each container runs the
//! telemesh image with arguments the CLI accepts and keeps its data on a writable volume;
//! the container file's entrypoint and command, and the systemd units' ExecStart, are
//! telemesh commands the CLI accepts; the units are hardened and their state directory is
//! the data_dir of the sample configs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fake_certs;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Checks a telemesh command line: the subcommand exists and takes every `--flag` given.
fn check_cli(args: &[String]) {
    let sub = args.first().expect("a subcommand");
    let out = Command::new(env!("CARGO_BIN_EXE_telemesh"))
        .args([sub.as_str(), "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "telemesh has no command {sub:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(a.as_str()),
            "telemesh {sub} takes no {a}:\n{help}"
        );
    }
    if let Some(i) = args.iter().position(|a| a == "--log-format") {
        assert!(help.contains(&args[i + 1]), "--log-format {}", args[i + 1]);
    }
}

fn validate_config(name: &str, text: &str, certs: &Path) -> PathBuf {
    let text = text.replace("/etc/telemesh/certs", &certs.display().to_string());
    match name {
        "node.toml" => {
            let c = telemesh_mesh::config::NodeConfig::from_toml(&text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            c.node.data_dir
        }
        "edge.toml" => {
            let c = telemesh_edge::EdgeConfig::from_toml(&text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            c.agent.data_dir
        }
        other => panic!("unexpected config {other}"),
    }
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| v.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_parse_and_run_valid_commands() {
    let certs = fake_certs();
    let mut workloads = 0;
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // ConfigMap name → (key → data_dir of the config it holds).
        let mut maps = std::collections::HashMap::new();
        for d in &docs {
            let kind = d["kind"].as_str().expect("kind");
            assert!(
                d["apiVersion"].as_str().is_some(),
                "{}: apiVersion",
                path.display()
            );
            let name = d["metadata"]["name"].as_str().expect("metadata.name");
            kinds.push(kind.to_owned());
            if kind == "ConfigMap" {
                for (k, v) in d["data"].as_hash().unwrap() {
                    let key = k.as_str().unwrap();
                    let dir = validate_config(key, v.as_str().unwrap(), certs.path());
                    maps.insert((name.to_owned(), key.to_owned()), dir);
                }
            }
        }
        for d in &docs {
            let kind = d["kind"].as_str().unwrap();
            if !["StatefulSet", "DaemonSet", "Deployment"].contains(&kind) {
                continue;
            }
            workloads += 1;
            let spec = &d["spec"]["template"]["spec"];
            let volumes = spec["volumes"].as_vec().unwrap();
            let claims = d["spec"]["volumeClaimTemplates"]
                .as_vec()
                .cloned()
                .unwrap_or_default();
            for c in spec["containers"].as_vec().unwrap() {
                assert!(c["image"].as_str().unwrap().starts_with("telemesh:"));
                let args = strs(&c["args"]);
                check_cli(&args);
                let config = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
                let mounts = c["volumeMounts"].as_vec().unwrap();
                let mount = mounts
                    .iter()
                    .find(|m| m["mountPath"].as_str() == Some(config.as_str()))
                    .unwrap_or_else(|| panic!("{config} is not mounted"));
                let vol = volumes
                    .iter()
                    .find(|v| v["name"].as_str() == mount["name"].as_str())
                    .unwrap();
                let map = vol["configMap"]["name"].as_str().unwrap().to_owned();
                let key = mount["subPath"].as_str().unwrap().to_owned();
                let data_dir = maps
                    .get(&(map.clone(), key.clone()))
                    .unwrap_or_else(|| panic!("ConfigMap {map} has no {key}"));
                // The root filesystem is read-only: data_dir must be on a writable volume
                // that outlives the pod (a claim or a host path).
                assert_eq!(
                    c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
                    Some(true)
                );
                let data = mounts
                    .iter()
                    .find(|m| {
                        !m["readOnly"].as_bool().unwrap_or(false)
                            && data_dir.starts_with(m["mountPath"].as_str().unwrap())
                    })
                    .unwrap_or_else(|| panic!("{} is on no writable volume", data_dir.display()));
                let name = data["name"].as_str().unwrap();
                let persistent = claims
                    .iter()
                    .any(|t| t["metadata"]["name"].as_str() == Some(name))
                    || volumes
                        .iter()
                        .any(|v| v["name"].as_str() == Some(name) && !v["hostPath"].is_badvalue());
                assert!(persistent, "{name} keeps data across pod restarts");
                assert_eq!(
                    c["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/healthz")
                );
            }
        }
    }
    assert!(workloads >= 2, "a node and an agent workload");
    assert!(
        kinds.iter().any(|k| k == "StatefulSet"),
        "nodes run as a StatefulSet"
    );
    assert!(kinds.iter().any(|k| k == "DaemonSet" || k == "Deployment"));
}

#[test]
fn the_container_file_runs_the_binary_it_builds() {
    let text = std::fs::read_to_string(deploy().join("container/Containerfile")).unwrap();
    let json = |directive: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(directive))
            .unwrap_or_else(|| panic!("no {directive}"));
        serde_json::from_str(line[directive.len()..].trim()).unwrap()
    };
    let entry = json("ENTRYPOINT");
    assert_eq!(entry, ["/usr/local/bin/telemesh"]);
    assert!(text.contains("COPY --from=build /src/target/release/telemesh /usr/local/bin/telemesh"));
    assert!(text.contains("cargo build --release --locked"));
    check_cli(&json("CMD"));
    assert!(
        text.contains("USER 10001"),
        "the image does not run as root"
    );
}

#[test]
fn systemd_units_are_hardened_and_run_valid_commands() {
    for role in ["node", "edge"] {
        let path = deploy().join(format!("systemd/telemesh-{role}.service"));
        let text = std::fs::read_to_string(&path).unwrap();
        let value = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{}: no {key}=", path.display()))
                .to_owned()
        };
        let exec: Vec<String> = value("ExecStart")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(exec[0], "/usr/local/bin/telemesh");
        assert_eq!(exec[1], role);
        check_cli(&exec[1..]);
        assert_eq!(value("User"), "telemesh");
        assert_eq!(value("ProtectSystem"), "strict");
        assert_eq!(value("NoNewPrivileges"), "yes");
        assert_eq!(value("KillSignal"), "SIGTERM");
        // The state directory is the sample configs' data_dir.
        let state = format!("/var/lib/{}", value("StateDirectory"));
        for site in ["site-a", "site-b"] {
            let cfg =
                std::fs::read_to_string(deploy().join(site).join(format!("{role}.toml"))).unwrap();
            assert!(
                cfg.contains(&format!("data_dir = \"{state}\"")),
                "{site}/{role}.toml keeps its data in {state}"
            );
        }
    }
}
