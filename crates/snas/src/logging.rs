//! The one log subscriber of the `snas` binary, set up in `main` for every subcommand (the
//! library crates only emit `tracing` events; none installs a subscriber).
//!
//! Where: stderr. Format: `--log-format text` (default, for people) or `json` (one object per
//! line, for collectors). Level: `--log-level`, else the `SNAS_LOG` environment variable, else
//! `RUST_LOG`, else `info` for the daemons (`agent`, `proxy`) and `warn` for the commands a
//! person runs (their own output is on stdout/stderr already). Filters use `tracing`'s
//! `EnvFilter` syntax (`debug`, `snas_agent=debug,info`). Text is coloured only on a terminal.

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter: the flag, else `SNAS_LOG`, else `RUST_LOG`, else `default`. A filter that does
/// not parse is reported and replaced by `default`.
pub fn filter(flag: Option<&str>, default: &str) -> EnvFilter {
    let chosen = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("SNAS_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|s| !s.trim().is_empty());
    match chosen {
        Some(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("snas: log filter `{spec}` is not valid ({e}); using `{default}`");
            EnvFilter::new(default)
        }),
        None => EnvFilter::new(default),
    }
}

/// Installs the subscriber (once; a second call does nothing). Colours only when stderr is a
/// terminal (never into journald, a file or a collector) and `NO_COLOR` is unset.
pub fn init(format: LogFormat, flag: Option<&str>, default: &str) {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(flag, default))
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_and_a_bad_filter_falls_back_to_the_default() {
        assert_eq!(filter(Some("debug"), "warn").to_string(), "debug");
        assert_eq!(filter(Some("=[nope"), "warn").to_string(), "warn");
    }
}
