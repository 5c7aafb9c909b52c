//! The Kubernetes manifests (`deploy/kubernetes`) are valid and render configurations the
//! daemons accept:
//! - every resource file listed in `kustomization.yaml` (and every `*.yaml` there is listed)
//!   passes `kubernetes-validate --strict` (PyPI; scripts/setup.sh installs it into `.venv/`);
//! - the init containers' scripts, run with `sh` as the pod would run them (downward-API values
//!   in the environment, the ConfigMaps as files), write an agent and a proxy configuration that
//!   `snas_agent::AgentConfig` and `snas_proxy::config::ProxyConfig` parse, with the node's
//!   address, the ordinal's own egress pool and the node-local DNS address in place.
//!
//! Without `.venv/bin/kubernetes-validate` the tests fail and say how to install it (CI runs
//! scripts/setup.sh first).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn k8s(rel: &str) -> PathBuf {
    repo().join("deploy/kubernetes").join(rel)
}

fn venv(tool: &str) -> PathBuf {
    let p = repo().join(".venv/bin").join(tool);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs kubernetes-validate into .venv/)",
        p.display()
    );
    p
}

/// The resources kustomization.yaml lists.
fn resources() -> Vec<String> {
    let text = std::fs::read_to_string(k8s("kustomization.yaml")).unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            inside = true;
            continue;
        }
        if inside {
            match line.trim().strip_prefix("- ") {
                Some(r) if line.starts_with("  ") => out.push(r.trim().to_owned()),
                _ => break,
            }
        }
    }
    out
}

#[test]
fn every_manifest_is_listed_and_passes_kubernetes_validate_strict() {
    let listed = resources();
    let mut files: Vec<String> = std::fs::read_dir(k8s(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(files, sorted, "kustomization.yaml must list every manifest");
    let out = Command::new(venv("kubernetes-validate"))
        .arg("--strict")
        .args(listed.iter().map(|f| k8s(f)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // One `passed` line per resource, no warnings or failures.
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
    assert!(text.matches(" passed ").count() >= listed.len(), "{text}");
}

#[test]
fn images_are_set_by_kustomize_and_never_pulled_by_a_public_tag() {
    for f in resources() {
        let text = std::fs::read_to_string(k8s(&f)).unwrap();
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
        {
            assert_eq!(line.trim(), "image: snas", "{f}: {line}");
        }
    }
    let k = std::fs::read_to_string(k8s("kustomization.yaml")).unwrap();
    assert!(
        k.contains("- name: snas") && k.contains("digest: sha256:"),
        "{k}"
    );
}

/// `(script, env)` of init container `container` of the workload in `file`, read with PyYAML
/// (from the venv) as JSON: the script and the env values that are literals or downward-API
/// references (the latter named by their path).
fn init_container(file: &str, container: &str) -> (String, Vec<(String, String)>) {
    let py = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    spec = d.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("initContainers", []):
        if c["name"] == sys.argv[2]:
            env = []
            for e in c.get("env", []):
                v = e.get("value")
                if v is None:
                    src = e["valueFrom"]
                    v = "fieldRef:" + src["fieldRef"]["fieldPath"] if "fieldRef" in src else "configMapKeyRef:" + src["configMapKeyRef"]["key"]
                env.append([e["name"], v])
            print(json.dumps({"script": c["args"][0], "env": env}))
"#;
    let out = Command::new(venv("python"))
        .args(["-c", py])
        .arg(k8s(file))
        .arg(container)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let env = v["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (v["script"].as_str().unwrap().to_owned(), env)
}

/// The data of ConfigMap `name` in `file`, key → value.
fn configmap(file: &str, name: &str) -> serde_json::Value {
    let py = r#"
import json, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == sys.argv[2]:
        print(json.dumps(d["data"]))
"#;
    let out = Command::new(venv("python"))
        .args(["-c", py])
        .arg(k8s(file))
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `script` with `sh -ec` and `env`, its absolute paths under `/etc/` moved into `root`,
/// with `root/bin` first on PATH (stand-ins for tools that would ask the cluster).
fn run_script(script: &str, env: &[(&str, String)], root: &Path) -> std::process::Output {
    let script = script.replace("/etc/", &format!("{}/etc/", root.display()));
    Command::new("sh")
        .args(["-ec", &script])
        .env_clear()
        .env(
            "PATH",
            format!("{}/bin:/usr/sbin:/usr/bin:/sbin:/bin", root.display()),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

/// The documentation addresses the placeholders stand for in this test.
fn fill_placeholders(text: &str) -> String {
    text.replace("REPLACE-WITH-SANDBOX-NODE-ADDRESSES", "192.0.2.7")
        .replace("REPLACE-WITH-UPSTREAM-RESOLVER", "192.0.2.53")
        .replace("REPLACE-WITH-CLUSTER-DNS-IP", "192.0.2.10")
        .replace("REPLACE-WITH-NODE-CIDR", "192.0.2.0/24")
        .replace("REPLACE-WITH-POD-CIDR", "10.244.0.0/16")
        .replace("REPLACE-WITH-SERVICE-CIDR", "10.96.0.0/12")
}

#[test]
fn the_proxy_init_container_renders_a_config_with_the_ordinals_own_pool() {
    let (script, env) = init_container("proxy.yaml", "render-config");
    assert!(env
        .iter()
        .any(|(k, v)| k == "POD_IP" && v == "fieldRef:status.podIP"));
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    for d in ["snas-in", "snas-pools", "snas-proxy"] {
        std::fs::create_dir_all(etc.join(d)).unwrap();
    }
    let template = configmap("proxy.yaml", "snas-proxy");
    std::fs::write(
        etc.join("snas-in/proxy.toml.in"),
        fill_placeholders(template["proxy.toml.in"].as_str().unwrap()),
    )
    .unwrap();
    let pools = configmap("proxy.yaml", "snas-proxy-pools");
    for (k, v) in pools.as_object().unwrap() {
        std::fs::write(etc.join("snas-pools").join(k), v.as_str().unwrap()).unwrap();
    }
    // The cluster DNS, for the peers' names: a `getent` that knows the headless Service's
    // per-pod names (ordinal N at 192.0.2.4N).
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    let getent = root.path().join("bin/getent");
    std::fs::write(
        &getent,
        "#!/bin/sh\ncase \"$2\" in snas-proxy-[0-9].snas-proxy.snas-system.svc.cluster.local) \
         n=${2#snas-proxy-}; echo \"192.0.2.4${n%%.*}  STREAM $2\";; *) exit 2;; esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&getent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_script(
        &script,
        &[
            ("POD_NAME", "snas-proxy-1".into()),
            ("POD_NAMESPACE", "snas-system".into()),
            ("POD_IP", "192.0.2.41".into()),
            ("REPLICAS", "3".into()),
        ],
        root.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = etc.join("snas-proxy/proxy.toml");
    let cfg = snas_proxy::config::ProxyConfig::load(&path)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&path).unwrap()));
    assert_eq!(cfg.underlay_addr.to_string(), "192.0.2.41");
    assert_eq!(cfg.name, "snas-proxy-1");
    let pool: Vec<String> = cfg.egress_pool.iter().map(|p| p.to_string()).collect();
    assert_eq!(pool, vec![pools["pool-1"].as_str().unwrap().to_owned()]);
    assert_eq!(cfg.control_listen.to_string(), "192.0.2.41:9091");
    // Peers: the other ordinals, never itself.
    let peers: Vec<String> = cfg.peers.iter().map(|p| p.to_string()).collect();
    assert_eq!(peers, vec!["192.0.2.40", "192.0.2.42"]);

    // An ordinal without a pool key stops the pod instead of sharing another proxy's pool.
    let out = run_script(
        &script,
        &[
            ("POD_NAME", "snas-proxy-7".into()),
            ("POD_NAMESPACE", "snas-system".into()),
            ("POD_IP", "192.0.2.47".into()),
            ("REPLICAS", "3".into()),
        ],
        root.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pool-7"));
}

#[test]
fn the_agent_init_container_renders_a_config_with_a_node_local_dns_address() {
    let (script, env) = init_container("agent.yaml", "render-config");
    assert!(env
        .iter()
        .any(|(k, v)| k == "NODE_IP" && v == "fieldRef:status.hostIP"));
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    for d in ["snas-in", "snas-agent"] {
        std::fs::create_dir_all(etc.join(d)).unwrap();
    }
    let data = configmap("agent.yaml", "snas-agent");
    std::fs::write(
        etc.join("snas-in/agent.toml.in"),
        fill_placeholders(data["agent.toml.in"].as_str().unwrap()),
    )
    .unwrap();
    // The node address: one this machine has (the script finds its interface with `ip`).
    let out = run_script(
        &script,
        &[
            ("NODE_IP", "127.0.0.1".into()),
            ("NODE_NAME", "node-a".into()),
            (
                "DNS_LISTEN",
                data["dns-listen"].as_str().unwrap().to_owned(),
            ),
        ],
        root.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = etc.join("snas-agent/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = snas_agent::AgentConfig::from_toml_str(&text, &path)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.underlay_interface, "lo");
    assert_eq!(cfg.node_name, "node-a");
    assert!(!cfg.dns_listen.is_unspecified(), "DNS stub on the wildcard");
    assert_eq!(
        cfg.dns_listen.to_string(),
        data["dns-listen"].as_str().unwrap()
    );
}
