//! `snas-policy`: the SNAS per-job egress policy — authoring format, HOST_PORT grammar, signed
//! form (JWS, EdDSA), trust bundles, and the compiled matcher both enforcement tiers consult.
//!
//! Pure: no I/O, no clock reads. The one exception is [`bundle_fs`], which reads public key
//! files, so every component loads trust bundles the same way. Callers pass `now` in.
//!
//! # Layout
//! - [`identity`]: `tenant_id` / `job_key` derivations (overlay wire contract).
//! - [`units`]: [`Bps`] and TTL parsing.
//! - [`hostport`]: the HOST_PORT grammar and port ranges.
//! - [`rules`]: one validated egress rule ([`EgressRule`]), protocols.
//! - [`ranges`]: the always-denied address ranges.
//! - [`limits`]: per-job limits and their defaults.
//! - [`authoring`]: TOML → [`PolicyDraft`], with line-numbered errors.
//! - [`claims`]: [`PolicyDraft`] and the signed [`PolicyClaims`].
//! - [`keys`], [`bundle`], [`bundle_fs`]: Ed25519 keys, trust bundles.
//! - [`json`]: the strict JSON profile (I-JSON: no duplicate keys, ...) the header and claims are
//!   read with.
//! - [`jws`]: [`sign`] and [`verify`].
//! - [`revocation`]: signed revocations and the store verifiers keep them in.
//! - [`matcher`]: [`compile`] → [`Matcher`] → [`Decision`].
//! - [`audit`]: the audit line both tiers write and `snas run` reads.
//! - [`binding`]: the TTL clamp and grace both tiers apply to addresses learnt from DNS.
//! - [`suggest`]: a policy learnt from audit logs (`snas policy suggest`).
//! - [`schema`]: the JSON Schema of the authoring format (`snas policy schema`).
//! - `synthetic` (hidden): the 10,000-rule benchmark policy and its lookup probes.
//!
//! # Flow
//! ```text
//! TOML --parse_policy--> PolicyDraft --to_claims(jti, serial, now)--> PolicyClaims --sign--> JWS
//! JWS --verify(bundle, now)--> VerifiedPolicy --compile--> Matcher --check_*--> Decision
//! ```
#![forbid(unsafe_code)]

pub mod audit;
pub mod authoring;
pub mod binding;
pub mod bundle;
pub mod bundle_fs;
pub mod claims;
pub mod hostport;
pub mod identity;
pub mod json;
pub mod jws;
pub mod keys;
pub mod limits;
pub mod matcher;
pub mod ranges;
pub mod revocation;
pub mod revocation_fs;
pub mod rules;
pub mod schema;
pub mod suggest;
#[doc(hidden)]
pub mod synthetic;
pub mod units;

pub use authoring::{parse_policy, parse_policy_bytes, CheckError, CheckErrors, MAX_INPUT};
pub use bundle::{BundleError, TrustBundle};
pub use claims::{check_lineage, LineageError, Mode, PolicyClaims, PolicyDraft};
pub use hostport::{HostPort, PortRange};
/// The network type of cidr rules and infrastructure ranges ([`compile_with`]), re-exported so
/// that callers name the same type.
pub use ipnet::IpNet;
pub use jws::{sign, verify, SignError, VerifiedPolicy, VerifyError, CLOCK_SKEW};
pub use keys::{KeyError, PolicyKey};
pub use limits::Limits;
pub use matcher::{compile, compile_with, Decision, DenyReason, Matcher, NameVerdict};
pub use rules::{DenyRule, EgressRule, RuleFields, RuleProtocol, Transport};
pub use units::Bps;
