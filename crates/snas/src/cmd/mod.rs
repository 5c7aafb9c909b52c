//! Subcommand implementations, one module per command group.

pub mod agent;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod testbed;
