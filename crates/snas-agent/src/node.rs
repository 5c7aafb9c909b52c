//! The running agent: its listening sockets, the services on them, and how it starts and ends.
//!
//! Owns the order of start-up, the serving tasks over the five listening sockets (DNS UDP and
//! TCP, the policy endpoint, metrics, the local API), and the agent's side of a restart
//! ([`crate::handover`]). Start-up, in order:
//! 1. tier 1 is opened by the caller (`serve` loads it before calling in here);
//! 2. the sockets are asked for: from systemd (`LISTEN_FDS`) if it passed any, else from a
//!    running agent on the hand-over socket (`PREPARE`: it stops changing jobs);
//! 3. jobs are adopted (`Agent::start`) and tier 1's infrastructure set is installed — a
//!    failure here stops the start (fail closed) before anything was taken from the running
//!    agent, which then resumes;
//! 4. the sockets are taken (`TAKE`) — or bound, for any the previous owner did not have or
//!    that do not match the configuration — and served; the old agent is told `DONE`;
//! 5. the agent offers its own hand-over socket, stores its sockets in systemd's fd store and
//!    says `READY=1` when `NOTIFY_SOCKET` is set, and starts the periodic work.
//!
//! It ends on `shutdown` (stop reading, let forwards in progress answer within
//! [`DRAIN_TIMEOUT`], remove the API socket file unless systemd keeps the socket) or after
//! handing its sockets over (the file stays: the new agent serves it).
//!
//! # Invariants
//! - Each listening socket has one long-lived handle here (the "master"); a serving task works
//!   on a duplicate and drops it when it stops, so stopping never closes the socket and nothing
//!   queued on it is lost.
//! - Jobs are changed by one agent at a time: the old agent stops its API before the new one
//!   reads the job records.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, Ops};
use crate::handover::{self, Client, Kind};
use crate::seams::{Dataplane, PolicyVerifier};
use crate::stub::{self, DnsStub, StubConfig};
use crate::upkeep::{self, UpkeepStats};
use crate::{audit, dataplane, proxies, seams, Agent, AgentConfig, ConfigError, StartError};

/// Time forwards in progress get to answer when the agent stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a serving task gets to finish its requests when stopped, before it is cut off.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Backlog of the TCP listeners the agent binds.
const BACKLOG: u32 = 1024;

/// How the agent was started, beyond its configuration.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Sockets passed by systemd (`LISTEN_FDS`/`LISTEN_FDNAMES`), by name.
    pub inherited: Vec<(String, OwnedFd)>,
    /// systemd's notification socket (`NOTIFY_SOCKET`): the agent stores its sockets there
    /// (`FDSTORE=1`) and says `READY=1`.
    pub notify_socket: Option<String>,
}

impl RunOptions {
    /// The options systemd gives through the environment (none outside systemd).
    pub fn from_env() -> Result<RunOptions, RunError> {
        Ok(RunOptions {
            inherited: handover::listen_fds_from_env().map_err(RunError::Systemd)?,
            notify_socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        })
    }
}

/// The masters of the listening sockets (see the module invariants).
#[derive(Debug)]
pub struct Listeners {
    dns_udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    policy: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
    api: std::os::unix::net::UnixListener,
    /// Socket name → `handover`, `systemd` or `bound`.
    sources: BTreeMap<&'static str, &'static str>,
}

/// Chooses each socket: the one offered under its name if it matches, else a new one.
struct Picker<'a> {
    offered: &'a mut Vec<(String, OwnedFd)>,
    sources: &'a mut BTreeMap<&'static str, &'static str>,
    source: &'static str,
}

impl Picker<'_> {
    async fn one<T, F>(
        &mut self,
        name: &'static str,
        adopt: impl FnOnce(OwnedFd) -> Option<T>,
        bind: impl FnOnce() -> F,
    ) -> Result<T, RunError>
    where
        F: Future<Output = Result<T, RunError>>,
    {
        let fd = self
            .offered
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| self.offered.swap_remove(i).1);
        let was_offered = fd.is_some();
        if let Some(s) = fd.and_then(adopt) {
            self.sources.insert(name, self.source);
            return Ok(s);
        }
        if was_offered {
            tracing::warn!(
                socket = name,
                from = self.source,
                "passed socket does not match the configuration; binding a new one"
            );
        }
        self.sources.insert(name, "bound");
        bind().await
    }
}

fn adopt_udp(fd: OwnedFd, want: SocketAddr) -> Option<std::net::UdpSocket> {
    (handover::kind(fd.as_fd()) == Some(Kind::Udp))
        .then(|| std::net::UdpSocket::from(fd))
        .filter(|s| {
            s.local_addr()
                .is_ok_and(|a| handover::addr_matches(a, want))
        })
}

fn adopt_tcp(fd: OwnedFd, want: SocketAddr) -> Option<std::net::TcpListener> {
    (handover::kind(fd.as_fd()) == Some(Kind::TcpListener))
        .then(|| std::net::TcpListener::from(fd))
        .filter(|s| {
            s.local_addr()
                .is_ok_and(|a| handover::addr_matches(a, want))
        })
}

fn adopt_unix(fd: OwnedFd, path: &Path) -> Option<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    // The file must still name a socket: a listener whose file is gone is unreachable.
    let file_ok = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    (file_ok && handover::kind(fd.as_fd()) == Some(Kind::UnixListener))
        .then(|| std::os::unix::net::UnixListener::from(fd))
        .filter(|s| s.local_addr().is_ok_and(|a| a.as_pathname() == Some(path)))
}

async fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)?.into_std()
}

impl Listeners {
    /// The sockets the configuration asks for: the `offered` ones (from `source`) that match
    /// it, freshly bound ones for the rest. Offered sockets that do not match are closed.
    pub async fn assemble(
        config: &AgentConfig,
        mut offered: Vec<(String, OwnedFd)>,
        source: &'static str,
    ) -> Result<Listeners, RunError> {
        let mut sources = BTreeMap::new();
        let dns_addr = SocketAddr::new(config.dns_listen, dataplane::DNS_STUB_PORT);
        let dns_err = |source| RunError::DnsListen {
            addr: dns_addr,
            source,
        };
        let mut pick = Picker {
            offered: &mut offered,
            sources: &mut sources,
            source,
        };
        let dns_udp = pick
            .one(
                handover::DNS_UDP,
                |fd| adopt_udp(fd, dns_addr),
                || async { std::net::UdpSocket::bind(dns_addr).map_err(dns_err) },
            )
            .await?;
        stub::tune_udp(&dns_udp).map_err(dns_err)?;
        let dns_tcp = pick
            .one(
                handover::DNS_TCP,
                |fd| adopt_tcp(fd, dns_addr),
                || async { bind_tcp(dns_addr).await.map_err(dns_err) },
            )
            .await?;
        let policy_addr = config.policy_listen_addr();
        let policy = pick
            .one(
                handover::POLICY,
                |fd| adopt_tcp(fd, policy_addr),
                || async {
                    bind_tcp(policy_addr)
                        .await
                        .map_err(|source| RunError::PolicyListen {
                            addr: policy_addr,
                            source,
                        })
                },
            )
            .await?;
        let metrics = match config.metrics_listen {
            None => None,
            Some(addr) => Some(
                pick.one(
                    handover::METRICS,
                    |fd| adopt_tcp(fd, addr),
                    || async {
                        bind_tcp(addr)
                            .await
                            .map_err(|source| RunError::MetricsListen { addr, source })
                    },
                )
                .await?,
            ),
        };
        let api = pick
            .one(
                handover::API,
                |fd| adopt_unix(fd, &config.api_socket),
                || async {
                    api::bind_unix(&config.api_socket, config.api_socket_mode)
                        .and_then(|l| l.into_std())
                        .map_err(|source| RunError::ApiSocket {
                            path: config.api_socket.clone(),
                            source,
                        })
                },
            )
            .await?;
        for (name, _) in offered {
            tracing::warn!(socket = %name, from = source, "passed socket not used; closed");
        }
        let l = Listeners {
            dns_udp,
            dns_tcp,
            policy,
            metrics,
            api,
            sources,
        };
        l.set_nonblocking().map_err(RunError::Runtime)?;
        Ok(l)
    }

    /// Every serving handle is a duplicate of a master and they share the file status flags:
    /// all are non-blocking, as tokio needs.
    fn set_nonblocking(&self) -> io::Result<()> {
        self.dns_udp.set_nonblocking(true)?;
        self.dns_tcp.set_nonblocking(true)?;
        self.policy.set_nonblocking(true)?;
        if let Some(m) = &self.metrics {
            m.set_nonblocking(true)?;
        }
        self.api.set_nonblocking(true)
    }

    /// The sockets by name, in hand-over order.
    pub fn named(&self) -> Vec<(&'static str, BorrowedFd<'_>)> {
        let mut v = vec![
            (handover::DNS_UDP, self.dns_udp.as_fd()),
            (handover::DNS_TCP, self.dns_tcp.as_fd()),
            (handover::POLICY, self.policy.as_fd()),
            (handover::API, self.api.as_fd()),
        ];
        if let Some(m) = &self.metrics {
            v.push((handover::METRICS, m.as_fd()));
        }
        v
    }

    /// Where each socket came from.
    pub fn sources(&self) -> &BTreeMap<&'static str, &'static str> {
        &self.sources
    }
}

/// One serving task and its stop signal.
struct Service {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Service {
    fn spawn<F>(f: impl FnOnce(watch::Receiver<bool>) -> F) -> Service
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        Service {
            stop,
            task: tokio::spawn(f(rx)),
        }
    }

    /// Signals the stop and waits for the task (at most [`STOP_TIMEOUT`], then cuts it off).
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.join().await;
    }

    /// Waits for the task (at most [`STOP_TIMEOUT`], then cuts it off).
    async fn join(self) {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_TIMEOUT, self.task).await.is_err() {
            tracing::warn!("a serving task did not finish in time; cut off");
            abort.abort();
        }
    }
}

/// The serving tasks over the listeners, each group stoppable and restartable.
struct Services {
    ls: Listeners,
    ops: Arc<Ops>,
    api: Option<Service>,
    /// DNS over UDP and TCP: stop at once when told.
    dns: Vec<Service>,
    /// Policy endpoint and metrics: stop accepting at once, then finish their requests.
    http: Vec<Service>,
    /// Stopped HTTP services still finishing their requests.
    draining: Vec<Service>,
}

fn log_serve(what: &'static str, r: io::Result<()>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "{what} server failed");
    }
}

impl Services {
    fn start_api(&mut self) -> io::Result<()> {
        if self.api.is_some() {
            return Ok(());
        }
        let l = tokio::net::UnixListener::from_std(self.ls.api.try_clone()?)?;
        let router = api::api_router(self.ops.clone());
        self.api = Some(Service::spawn(|rx| async move {
            let r = axum::serve(l, router)
                .with_graceful_shutdown(crate::shutdown::stopped(rx))
                .await;
            log_serve("API", r);
        }));
        Ok(())
    }

    async fn stop_api(&mut self) {
        if let Some(s) = self.api.take() {
            s.stop().await;
        }
    }

    fn start_net(&mut self) -> io::Result<()> {
        if !self.dns.is_empty() {
            return Ok(());
        }
        let udp = tokio::net::UdpSocket::from_std(self.ls.dns_udp.try_clone()?)?;
        let tcp = tokio::net::TcpListener::from_std(self.ls.dns_tcp.try_clone()?)?;
        let pol = tokio::net::TcpListener::from_std(self.ls.policy.try_clone()?)?;
        let met = match &self.ls.metrics {
            Some(m) => Some(tokio::net::TcpListener::from_std(m.try_clone()?)?),
            None => None,
        };
        let stub = self.ops.stub.clone();
        self.dns
            .push(Service::spawn(|rx| stub.clone().serve_udp(udp, rx)));
        self.dns.push(Service::spawn(|rx| stub.serve_tcp(tcp, rx)));
        let router = api::policy_router(self.ops.clone());
        self.http.push(Service::spawn(|rx| async move {
            let r = axum::serve(
                pol,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(crate::shutdown::stopped(rx))
            .await;
            log_serve("policy endpoint", r);
        }));
        if let Some(met) = met {
            let router = api::metrics_router(self.ops.clone());
            self.http.push(Service::spawn(|rx| async move {
                let r = axum::serve(met, router)
                    .with_graceful_shutdown(crate::shutdown::stopped(rx))
                    .await;
                log_serve("metrics", r);
            }));
        }
        Ok(())
    }

    /// Stops reading the DNS sockets and accepting on the policy and metrics listeners; HTTP
    /// requests in progress finish in the background ([`Services::stop_all`] waits for them).
    async fn stop_net(&mut self) {
        for s in &self.http {
            let _ = s.stop.send(true);
        }
        self.draining.append(&mut self.http);
        for s in std::mem::take(&mut self.dns) {
            s.stop().await;
        }
    }

    fn start_all(&mut self) -> io::Result<()> {
        self.start_net()?;
        self.start_api()
    }

    async fn stop_all(&mut self) {
        self.stop_api().await;
        self.stop_net().await;
        for s in std::mem::take(&mut self.draining) {
            s.join().await;
        }
    }

    /// Serves one hand-over request (the old agent's side); true once the sockets are the
    /// new agent's. On any failure everything serves again.
    async fn hand_over(&mut self, mut s: UnixStream) -> bool {
        match handover::peer_uid(s.as_fd()) {
            Ok(uid) if uid == handover::euid() => {}
            other => {
                tracing::warn!(peer_uid = ?other, "hand-over request from another user; ignored");
                return false;
            }
        }
        match handover::read_line(&mut s, handover::DONE_TIMEOUT).await {
            Ok(Some(l)) if l == handover::HELLO => {}
            other => {
                tracing::warn!(line = ?other, "not a hand-over request; ignored");
                let _ = handover::write_line(&mut s, "ERR unknown request").await;
                return false;
            }
        }
        tracing::info!("a new agent asks for the sockets: API paused while it adopts the jobs");
        self.stop_api().await;
        let taken = self.give(&mut s).await;
        if !taken {
            tracing::warn!("hand-over abandoned; serving everything again");
            if let Err(e) = self.start_all() {
                tracing::error!(error = %e, "cannot serve again after an abandoned hand-over");
            }
        }
        taken
    }

    async fn give(&mut self, s: &mut UnixStream) -> bool {
        if handover::write_line(s, "READY").await.is_err() {
            return false;
        }
        match handover::read_line(s, handover::PREPARE_TIMEOUT).await {
            Ok(Some(l)) if l == "TAKE" => {}
            _ => return false,
        }
        self.stop_net().await;
        if let Err(e) = handover::send_sockets(s, &self.ls.named()).await {
            tracing::warn!(error = %e, "sockets not sent");
            return false;
        }
        matches!(
            handover::read_line(s, handover::DONE_TIMEOUT).await,
            Ok(Some(l)) if l == "DONE"
        )
    }
}

/// Binds the hand-over socket (replacing a stale file, or the previous agent's).
fn bind_handover(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(l)
}

/// Stores the sockets in systemd's fd store and says `READY=1`; true if the store took them.
fn notify_systemd(socket: &str, ls: &Listeners) -> bool {
    let mut stored = true;
    for (name, fd) in ls.named() {
        if let Err(e) = handover::notify(socket, &format!("FDSTORE=1\nFDNAME={name}"), &[fd]) {
            tracing::warn!(socket = name, error = %e, "not stored in systemd's fd store");
            stored = false;
        }
    }
    if let Err(e) = handover::notify(socket, "READY=1", &[]) {
        tracing::warn!(error = %e, "READY=1 not sent to systemd");
    }
    stored
}

enum Exit {
    Shutdown,
    HandedOver,
}

/// Notifies `hup` on every SIGHUP (trust bundle reload) until `stop` is set.
fn spawn_sighup(hup: Arc<tokio::sync::Notify>, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut sig) = signal(SignalKind::hangup()) else {
        tracing::warn!(
            "SIGHUP cannot be caught: the trust bundle is reloaded by the 500 ms poll only"
        );
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = sig.recv() => match r {
                    Some(()) => hup.notify_one(),
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    });
}

/// Runs the agent until `shutdown` completes or it has handed its sockets to a new agent.
pub async fn run(
    config: AgentConfig,
    verifier: Arc<dyn PolicyVerifier>,
    dataplane: Arc<dyn Dataplane>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: RunOptions,
) -> Result<(), RunError> {
    let handover_path = handover::socket_path(&config.state_dir);
    let (mut offered, mut source) = (opts.inherited, "systemd");
    let mut client = None;
    if offered.is_empty() {
        source = "handover";
        if let Some(mut c) = Client::connect(&handover_path).await? {
            tracing::info!(path = %handover_path.display(), "an agent is running: taking over from it");
            c.prepare().await?;
            client = Some(c);
        }
    }
    let stub_cfg = StubConfig::from_agent(&config);
    let proxies = Arc::new(proxies::Proxies::new(
        &config.proxy_v4(),
        config.proxy_control_port,
        config.proxy_resolver_port,
    ));
    let cfg = config.clone();
    let dp = dataplane.clone();
    let (agent, _report) = tokio::task::spawn_blocking(move || Agent::start(cfg, verifier, dp))
        .await
        .map_err(|e| RunError::Runtime(io::Error::other(e.to_string())))??;
    let agent = Arc::new(agent);
    let upkeep_stats = Arc::new(UpkeepStats::default());
    upkeep::install_infrastructure(
        &dataplane,
        upkeep::infrastructure(&config, &proxies.snapshot().addresses()),
        &upkeep_stats,
    )
    .await
    .map_err(RunError::Infrastructure)?;
    if let Some(c) = client.as_mut() {
        offered = c.take().await?;
    }
    let audit_path = config.audit_log_path();
    let audit = audit::spawn_writer(&audit_path)?;
    let listeners = Listeners::assemble(&config, offered, source).await?;
    let stub = Arc::new(DnsStub::new(
        agent.clone(),
        dataplane.clone(),
        proxies.clone(),
        audit.clone(),
        stub_cfg,
    ));
    let ops = Arc::new(Ops {
        sockets: listeners.sources().clone(),
        upkeep: upkeep_stats.clone(),
        ..Ops::new(agent.clone(), proxies.clone(), stub.clone(), audit.clone())
    });
    let mut services = Services {
        ls: listeners,
        ops: ops.clone(),
        api: None,
        dns: Vec::new(),
        http: Vec::new(),
        draining: Vec::new(),
    };
    services.start_all().map_err(RunError::Runtime)?;
    if let Some(c) = client {
        if let Err(e) = c.done().await {
            tracing::warn!(error = %e, "the previous agent was not told it may go");
        }
    }
    let handover_listener =
        bind_handover(&handover_path).map_err(|source| RunError::HandoverListen {
            path: handover_path.clone(),
            source,
        })?;
    let stored = opts
        .notify_socket
        .as_deref()
        .is_some_and(|n| notify_systemd(n, &services.ls));

    let (bg_stop, bg_rx) = watch::channel(false);
    spawn_tier1_audit(
        agent.clone(),
        dataplane.clone(),
        audit.clone(),
        bg_rx.clone(),
    );
    tokio::spawn(proxies::run_health_checks(
        proxies.clone(),
        dataplane.clone(),
        proxies::PROBE_INTERVAL,
        proxies::PROBE_TIMEOUT,
        bg_rx.clone(),
    ));
    if let Some((service, dns)) = config.proxy_service.clone().zip(config.proxy_service_dns) {
        tokio::spawn(proxies::run_discovery(
            proxies.clone(),
            dataplane.clone(),
            service,
            dns,
            proxies::DISCOVERY_INTERVAL,
            bg_rx.clone(),
        ));
    }
    let hup = Arc::new(tokio::sync::Notify::new());
    spawn_sighup(hup.clone(), bg_rx.clone());
    tokio::spawn(crate::lifecycle::run(
        ops.clone(),
        config.revocations_dir.clone(),
        hup,
        bg_rx.clone(),
    ));
    tokio::spawn(upkeep::run(
        config.clone(),
        agent.clone(),
        stub.clone(),
        proxies.clone(),
        dataplane.clone(),
        upkeep_stats,
        bg_rx,
    ));
    tracing::info!(
        api = %config.api_socket.display(),
        policy = %config.policy_listen_addr(),
        dns = %SocketAddr::new(config.dns_listen, dataplane::DNS_STUB_PORT),
        audit = %audit_path.display(),
        sockets = ?services.ls.sources(),
        "agent listening"
    );

    tokio::pin!(shutdown);
    let exit = loop {
        tokio::select! {
            () = &mut shutdown => break Exit::Shutdown,
            r = handover_listener.accept() => match r {
                Ok((s, _)) => {
                    if services.hand_over(s).await {
                        break Exit::HandedOver;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "hand-over accept"),
            },
        }
    };
    drop(handover_listener);
    services.stop_all().await;
    let _ = bg_stop.send(true);
    if !stub.drain(DRAIN_TIMEOUT).await {
        tracing::warn!("DNS forwards still in progress at exit");
    }
    match exit {
        Exit::HandedOver => tracing::info!("sockets handed over to the new agent; exiting"),
        Exit::Shutdown => {
            // The files name this agent's sockets only if nobody keeps them for a successor.
            let _ = std::fs::remove_file(&handover_path);
            if !stored {
                let _ = std::fs::remove_file(&config.api_socket);
            }
        }
    }
    Ok(())
}

/// Where [`run`] keeps the hand-over socket for `config` (for operators and tests).
pub fn handover_socket(config: &AgentConfig) -> PathBuf {
    handover::socket_path(&config.state_dir)
}

/// Errors that stop `snas agent`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Existing state could not be taken over.
    #[error("agent start: {0}")]
    Start(#[from] StartError),
    /// The API socket could not be bound.
    #[error("api socket {path}: {source}")]
    ApiSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The policy endpoint could not be bound.
    #[error("policy_listen {addr}: {source}")]
    PolicyListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The DNS stub's port could not be bound.
    #[error("dns_listen {addr}: {source}")]
    DnsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("metrics_listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// Taking the sockets over from the running agent failed.
    #[error("hand-over: {0}")]
    Handover(#[from] handover::HandoverError),
    /// The hand-over socket could not be bound.
    #[error("hand-over socket {path}: {source}")]
    HandoverListen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// systemd's LISTEN_FDS could not be read.
    #[error("systemd sockets: {0}")]
    Systemd(String),
    /// Tier 1's infrastructure set could not be installed: the agent does not start without it.
    #[error("infrastructure set: {0}")]
    Infrastructure(seams::DataplaneError),
    /// The trust bundle could not be loaded.
    #[error("trust_bundle {path}: {detail}")]
    TrustBundle {
        path: std::path::PathBuf,
        detail: String,
    },
    /// Tier 1 could not be loaded.
    #[error(transparent)]
    Dataplane(seams::DataplaneError),
    /// The async runtime failed.
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Copies tier-1 audit events into the audit log from a dedicated thread until `stop`.
fn spawn_tier1_audit(
    agent: Arc<Agent>,
    dp: Arc<dyn Dataplane>,
    sink: audit::AuditSink,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|v| *v).await;
        f.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let spawned = std::thread::Builder::new()
        .name("snas-tier1-audit".into())
        .spawn(move || {
            let on_event = Box::new(move |ev: snas_bpf::AuditEvent| {
                use stub::JobDirectory;
                let policy = agent.policy(ev.job_key);
                let hostname = agent.bound_name(ev.job_key, ev.dst.ip());
                let mono = snas_bpf::mono_now().unwrap_or(ev.at_mono);
                sink.emit(audit::tier1_record(
                    &ev,
                    policy.as_ref(),
                    hostname,
                    std::time::SystemTime::now(),
                    mono,
                ));
            });
            if let Err(e) = dp.run_audit(on_event, &flag) {
                tracing::warn!(error = %e, "tier-1 audit events are not logged");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "tier-1 audit thread not started");
    }
}
