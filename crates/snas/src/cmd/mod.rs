//! Subcommand implementations, one module per command group.

pub mod agent;
pub mod policy;
pub mod testbed;
