//! Running a command as a job on a testbed node without gVisor: create the job through the
//! node agent's Unix-socket API, run the command in the job's network namespace with the job's
//! resolver, delete the job.
//!
//! Owns a minimal HTTP/1.1 client for the agent socket (one request per connection,
//! `Connection: close`, `Content-Length` or chunked bodies) — enough for the four calls used
//! here without pulling an HTTP client stack into the testbed.
//!
//! Invariant: once a job was created, [`JobGuard`] deletes it when dropped, whatever happened
//! to the command.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::{self, NetnsError};

/// Errors talking to the agent or preparing the job's command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The socket could not be reached or the exchange broke.
    #[error("agent API {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP or not the expected JSON.
    #[error("agent API {socket}: malformed answer: {detail}")]
    Malformed { socket: PathBuf, detail: String },
    /// The agent refused the request.
    #[error("agent API {method} {path}: HTTP {status}: {body}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    /// The token file could not be read.
    #[error("reading policy token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Entering the job failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Writing the job's resolv.conf failed.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A client for one agent socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
}

/// What the agent says about a created job (fields of `POST /v1/jobs`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct JobInfo {
    /// Job name from the policy.
    pub job: String,
    /// 16 hex digits.
    pub job_key: String,
    /// Namespace name.
    pub netns: String,
    /// Namespace file.
    pub netns_path: PathBuf,
    /// The sandbox's address.
    pub sandbox_ip: String,
    /// The job's gateway (host side of the veth).
    pub gateway_ip: String,
    /// The job's resolver address (the agent's DNS stub); the gateway when absent.
    #[serde(default)]
    pub dns_ip: Option<String>,
}

impl JobInfo {
    /// The resolver the job should use.
    pub fn resolver(&self) -> &str {
        self.dns_ip.as_deref().unwrap_or(&self.gateway_ip)
    }
}

fn decode_chunked(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_txt = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

impl AgentClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> AgentClient {
        AgentClient {
            socket: socket.into(),
        }
    }

    /// One request; returns (status, body).
    pub fn request(
        &self,
        method: &'static str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), ExecError> {
        let io = |source| ExecError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(io)?;
        s.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(io)?;
        let malformed = |detail: &str| ExecError::Malformed {
            socket: self.socket.clone(),
            detail: detail.to_owned(),
        };
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| malformed("no end of headers"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("no status line"))?;
        let mut body = raw[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            body = decode_chunked(&body).ok_or_else(|| malformed("bad chunked body"))?;
        }
        Ok((status, body))
    }

    fn expect(
        &self,
        method: &'static str,
        path: &str,
        body: &[u8],
        ok: &[u16],
    ) -> Result<Vec<u8>, ExecError> {
        let (status, resp) = self.request(method, path, body)?;
        if !ok.contains(&status) {
            return Err(ExecError::Refused {
                method,
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&resp).trim().to_owned(),
            });
        }
        Ok(resp)
    }

    /// `POST /v1/jobs` with the token.
    pub fn create_job(&self, token: &str) -> Result<JobInfo, ExecError> {
        let body = self.expect("POST", "/v1/jobs", token.trim().as_bytes(), &[200, 201])?;
        serde_json::from_slice(&body).map_err(|e| ExecError::Malformed {
            socket: self.socket.clone(),
            detail: format!("job JSON: {e}"),
        })
    }

    /// `DELETE /v1/jobs/{key}`.
    pub fn delete_job(&self, job_key: &str) -> Result<(), ExecError> {
        self.expect(
            "DELETE",
            &format!("/v1/jobs/{job_key}"),
            b"",
            &[200, 204, 404],
        )
        .map(|_| ())
    }

    /// `GET /v1/jobs` as JSON.
    pub fn list_jobs(&self) -> Result<serde_json::Value, ExecError> {
        let body = self.expect("GET", "/v1/jobs", b"", &[200])?;
        serde_json::from_slice(&body).map_err(|e| ExecError::Malformed {
            socket: self.socket.clone(),
            detail: format!("jobs JSON: {e}"),
        })
    }
}

/// A created job, deleted on drop.
#[derive(Debug)]
pub struct JobGuard {
    client: AgentClient,
    info: JobInfo,
    resolv: PathBuf,
}

impl JobGuard {
    /// Creates the job and writes its resolv.conf (`nameserver <dns_ip>`) under `scratch`.
    pub fn create(client: AgentClient, token: &str, scratch: &Path) -> Result<JobGuard, ExecError> {
        let info = client.create_job(token)?;
        // From here on the guard owns the job, so an error below still deletes it.
        let guard = JobGuard {
            client,
            resolv: scratch.join(format!("resolv-{}.conf", info.job_key)),
            info,
        };
        std::fs::create_dir_all(scratch).map_err(|source| ExecError::File {
            path: scratch.to_owned(),
            source,
        })?;
        let text = format!(
            "# snas testbed job {} ({})\nnameserver {}\noptions edns0\n",
            guard.info.job,
            guard.info.job_key,
            guard.info.resolver()
        );
        std::fs::write(&guard.resolv, text).map_err(|source| ExecError::File {
            path: guard.resolv.clone(),
            source,
        })?;
        Ok(guard)
    }

    /// The agent's answer.
    pub fn info(&self) -> &JobInfo {
        &self.info
    }

    /// Prepares `cmd` to run inside the job (network namespace, private mount namespace with
    /// the job's resolv.conf).
    pub fn prepare(&self, cmd: &mut Command) -> Result<(), ExecError> {
        let f = File::open(&self.info.netns_path).map_err(|source| ExecError::File {
            path: self.info.netns_path.clone(),
            source,
        })?;
        netns::prepare_job_command(cmd, f, &self.resolv)?;
        Ok(())
    }

    /// Deletes the job now, reporting failure.
    pub fn delete(mut self) -> Result<(), ExecError> {
        let r = self.client.delete_job(&self.info.job_key);
        let _ = std::fs::remove_file(&self.resolv);
        self.info.job_key.clear();
        r
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.info.job_key.is_empty() {
            let _ = self.client.delete_job(&self.info.job_key);
            let _ = std::fs::remove_file(&self.resolv);
        }
    }
}

/// Reads a `--policy` argument: `@FILE`, a path to an existing file, or the token itself.
pub fn read_token(arg: &str) -> Result<String, ExecError> {
    let path = match arg.strip_prefix('@') {
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from(arg)).filter(|p| p.is_file()),
    };
    match path {
        Some(p) => std::fs::read_to_string(&p)
            .map(|s| s.trim().to_owned())
            .map_err(|source| ExecError::Token { path: p, source }),
        None => Ok(arg.trim().to_owned()),
    }
}

/// Exit code of a finished command: its code, or 128 + signal when killed.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_is_decoded() {
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(decode_chunked(b"5\r\nab").is_none());
    }

    #[test]
    fn token_is_read_from_at_file_or_path_and_otherwise_taken_literally() {
        let dir = std::env::temp_dir().join(format!("snastb-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("job.jwt");
        std::fs::write(&f, "aaa.bbb.ccc\n").unwrap();
        assert_eq!(
            read_token(&format!("@{}", f.display())).unwrap(),
            "aaa.bbb.ccc"
        );
        assert_eq!(read_token(&f.display().to_string()).unwrap(), "aaa.bbb.ccc");
        assert_eq!(read_token("xxx.yyy.zzz").unwrap(), "xxx.yyy.zzz");
        assert!(read_token("@/nonexistent/job.jwt").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn killed_command_exits_with_128_plus_signal() {
        let st = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(st), 137);
        let st = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(exit_code(st), 3);
    }
}
