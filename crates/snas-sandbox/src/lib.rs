//! `snas-sandbox`: runs an untrusted workload under gVisor (`runsc`) inside a job's network
//! namespace, with a generated read-only OCI bundle, cgroup limits, a deadline, orphan
//! reaping and complete cleanup.
//!
//! ```no_run
//! use snas_sandbox::{bundle::BundleSpec, launch::{self, RunOptions, Stdio3}};
//! let spec = BundleSpec::new(
//!     vec!["python3".into(), "-c".into(), "print('hi')".into()],
//!     "/run/netns/job".into(),
//!     String::new(), // the launcher fills in its own cgroup
//! );
//! let report = launch::run(&RunOptions::new(spec), Stdio3::default(), &mut |_| {})?;
//! println!("{} ({:?})", report.termination, report.timings);
//! # Ok::<(), snas_sandbox::launch::LaunchError>(())
//! ```
//!
//! # Layout
//! - [`limits`]: cpu/memory/pids limits and their command-line forms (pure).
//! - [`bundle`]: `config.json`, the root filesystem skeleton and generated `/etc` files.
//! - [`cgroup`]: the run's cgroup on v1 or v2: create with limits, read OOM/pids events, remove.
//! - [`netcfg`]: the address and default route runsc expects in the namespace.
//! - [`platform`]: systrap/ptrace/kvm, the runsc release check and the KVM probe that never
//!   hangs.
//! - [`process`]: every `unsafe` call: signals, reaping, subreaper, namespace pre-exec steps,
//!   including the runsc root-namespace workaround.
//! - [`launch`]: one run from start to cleanup.
//!
//! Everything except the pure modules needs root.

pub mod bundle;
pub mod cgroup;
pub mod launch;
pub mod limits;
pub mod netcfg;
pub mod platform;
pub mod process;

pub use launch::{run, RunOptions, RunReport, Stdio3, Termination};
pub use limits::Limits;
pub use platform::Platform;
