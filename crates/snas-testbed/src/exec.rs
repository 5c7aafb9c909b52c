//! Running a command as a job on a testbed node without gVisor: create the job through the
//! node agent's Unix-socket API (its typed client, `snas_agent::api::blocking::AgentClient`),
//! run the command in the job's network namespace with the job's resolver, delete the job.
//!
//! Invariant: once a job was created, [`JobGuard`] deletes it when dropped, whatever happened
//! to the command.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use snas_agent::api::blocking::{AgentClient, OwnedJob};
use snas_agent::api::{ClientError, JobView};

use crate::netns::{self, NetnsError};

/// Errors talking to the agent or preparing the job's command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent could not be reached, or refused the request.
    #[error(transparent)]
    Api(#[from] ClientError),
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

/// A created job with its resolv.conf, both removed on drop.
#[derive(Debug)]
pub struct JobGuard {
    /// `None` once deleted.
    job: Option<OwnedJob>,
    info: JobView,
    resolv: PathBuf,
}

impl JobGuard {
    /// Creates the job and writes its resolv.conf (`nameserver <dns_ip>`) under `scratch`.
    pub fn create(client: AgentClient, token: &str, scratch: &Path) -> Result<JobGuard, ExecError> {
        // From here on the guard owns the job, so an error below still deletes it.
        let job = OwnedJob::create(client, token)?;
        let info = job.view().clone();
        let guard = JobGuard {
            resolv: scratch.join(format!("resolv-{}.conf", info.job_key)),
            job: Some(job),
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
    pub fn info(&self) -> &JobView {
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

    /// Deletes the job now, reporting failure (a job the agent no longer has is deleted).
    pub fn delete(mut self) -> Result<(), ExecError> {
        let r = self.job.take().map_or(Ok(()), OwnedJob::delete);
        let _ = std::fs::remove_file(&self.resolv);
        Ok(r?)
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        // The job itself is deleted by its `OwnedJob`.
        let _ = std::fs::remove_file(&self.resolv);
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
