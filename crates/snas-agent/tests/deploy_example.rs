//! The example configuration shipped in `deploy/` is accepted by the agent's own parser.
#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn the_deployed_example_agent_config_parses() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd/agent.toml.example");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = snas_agent::AgentConfig::from_toml_str(&text, &path).unwrap();
    assert_eq!(cfg.proxies.len(), 2);
}
