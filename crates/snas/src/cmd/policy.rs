//! `snas policy …`: key generation, checking, signing, verification and explanation of policies.
//!
//! Exit codes (a contract for scripts):
//! - `keygen`: 0 ok, 1 error (e.g. the key files already exist).
//! - `check`: 0 valid, 2 invalid or unreadable (`file:line: field: reason` on stderr).
//! - `sign`: 0 ok (token on stdout), 2 invalid policy, bad key or unreadable file, or (with
//!   `--update-of`) a policy that is not the next one of the job.
//! - `revoke`: 0 ok (revocation on stdout), 2 bad key, unreadable or unusable token.
//! - `verify`: 0 ok (claims as pretty JSON on stdout), 1 verification failed (reason on stderr),
//!   2 unreadable token or trust bundle.
//! - `explain`: 0 all destinations allowed, 1 any denied (or only let through by audit mode:
//!   `would_deny`), 2 error (bad token, bad destination).
//! - `suggest`: 0 ok (TOML on stdout), 1 no flow of the job in the logs, 2 unreadable input.
//! - `schema`: 0 (the JSON Schema on stdout).
//!
//! The clock and the randomness are read here, never in `snas-policy`.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use rand::RngCore;
use snas_policy::bundle_fs::load_trust_bundle;
use snas_policy::{Decision, DenyReason, IpNet, Matcher, PolicyKey, Transport, MAX_INPUT};
use snas_wire::PolicySerial;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// `snas policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Generate an Ed25519 signing key: writes DIR/ID.key (0600) and DIR/ID.pub.
    Keygen(KeygenArgs),
    /// Check a policy file; prints a one-line summary or `file:line: field: reason`.
    Check(CheckArgs),
    /// Sign a policy file; prints the compact JWS on stdout. With --update-of, the next policy
    /// of a running job (live update or renewal).
    Sign(SignArgs),
    /// Sign a revocation of a policy (its job is cut off at every proxy and agent given it);
    /// prints the compact JWS on stdout.
    Revoke(RevokeArgs),
    /// Verify a signed policy; prints its claims as JSON.
    Verify(VerifyArgs),
    /// Say whether a signed policy allows destinations (host:port, ip:port, [v6]:port, optional /udp).
    Explain(ExplainArgs),
    /// Suggest a policy covering what a job used, from agent and proxy audit logs (JSON lines).
    Suggest(SuggestArgs),
    /// Print the JSON Schema (draft 2020-12) of the policy TOML, for editors.
    Schema,
}

/// `snas policy suggest`.
#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// The job: its name or its job key (16 hex digits).
    #[arg(long)]
    job: String,
    /// Tenant to write (default: the tenant of the job's audit lines).
    #[arg(long)]
    tenant: Option<String>,
    /// Turn names of N+1 labels that share their last N labels with another used name into
    /// `*.<last N labels>` (N >= 2). Without it, no wildcards.
    #[arg(long, value_name = "N")]
    wildcard_depth: Option<usize>,
    /// Audit logs (JSON lines of the agent and the proxies), or `-` for stdin.
    #[arg(required = true)]
    audit_log: Vec<PathBuf>,
}

/// `snas policy keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory for the key files (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Key id (file stem and JWS `kid`); default `snas-YYYYMMDD-<6 hex>` (UTC date, random).
    #[arg(long)]
    key_id: Option<String>,
}

/// `snas policy check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file (TOML), or `-` for stdin.
    file: PathBuf,
}

/// `--serial`: a decimal that the overlay option can carry. clap names the flag in the error.
fn parse_serial(s: &str) -> Result<PolicySerial, String> {
    let wide: u64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a non-negative whole number: {e}"))?;
    PolicySerial::try_from(wide).map_err(|e| e.to_string())
}

/// `snas policy sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// Private key file DIR/ID.key (PKCS#8 PEM); the kid is the file stem.
    #[arg(long)]
    key: PathBuf,
    /// Policy serial (at most 4294967295, the overlay option carries 32 bits). Default 1, or
    /// with --update-of the old token's serial + 1; a given serial must then be larger.
    #[arg(long, value_parser = parse_serial)]
    serial: Option<PolicySerial>,
    /// Sign the next policy of the job of this token (a token file, `-` for stdin, or the token
    /// itself): same jti (job key), tenant and job, a higher serial. Renewal is the same with a
    /// later expiry.
    #[arg(long, value_name = "OLD_TOKEN_OR_FILE")]
    update_of: Option<String>,
    /// Trust bundle the --update-of token must verify against (signature and key id; its
    /// expiry is not checked, so an expired job can be renewed). Without it the token must
    /// verify against the signing key when it names the same key id, and otherwise only be a
    /// well-formed SNAS policy token (a note on stderr says so).
    #[arg(long, requires = "update_of")]
    trust: Option<PathBuf>,
    /// Lifetime override (e.g. 15m, 2h; at most 24h).
    #[arg(long)]
    ttl: Option<String>,
    /// Issue time as Unix seconds instead of the clock (reproducible tokens, tests).
    #[arg(long, hide = true)]
    issued_at: Option<u64>,
    /// Policy file (TOML), or `-` for stdin.
    file: PathBuf,
}

/// `snas policy revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Private key file DIR/ID.key (PKCS#8 PEM); the kid is the file stem. Any key the
    /// verifiers trust may sign a revocation.
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle the revoked token must verify against (its expiry is not checked).
    /// Without it, as `sign --update-of`.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Revoke only the token's own serial (a bad update; a later serial may replace it).
    /// Default: every serial of the job, so no update brings it back.
    #[arg(long)]
    serial_only: bool,
    /// Issue time as Unix seconds instead of the clock (tests).
    #[arg(long, hide = true)]
    issued_at: Option<u64>,
    /// The token to revoke: a file, `-` for stdin, or the token itself.
    token: String,
}

/// `snas policy verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Trust bundle: one public key file (ID.pub) or a directory of them.
    #[arg(long)]
    trust: PathBuf,
    /// File holding the token, or `-` for stdin.
    token: PathBuf,
}

/// `snas policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Trust bundle: one public key file (ID.pub) or a directory of them.
    #[arg(long)]
    trust: PathBuf,
    /// File holding the token, or `-` for stdin.
    token: PathBuf,
    /// Infrastructure range (CIDR, or one address), repeatable: decide as an agent or proxy
    /// configured with these ranges does (`infrastructure_denied`, whatever the rules say).
    #[arg(long = "infrastructure", value_name = "CIDR", value_parser = parse_infrastructure)]
    infrastructure: Vec<IpNet>,
    /// Destinations: host:port, ip:port or [v6]:port, optionally suffixed /tcp or /udp.
    #[arg(required = true)]
    dest: Vec<String>,
}

/// `--infrastructure`: a network (host bits ignored, as the agent and proxy do) or one address.
fn parse_infrastructure(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not a network (192.0.2.0/24, 2001:db8::/32) or an address"))
}

/// Runs one subcommand and maps the outcome to the documented exit code.
pub fn run(cmd: PolicyCmd) -> ExitCode {
    let res = match cmd {
        PolicyCmd::Keygen(a) => keygen(&a).map_err(|e| (1, e)),
        PolicyCmd::Check(a) => check(&a),
        PolicyCmd::Sign(a) => sign(&a).map_err(|e| (2, e)),
        PolicyCmd::Revoke(a) => revoke(&a).map_err(|e| (2, e)),
        PolicyCmd::Verify(a) => verify(&a),
        PolicyCmd::Explain(a) => explain(&a),
        PolicyCmd::Suggest(a) => suggest(&a),
        PolicyCmd::Schema => {
            print!("{}", snas_policy::schema::POLICY_SCHEMA);
            Ok(0)
        }
    };
    match res {
        Ok(code) => ExitCode::from(code),
        Err((code, e)) if e.is::<PolicyFileErrors>() => {
            eprintln!("{e}");
            ExitCode::from(code)
        }
        Err((code, e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Policy file errors, already formatted as `file:line: field: reason` lines (printed verbatim).
#[derive(Debug)]
struct PolicyFileErrors(String);

impl std::fmt::Display for PolicyFileErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyFileErrors {}

/// Reads a file (or stdin for `-`), refusing more than 1 MiB.
fn read_input(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let limit = MAX_INPUT as u64 + 1;
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut buf)
            .context("reading stdin")?;
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        f.take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("{}", path.display()))?;
    }
    if buf.len() > MAX_INPUT {
        bail!("{}: larger than the 1 MiB limit", path.display());
    }
    Ok(buf)
}

fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_input(path)?).map_err(|_| anyhow!("{}: not valid UTF-8", path.display()))
}

fn display_name(path: &Path) -> String {
    if path == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        path.display().to_string()
    }
}

/// Parses a policy file, printing `file:line: field: reason` lines on failure.
fn load_policy(path: &Path) -> std::result::Result<snas_policy::PolicyDraft, (u8, anyhow::Error)> {
    let bytes = read_input(path).map_err(|e| (2, e))?;
    snas_policy::parse_policy_bytes(&bytes).map_err(|errs| {
        let name = display_name(path);
        let mut msg = String::new();
        for (i, e) in errs.0.iter().enumerate() {
            if i > 0 {
                msg.push('\n');
            }
            let _ = write!(msg, "{name}:{}: {}: {}", e.line, e.field, e.reason);
        }
        (2, anyhow::Error::new(PolicyFileErrors(msg)))
    })
}

fn check(a: &CheckArgs) -> std::result::Result<u8, (u8, anyhow::Error)> {
    let d = load_policy(&a.file)?;
    let hosts = d
        .egress
        .iter()
        .filter(|r| matches!(r, snas_policy::EgressRule::Host { .. }))
        .count();
    let deny = if d.deny.is_empty() {
        String::new()
    } else {
        format!(", {} deny rules", d.deny.len())
    };
    let mode = if d.mode.is_enforce() {
        String::new()
    } else {
        format!(", mode {}", d.mode)
    };
    println!(
        "{}: ok: tenant {}, job {}, {} rules ({} host, {} cidr){deny}{mode}, ttl {}, egress {}, ingress {}, max_connections {}",
        display_name(&a.file),
        d.tenant,
        d.job,
        d.egress.len(),
        hosts,
        d.egress.len() - hosts,
        humantime::format_duration(d.ttl),
        d.limits.egress_bps,
        d.limits.ingress_bps,
        d.limits.max_connections,
    );
    Ok(0)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn default_kid(now: SystemTime) -> String {
    let days = snas_policy::claims::unix_secs(now) / 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let mut r = [0u8; 3];
    rand::rngs::OsRng.fill_bytes(&mut r);
    format!(
        "snas-{y:04}{m:02}{d:02}-{:02x}{:02x}{:02x}",
        r[0], r[1], r[2]
    )
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("{}", path.display()))?;
    f.sync_all().with_context(|| format!("{}", path.display()))
}

fn keygen(a: &KeygenArgs) -> Result<u8> {
    let kid = a
        .key_id
        .clone()
        .unwrap_or_else(|| default_kid(SystemTime::now()));
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = PolicyKey::from_seed(&kid, seed)?;
    seed.fill(0);
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let private = a.out.join(format!("{kid}.key"));
    let public = a.out.join(format!("{kid}.pub"));
    for p in [&private, &public] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                p.display()
            );
        }
    }
    write_new(&private, key.private_pem()?.as_bytes(), 0o600)?;
    write_new(&public, key.public_pem()?.as_bytes(), 0o644)?;
    println!("{}", private.display());
    println!("{}", public.display());
    Ok(0)
}

/// Reads a signing key, warning when others may read it.
fn load_key(path: &Path) -> Result<PolicyKey> {
    let kid = path.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
        anyhow!(
            "{}: cannot derive a key id from the file name",
            path.display()
        )
    })?;
    let pem = read_input(path)?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: {} is readable by group or others; chmod 600 it",
                path.display()
            );
        }
    }
    PolicyKey::from_pem(kid, &pem).with_context(|| format!("{}", path.display()))
}

/// An OLD_TOKEN_OR_FILE argument: `-` is stdin, an existing path a file, anything shaped like a
/// compact JWS (three dot-separated parts, no `/`) the token itself.
fn read_token_arg(arg: &str) -> Result<(String, String)> {
    let looks_like_token = arg.split('.').count() == 3 && !arg.contains('/');
    if arg != "-" && looks_like_token && !Path::new(arg).exists() {
        return Ok((arg.trim().to_owned(), "the token given".to_owned()));
    }
    let path = Path::new(arg);
    Ok((read_text(path)?.trim().to_owned(), display_name(path)))
}

/// The claims of a token whose lineage is being continued or revoked (see `--trust`).
fn lineage_of(
    arg: &str,
    trust: Option<&Path>,
    key: &PolicyKey,
) -> Result<snas_policy::PolicyClaims> {
    let (token, name) = read_token_arg(arg)?;
    if let Some(t) = trust {
        let bundle = load_trust_bundle(t).with_context(|| format!("--trust {}", t.display()))?;
        let (claims, _) = snas_policy::jws::verify_ignoring_time(&token, &bundle)
            .with_context(|| format!("{name}: does not verify against {}", t.display()))?;
        return Ok(claims);
    }
    let own = snas_policy::TrustBundle::from_keys([(key.kid(), key.public_pem()?)])?;
    match snas_policy::jws::verify_ignoring_time(&token, &own) {
        Ok((claims, _)) => Ok(claims),
        Err(snas_policy::VerifyError::UnknownKid(kid)) => {
            let claims = snas_policy::jws::decode_unverified(&token)
                .with_context(|| format!("{name}: not a SNAS policy token"))?;
            eprintln!(
                "note: {name} is signed with key `{kid}`, not `{}`; its signature was not checked (give --trust to check it)",
                key.kid()
            );
            Ok(claims)
        }
        Err(e) => Err(anyhow!("{name}: {e}")),
    }
}

fn sign(a: &SignArgs) -> Result<u8> {
    let key = load_key(&a.key)?;
    let mut draft = load_policy(&a.file).map_err(|(_, e)| e)?;
    if let Some(t) = &a.ttl {
        draft.ttl = snas_policy::units::parse_ttl(t).context("--ttl")?;
    }
    let now = match a.issued_at {
        Some(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        None => SystemTime::now(),
    };
    let (jti, serial) = match &a.update_of {
        None => {
            let mut id = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut id);
            let jti: String = id.iter().map(|b| format!("{b:02x}")).collect();
            (jti, a.serial.unwrap_or(PolicySerial(1)))
        }
        Some(old) => {
            let old = lineage_of(old, a.trust.as_deref(), &key)?;
            let file = display_name(&a.file);
            for (field, new, was) in [
                ("tenant", &draft.tenant, &old.tenant),
                ("job", &draft.job, &old.job),
            ] {
                if new != was {
                    bail!("{file}: {field}: `{new}` is not `{was}`, the {field} of the policy it updates (an update keeps tenant and job)");
                }
            }
            let serial =
                snas_policy::claims::next_serial(old.serial, a.serial).ok_or_else(|| {
                    match a.serial {
                        Some(s) => anyhow!(
                            "--serial: {} is not above {}, the serial of the policy it updates",
                            s.0,
                            old.serial.0
                        ),
                        None => anyhow!(
                            "serial: the policy it updates has the largest serial, 4294967295"
                        ),
                    }
                })?;
            (old.jti, serial)
        }
    };
    let claims = draft.to_claims(&jti, serial, now);
    let token = snas_policy::sign(&claims, &key)?;
    println!("{token}");
    Ok(0)
}

fn revoke(a: &RevokeArgs) -> Result<u8> {
    let key = load_key(&a.key)?;
    let claims = lineage_of(&a.token, a.trust.as_deref(), &key)?;
    let now = match a.issued_at {
        Some(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        None => SystemTime::now(),
    };
    let serials = if a.serial_only {
        claims.serial..=claims.serial
    } else {
        PolicySerial(0)..=PolicySerial(u32::MAX)
    };
    let r = snas_policy::revocation::RevocationClaims::for_policy(&claims, serials, now);
    let token = snas_policy::revocation::sign_revocation(&r, &key)?;
    println!("{token}");
    Ok(0)
}

fn load_verified(
    trust: &Path,
    token: &Path,
) -> std::result::Result<snas_policy::VerifiedPolicy, (u8, anyhow::Error)> {
    let bundle = load_trust_bundle(trust).map_err(|e| (2, anyhow!(e)))?;
    let text = read_text(token).map_err(|e| (2, e))?;
    snas_policy::verify(&text, &bundle, SystemTime::now()).map_err(|e| {
        (
            1,
            anyhow!("{}: verification failed: {e}", display_name(token)),
        )
    })
}

fn verify(a: &VerifyArgs) -> std::result::Result<u8, (u8, anyhow::Error)> {
    let v = load_verified(&a.trust, &a.token)?;
    let json = serde_json::to_string_pretty(v.claims()).map_err(|e| (2, anyhow!(e)))?;
    println!("{json}");
    Ok(0)
}

/// A destination to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Name(String),
    Ip(IpAddr),
}

fn parse_dest(s: &str) -> Result<(Target, u16, Transport)> {
    let (rest, t) = match s.rsplit_once('/') {
        Some((r, "udp")) => (r, Transport::Udp),
        Some((r, "tcp")) => (r, Transport::Tcp),
        Some((_, other)) => bail!("{s}: unknown protocol `{other}` (expected /tcp or /udp)"),
        None => (s, Transport::Tcp),
    };
    if let Ok(sa) = rest.parse::<SocketAddr>() {
        if sa.port() == 0 {
            bail!("{s}: port must be 1-65535");
        }
        return Ok((Target::Ip(sa.ip()), sa.port(), t));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{s}: expected host:port, ip:port or [v6]:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("{s}: `{port}` is not a port"))?;
    if port == 0 {
        bail!("{s}: port must be 1-65535");
    }
    if host.contains(':') || host.starts_with('[') {
        bail!("{s}: IPv6 addresses need brackets: [2001:db8::1]:443");
    }
    let mut buf = [0u8; snas_policy::hostport::MAX_NAME_LEN];
    let name = snas_policy::hostport::normalize_name(host, &mut buf)
        .ok_or_else(|| anyhow!("{s}: `{host}` is not a valid host name"))?;
    Ok((Target::Name(name.to_owned()), port, t))
}

fn is_any_host(r: &snas_policy::EgressRule) -> bool {
    matches!(
        r,
        snas_policy::EgressRule::Host { host, .. }
            if host.pattern == snas_policy::hostport::HostPattern::AnyHost
    )
}

/// The lowest `0.0.0.0` rule that would allow a *name* on this port and transport: an address
/// denied while one exists is worth a hint, since `0.0.0.0` allows names, never raw addresses.
fn any_host_rule(claims: &snas_policy::PolicyClaims, port: u16, t: Transport) -> Option<usize> {
    claims.egress.iter().position(|r| match r {
        snas_policy::EgressRule::Host { host, protocol, .. } => {
            is_any_host(r) && host.ports.contains(port) && protocol.allows(t.into())
        }
        snas_policy::EgressRule::Cidr { .. } => false,
    })
}

fn explain_one(
    m: &Matcher,
    claims: &snas_policy::PolicyClaims,
    target: &Target,
    port: u16,
    t: Transport,
) -> (bool, String) {
    let d = match target {
        Target::Name(n) => m.check_host(n, port, t),
        Target::Ip(ip) => m.check_ip(*ip, port, t),
    };
    let shown = match target {
        Target::Name(n) => format!("{n}:{port}/{t}"),
        Target::Ip(IpAddr::V6(a)) => format!("[{a}]:{port}/{t}"),
        Target::Ip(a) => format!("{a}:{port}/{t}"),
    };
    match d {
        Decision::Allow { rule } => {
            let text = match claims.egress.get(rule) {
                Some(r) if is_any_host(r) => format!("{r}: any host name"),
                Some(r) => r.to_string(),
                None => String::new(),
            };
            let names = claims
                .egress
                .get(rule)
                .map(|r| name_check_note(r, port, t))
                .unwrap_or_default();
            (true, format!("allow {shown} rule {rule} ({text}){names}"))
        }
        Decision::Deny(DenyReason::DenyRule(n)) => {
            let text = claims
                .deny
                .get(n)
                .map(|r| r.to_string())
                .unwrap_or_default();
            (
                false,
                format!("deny {shown} deny_rule (deny rule {n}: {text})"),
            )
        }
        Decision::WouldDeny(r) => (
            false,
            format!(
                "would_deny {shown} {r} (audit mode: let through and audited; {})",
                deny_detail(m, claims, r, target, port, t)
                    .trim_start_matches(" (")
                    .trim_end_matches(')')
            ),
        ),
        Decision::Deny(r) => {
            let detail = deny_detail(m, claims, r, target, port, t);
            (false, format!("deny {shown} {r}{detail}"))
        }
    }
}

/// Why a destination is denied, as ` (…)` (or empty).
fn deny_detail(
    m: &Matcher,
    claims: &snas_policy::PolicyClaims,
    r: DenyReason,
    target: &Target,
    port: u16,
    t: Transport,
) -> String {
    match (r, target) {
        (DenyReason::AlwaysDenied | DenyReason::Infrastructure, Target::Ip(ip)) => m
            .denied_range(*ip)
            .map(|(net, label)| format!(" ({label} {net})"))
            .unwrap_or_default(),
        (DenyReason::PortDenied, _) => {
            " (a rule names this destination, but not this port/protocol)".to_owned()
        }
        (DenyReason::DestinationDenied, Target::Ip(_)) => match any_host_rule(claims, port, t) {
            Some(r) => format!(
                " (no cidr rule covers this address; rule {r} `0.0.0.0` allows host \
                             names, not addresses)"
            ),
            None => " (no rule names this destination)".to_owned(),
        },
        (DenyReason::DestinationDenied, _) => " (no rule names this destination)".to_owned(),
        _ => String::new(),
    }
}

fn suggest(a: &SuggestArgs) -> std::result::Result<u8, (u8, anyhow::Error)> {
    let mut lines = Vec::new();
    let mut unreadable = 0usize;
    for path in &a.audit_log {
        let text = read_log(path).map_err(|e| (2, e))?;
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<snas_policy::audit::AuditLine>(l) {
                Ok(line) => lines.push(line),
                Err(_) => unreadable += 1,
            }
        }
    }
    if unreadable > 0 {
        eprintln!("warning: {unreadable} lines are not audit lines and were skipped");
    }
    let opts = snas_policy::suggest::SuggestOptions {
        job: a.job.clone(),
        tenant: a.tenant.clone(),
        wildcard_depth: a.wildcard_depth,
    };
    match snas_policy::suggest::suggest(lines, &opts) {
        Ok(s) => {
            print!("{}", s.toml);
            eprintln!(
                "{} flows of {} audit lines of the job: {} rules",
                s.flows, s.job_lines, s.rules
            );
            Ok(0)
        }
        Err(e @ snas_policy::suggest::SuggestError::NoFlows(..)) => Err((1, anyhow!(e))),
        Err(e) => Err((2, anyhow!(e))),
    }
}

/// Reads an audit log (or stdin for `-`): no size limit, logs are long.
fn read_log(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .lock()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(s);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What tier 2 checks of the name on the wire of a flow `r` allowed (docs/policy.md, "Names
/// on the wire").
fn name_check_note(r: &snas_policy::EgressRule, port: u16, t: Transport) -> String {
    let Some(c) = r.name_check() else {
        // Address rules are not name-checked; saying so on every cidr line is noise.
        return String::new();
    };
    if !c.checks() {
        return "; names: off".to_owned();
    }
    let what = match t {
        Transport::Tcp => "TLS SNI, HTTP Host",
        Transport::Udp if port == 443 => "QUIC SNI",
        Transport::Udp => return "; names: not inspected (UDP other than 443)".to_owned(),
    };
    let require = if c.require_name {
        "; a first payload without a name is refused"
    } else {
        ""
    };
    format!("; names: check {what} (allowed and bound to the address by the job's DNS){require}")
}

fn explain(a: &ExplainArgs) -> std::result::Result<u8, (u8, anyhow::Error)> {
    let mut dests = Vec::with_capacity(a.dest.len());
    for d in &a.dest {
        dests.push(parse_dest(d).map_err(|e| (2, e))?);
    }
    let v = load_verified(&a.trust, &a.token).map_err(|(_, e)| (2, e))?;
    let m = snas_policy::compile_with(v.claims(), &a.infrastructure);
    let mut all = true;
    for (target, port, t) in &dests {
        let (ok, line) = explain_one(&m, v.claims(), target, *port, *t);
        all &= ok;
        println!("{line}");
    }
    Ok(if all { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(
            parse_dest("API.example.com:443").expect("ok"),
            (Target::Name("api.example.com".into()), 443, Transport::Tcp)
        );
        assert_eq!(
            parse_dest("192.0.2.1:53/udp").expect("ok"),
            (
                Target::Ip("192.0.2.1".parse().expect("ip")),
                53,
                Transport::Udp
            )
        );
        assert_eq!(
            parse_dest("[2001:db8::1]:443/tcp").expect("ok").0,
            Target::Ip("2001:db8::1".parse().expect("ip"))
        );
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:x",
            "2001:db8::1:443",
            "a b:1",
            "x.com:1/icmp",
        ] {
            assert!(parse_dest(bad).is_err(), "{bad}");
        }
    }
}
