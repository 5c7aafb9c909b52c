//! Packet views and builders shared by the proxy, the agent and tests. No I/O.
#![forbid(unsafe_code)]

pub mod reason;
pub use reason::Reason;
