//! Egress proxy: sans-IO core (conntrack, NAT ports, token bucket, pacer).
#![forbid(unsafe_code)]

pub mod clock;
pub mod conntrack;
pub mod nat;
pub mod token_bucket;
pub mod wheel;
