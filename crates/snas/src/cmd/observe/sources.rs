//! Where `snas jobs|flows|drops` read from: the agents' API sockets and the proxies'
//! management endpoints, given on the command line or supplied by a local testbed.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use snas_agent::api::blocking::AgentClient;
use snas_proxy::api::blocking::ProxyClient;
use snas_proxy::api::ClientError;
use snas_testbed::topology::{NODES, PROXIES};
use snas_testbed::Topology;

use super::ObserveArgs;

/// The agent socket of a production node, read when no source is given and no testbed runs.
const LOCAL_AGENT_SOCKET: &str = "/run/snas/agent.sock";

/// A node agent to read.
#[derive(Debug, Clone)]
pub(super) struct AgentSource {
    /// `node-N` for a testbed agent, else the socket path.
    pub label: String,
    pub socket: PathBuf,
}

impl AgentSource {
    /// The agent's typed API client.
    pub fn client(&self) -> AgentClient {
        AgentClient::new(&self.socket)
    }
}

/// A proxy to read; `netns` set when it must be reached from inside a testbed namespace.
#[derive(Debug, Clone)]
pub(super) struct ProxySource {
    /// `proxy-N` for a testbed proxy, else the address.
    pub label: String,
    pub addr: SocketAddr,
    pub netns: Option<String>,
}

impl ProxySource {
    /// Runs `call` with the proxy's typed client, from inside the proxy's namespace when it
    /// lives in one (the blocking client opens its socket on the calling thread).
    pub fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&ProxyClient) -> Result<T, ClientError> + Send + 'static,
    ) -> anyhow::Result<T> {
        let client = ProxyClient::new(self.addr);
        match &self.netns {
            Some(ns) => Ok(snas_testbed::netns::in_netns(ns, move || call(&client))
                .with_context(|| format!("entering {ns}"))??),
            None => Ok(call(&client)?),
        }
    }
}

/// Everything to read.
#[derive(Debug, Default)]
pub(super) struct Sources {
    pub agents: Vec<AgentSource>,
    pub proxies: Vec<ProxySource>,
}

/// The sources of `a`: the explicit ones, else the testbed's, else the local agent.
pub(super) fn sources(a: &ObserveArgs) -> anyhow::Result<Sources> {
    let mut s = Sources::default();
    // Explicit sources replace every default: an operator pointing at one proxy does not
    // want a local testbed mixed in.
    let explicit = !a.agent_sockets.is_empty() || !a.proxies.is_empty();
    let testbed = Topology::new(&a.prefix)
        .ok()
        .filter(|t| !explicit && t.state_dir().exists());
    if a.agent_sockets.is_empty() {
        if let Some(t) = &testbed {
            for n in 1..=NODES {
                let socket = t.agent_socket(n);
                if socket.exists() {
                    s.agents.push(AgentSource {
                        label: format!("node-{n}"),
                        socket,
                    });
                }
            }
        } else if !explicit {
            let socket = PathBuf::from(LOCAL_AGENT_SOCKET);
            if socket.exists() {
                s.agents.push(AgentSource {
                    label: "local".into(),
                    socket,
                });
            }
        }
    } else {
        s.agents = a
            .agent_sockets
            .iter()
            .map(|p| AgentSource {
                label: p.display().to_string(),
                socket: p.clone(),
            })
            .collect();
    }
    if a.proxies.is_empty() {
        if let Some(t) = &testbed {
            for n in 1..=PROXIES {
                if snas_testbed::netns::netns_path(&t.proxy_ns(n)).exists() {
                    s.proxies.push(ProxySource {
                        label: format!("proxy-{n}"),
                        addr: t.proxy_control(n),
                        netns: Some(t.proxy_ns(n)),
                    });
                }
            }
        }
    } else {
        s.proxies = a
            .proxies
            .iter()
            .map(|addr| ProxySource {
                label: addr.to_string(),
                addr: *addr,
                netns: None,
            })
            .collect();
    }
    if s.agents.is_empty() && s.proxies.is_empty() {
        bail!(
            "nothing to read: no testbed `{}` and no --agent/--proxy given",
            a.prefix
        );
    }
    Ok(s)
}
