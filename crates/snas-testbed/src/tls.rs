//! TLS of the testbed internet: a self-signed CA made at `testbed up`, one certificate per
//! internet host, and HTTPS on 443 answering like the HTTP service on 80.
//!
//! Owns the files of `<state>/tls/`: `ca.pem` (the CA certificate, mode 0644: jobs and tests
//! trust it), and for each host `<name>.pem` (certificate) and `<name>.key` (its private key,
//! mode 0600). The CA's private key is never written: it signs the host certificates once, in
//! [`ensure`], and is dropped. [`ensure`] keeps existing material (a second `up` of a running
//! testbed must not change the CA the running internet serves with); `testbed down` removes
//! the state directory and with it everything here.
//!
//! A host's certificate names every zone name whose A record (directly or through CNAMEs) is
//! the host's address, so the server hands out a valid certificate for whatever name a
//! client asked for on that address — the proxies decide which names get there (issue 17),
//! not the server. Keys are ECDSA P-256 (rcgen with ring, the crypto the workspace builds).
//!
//! Serving: [`acceptors`] loads one `tokio_rustls::TlsAcceptor` per host (TLS 1.2 and 1.3,
//! ALPN `http/1.1`), [`serve_https`] runs a handshake per connection and then the same
//! responder as port 80, so a body names the host that answered.
//!
//! Limits: no client certificates, no session resumption beyond rustls' defaults, no QUIC.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::topology::{zone_records, ZoneData};

/// The HTTPS port of every host.
pub const HTTPS_PORT: u16 = 443;

/// Errors of the TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the material could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Generating a key or certificate failed.
    #[error("generating the testbed TLS material ({what}): {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// rustls refused the certificate and key.
    #[error("TLS server configuration for {name}: {source}")]
    Config {
        name: String,
        #[source]
        source: rustls::Error,
    },
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::File {
        path: path.to_owned(),
        source,
    }
}

/// The TLS material's directory of a testbed: `<state>/tls`.
pub fn dir(t: &crate::topology::Topology) -> PathBuf {
    t.state_dir().join("tls")
}

/// The CA certificate (PEM) in a TLS material directory.
pub fn ca_path(tls_dir: &Path) -> PathBuf {
    tls_dir.join("ca.pem")
}

fn cert_path(tls_dir: &Path, name: &str) -> PathBuf {
    tls_dir.join(format!("{name}.pem"))
}

fn key_path(tls_dir: &Path, name: &str) -> PathBuf {
    tls_dir.join(format!("{name}.key"))
}

/// Every zone name that resolves (A record, or CNAMEs ending at one) to `ip`, `host` first.
pub fn names_of(host: &str, ip: Ipv4Addr) -> Vec<String> {
    let records = zone_records();
    let mut names = BTreeSet::new();
    for r in &records {
        if r.data == ZoneData::A(ip) {
            names.insert(r.name.clone());
        }
    }
    // CNAMEs onto those names, to a fixed point (chains are short).
    loop {
        let before = names.len();
        for r in &records {
            if let ZoneData::Cname(target) = &r.data {
                if names.contains(target) {
                    names.insert(r.name.clone());
                }
            }
        }
        if names.len() == before {
            break;
        }
    }
    names.remove(host);
    std::iter::once(host.to_owned()).chain(names).collect()
}

fn generated(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Generate {
        what: what.to_owned(),
        source,
    }
}

/// Makes the CA and one certificate per host in `tls_dir` unless `ca.pem` is already there
/// (then the material is kept as it is). Returns the CA certificate's path.
pub fn ensure(tls_dir: &Path, hosts: &[(String, Ipv4Addr)]) -> Result<PathBuf, TlsError> {
    let ca = ca_path(tls_dir);
    let complete = ca.exists()
        && hosts
            .iter()
            .all(|(n, _)| cert_path(tls_dir, n).exists() && key_path(tls_dir, n).exists());
    if complete {
        return Ok(ca);
    }
    std::fs::create_dir_all(tls_dir).map_err(file_err(tls_dir))?;
    let ca_key = KeyPair::generate().map_err(generated("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(generated("CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "SNAS testbed CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generated("CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);
    for (name, ip) in hosts {
        let key = KeyPair::generate().map_err(generated(name))?;
        let mut p = CertificateParams::new(names_of(name, *ip)).map_err(generated(name))?;
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(*ip)));
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &issuer).map_err(generated(name))?;
        let kp = key_path(tls_dir, name);
        write_mode(&kp, key.serialize_pem().as_bytes(), 0o600)?;
        let cp = cert_path(tls_dir, name);
        write_mode(&cp, cert.pem().as_bytes(), 0o644)?;
    }
    // Last: its presence says the material is complete.
    write_mode(&ca, ca_cert.pem().as_bytes(), 0o644)?;
    Ok(ca)
}

fn write_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(file_err(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(file_err(path))?;
    f.write_all(data).map_err(file_err(path))
}

/// One acceptor per host, from the material [`ensure`] made in `tls_dir`.
pub fn acceptors(
    tls_dir: &Path,
    hosts: &[(String, Ipv4Addr)],
) -> Result<Vec<TlsAcceptor>, TlsError> {
    hosts
        .iter()
        .map(|(name, _)| {
            let cp = cert_path(tls_dir, name);
            let certs = CertificateDer::pem_file_iter(&cp)
                .map_err(|e| TlsError::Pem {
                    path: cp.clone(),
                    reason: e.to_string(),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem {
                    path: cp.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::Pem {
                    path: cp,
                    reason: "no certificate".to_owned(),
                });
            }
            let kp = key_path(tls_dir, name);
            let key = PrivateKeyDer::from_pem_file(&kp).map_err(|e| TlsError::Pem {
                path: kp.clone(),
                reason: e.to_string(),
            })?;
            // ring, not aws-lc-rs: the workspace builds ring already, and aws-lc-sys needs a C
            // toolchain step per build. Its lack of post-quantum key exchange does not matter
            // here: clients offering X25519MLKEM768 also offer X25519, which the server picks,
            // and their ClientHellos (what the proxies inspect) are as large as anywhere.
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|source| TlsError::Config {
                    name: name.clone(),
                    source,
                })?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|source| TlsError::Config {
                    name: name.clone(),
                    source,
                })?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(TlsAcceptor::from(Arc::new(cfg)))
        })
        .collect()
}

/// A host's bound 443 with its acceptor.
pub struct HttpsListener {
    label: Arc<str>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for HttpsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsListener")
            .field("label", &self.label)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Binds 443 on every host address, each with its host's acceptor and body label.
pub(crate) async fn bind(
    tls_dir: &Path,
    hosts: &[(String, Ipv4Addr)],
) -> Result<Vec<HttpsListener>, crate::internet::InternetError> {
    let acceptors = acceptors(tls_dir, hosts)?;
    let mut out = Vec::with_capacity(hosts.len());
    for ((name, ip), acceptor) in hosts.iter().zip(acceptors) {
        let addr = std::net::SocketAddr::new(IpAddr::V4(*ip), HTTPS_PORT);
        out.push(HttpsListener {
            label: Arc::from(format!("{name} ({ip})")),
            listener: crate::internet::tcp(addr).await?,
            acceptor,
        });
    }
    Ok(out)
}

/// Accepts on a host's 443 until aborted: a TLS handshake, then the HTTP responder of port 80
/// with the host's label. A failed handshake (a client that gave up, a proxy's reset) ends
/// that connection only.
pub async fn serve_https(h: HttpsListener) {
    let HttpsListener {
        label,
        listener,
        acceptor,
    } = h;
    crate::internet::accept_loop(listener, move |s| {
        let acceptor = acceptor.clone();
        let label = Arc::clone(&label);
        async move {
            let tls = acceptor.accept(s).await?;
            crate::internet::http(tls, label).await
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Serves api.example.com's acceptor on loopback; a client that trusts only `ca.pem`
    /// verifies the certificate for `www.example.org` (another name on its address) and gets
    /// the body of port 80; for `blocked.example.com` verification fails.
    fn https_round_trip(dir: &Path, hosts: &[(String, Ipv4Addr)]) {
        use rustls::pki_types::ServerName;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = acceptors(dir, hosts).unwrap().remove(0);
            let server = tokio::spawn(serve_https(HttpsListener {
                label: Arc::from("api.example.com (203.0.113.10)"),
                listener,
                acceptor,
            }));
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca_path(dir)).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("www.example.org").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
                .await
                .unwrap();
            let mut body = String::new();
            tls.read_to_string(&mut body).await.unwrap();
            assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
            assert!(
                body.ends_with("hello from api.example.com (203.0.113.10)\n"),
                "{body}"
            );
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("blocked.example.com").unwrap();
            let e = connector.connect(name, tcp).await.unwrap_err();
            assert!(e.to_string().contains("certificate"), "{e}");
            server.abort();
        });
    }

    #[test]
    fn a_hosts_certificate_names_every_zone_name_on_its_address() {
        let names = names_of("edge.example.net", Ipv4Addr::new(203, 0, 113, 30));
        assert_eq!(names[0], "edge.example.net");
        assert!(names.contains(&"cdn.example.com".to_owned()), "{names:?}");
        assert!(names.contains(&"chain.example.org".to_owned()), "{names:?}");
        let api = names_of("api.example.com", Ipv4Addr::new(203, 0, 113, 10));
        assert!(api.contains(&"www.example.org".to_owned()), "{api:?}");
        assert!(!api.contains(&"blocked.example.com".to_owned()), "{api:?}");
    }

    #[test]
    fn material_is_made_once_and_https_verifies_against_the_ca() {
        let dir = std::env::temp_dir().join(format!("snas-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hosts = vec![
            ("api.example.com".to_owned(), Ipv4Addr::new(203, 0, 113, 10)),
            (
                "blocked.example.com".to_owned(),
                Ipv4Addr::new(203, 0, 113, 20),
            ),
        ];
        let ca = ensure(&dir, &hosts).unwrap();
        let first = std::fs::read(&ca).unwrap();
        ensure(&dir, &hosts).unwrap();
        assert_eq!(std::fs::read(&ca).unwrap(), first, "kept, not remade");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(key_path(&dir, "api.example.com")), 0o600);
        assert_eq!(mode(ca.clone()), 0o644);
        assert_eq!(acceptors(&dir, &hosts).unwrap().len(), 2);
        https_round_trip(&dir, &hosts);
        std::fs::remove_file(key_path(&dir, "blocked.example.com")).unwrap();
        let Err(e) = acceptors(&dir, &hosts) else {
            panic!("loaded without a key")
        };
        let e = e.to_string();
        assert!(e.contains("blocked.example.com.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
