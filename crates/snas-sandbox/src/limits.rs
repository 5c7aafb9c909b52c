//! Resource limits of one sandbox: CPU share, memory and number of host tasks.
//!
//! Owns the parsing of the command-line forms (`--cpus 0.5`, `--memory 256M`, `--pids 512`)
//! and their conversion to cgroup values. Pure: no I/O.
//!
//! # Invariants
//! - Every limit is finite and non-zero; there is no "unlimited" value.
//! - `pids` counts host tasks: runsc's own sentry, gofer and ptrace-stub threads count against
//!   it (an idle sandbox already uses about 43), so values below [`MIN_PIDS`] are refused
//!   rather than letting the sentry die at start-up.

use std::fmt;
use std::time::Duration;

/// CFS period used for the CPU quota.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);
/// Smallest accepted memory limit: below this the sentry itself does not start.
pub const MIN_MEMORY: Bytes = Bytes(64 << 20);
/// Smallest accepted pids limit (runsc needs ~43 tasks before the workload forks once).
pub const MIN_PIDS: u32 = 64;

/// Errors parsing a limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// `--cpus` was not a positive decimal number of CPUs.
    #[error("cpus {0:?}: expected a positive number of CPUs such as 0.5 or 2")]
    Cpus(String),
    /// `--memory` was not a size such as 256M.
    #[error("memory {0:?}: expected a size such as 256M, 1G or 536870912 (at least 64M)")]
    Memory(String),
    /// `--pids` was not an integer of at least [`MIN_PIDS`].
    #[error("pids {0:?}: expected an integer of at least {MIN_PIDS} (runsc's own threads count)")]
    Pids(String),
}

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Parses `512M`, `1G`, `1.5G`, `256Mi`, `65536K` or a plain byte count (binary units).
    pub fn parse(s: &str) -> Result<Bytes, LimitError> {
        let err = || LimitError::Memory(s.to_owned());
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('i'))
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (num, mult) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
            Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
            Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
            Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
            _ => (t, 1),
        };
        let v: f64 = num.trim().parse().map_err(|_| err())?;
        if !v.is_finite() || v <= 0.0 {
            return Err(err());
        }
        let bytes = (v * mult as f64).round();
        if bytes >= u64::MAX as f64 {
            return Err(err());
        }
        let b = Bytes(bytes as u64);
        if b < MIN_MEMORY {
            return Err(err());
        }
        Ok(b)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] {
            if b >= 1 << shift && b % (1 << shift) == 0 {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

/// CPU share in thousandths of a CPU (`0.5` CPUs = 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilliCpus(pub u32);

impl MilliCpus {
    /// Parses a decimal number of CPUs (`0.5`, `2`), at least 0.01.
    pub fn parse(s: &str) -> Result<MilliCpus, LimitError> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| LimitError::Cpus(s.to_owned()))?;
        if !v.is_finite() || !(0.01..=1024.0).contains(&v) {
            return Err(LimitError::Cpus(s.to_owned()));
        }
        Ok(MilliCpus((v * 1000.0).round() as u32))
    }

    /// CFS quota per [`CPU_PERIOD`].
    pub fn quota(self) -> Duration {
        CPU_PERIOD * self.0 / 1000
    }
}

impl fmt::Display for MilliCpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 == 0 {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}", f64::from(self.0) / 1000.0)
        }
    }
}

/// Parses a pids limit.
pub fn parse_pids(s: &str) -> Result<u32, LimitError> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= MIN_PIDS => Ok(n),
        _ => Err(LimitError::Pids(s.to_owned())),
    }
}

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU share (cgroup CFS quota; v2 `cpu.max`).
    pub cpus: MilliCpus,
    /// Memory of the whole sandbox (sentry, gofer and workload) on the host.
    pub memory: Bytes,
    /// Host tasks of the whole sandbox, including runsc's own threads.
    pub pids: u32,
}

impl Default for Limits {
    /// 1 CPU, 512M, 512 tasks: room for runsc's ~43 own threads and a forking workload.
    fn default() -> Limits {
        Limits {
            cpus: MilliCpus(1000),
            memory: Bytes(512 << 20),
            pids: 512,
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpus {}, memory {}, pids {}",
            self.cpus, self.memory, self.pids
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_use_binary_units() {
        assert_eq!(Bytes::parse("256M").unwrap(), Bytes(256 << 20));
        assert_eq!(Bytes::parse("1G").unwrap(), Bytes(1 << 30));
        assert_eq!(Bytes::parse("1.5g").unwrap(), Bytes(3 << 29));
        assert_eq!(Bytes::parse("512Mi").unwrap(), Bytes(512 << 20));
        assert_eq!(Bytes::parse("131072K").unwrap(), Bytes(128 << 20));
        assert_eq!(Bytes::parse("268435456").unwrap(), Bytes(256 << 20));
    }

    #[test]
    fn memory_below_minimum_or_garbage_is_refused() {
        assert!(Bytes::parse("1M").is_err());
        assert!(Bytes::parse("0").is_err());
        assert!(Bytes::parse("-5G").is_err());
        assert!(Bytes::parse("lots").is_err());
        assert!(Bytes::parse("").is_err());
    }

    #[test]
    fn memory_displays_in_the_largest_exact_unit() {
        assert_eq!(Bytes(512 << 20).to_string(), "512M");
        assert_eq!(Bytes(1 << 30).to_string(), "1G");
        assert_eq!(Bytes((1 << 20) + 1).to_string(), "1048577B");
    }

    #[test]
    fn cpus_become_a_quota_per_period() {
        assert_eq!(
            MilliCpus::parse("0.5").unwrap().quota(),
            Duration::from_millis(50)
        );
        assert_eq!(
            MilliCpus::parse("2").unwrap().quota(),
            Duration::from_millis(200)
        );
        assert_eq!(MilliCpus::parse("0.5").unwrap().to_string(), "0.5");
        assert!(MilliCpus::parse("0").is_err());
        assert!(MilliCpus::parse("NaN").is_err());
        assert!(MilliCpus::parse("two").is_err());
    }

    #[test]
    fn pids_below_runsc_needs_are_refused() {
        assert_eq!(parse_pids("512").unwrap(), 512);
        assert!(parse_pids("16").is_err());
        assert!(parse_pids("many").is_err());
    }
}
