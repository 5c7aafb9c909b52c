//! Subcommand implementations, one module per command group.

pub mod policy;
pub mod testbed;
