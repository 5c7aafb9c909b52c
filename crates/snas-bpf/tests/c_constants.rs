//! The C headers and the Rust constants name the same numbers: the overlay (`geneve.h`,
//! `common.h` against `snas_wire::geneve`) and the map sizes (`maps.h` against `snas_bpf`).
//! No root needed. (Drop reasons have their own check: `tests/drop_reasons.rs`.)

use std::collections::BTreeMap;

use snas_wire::geneve;

const COMMON_H: &str = include_str!("../bpf/lib/common.h");

/// `#define NAME VALUE` lines of a header (decimal or 0x hex; trailing comments ignored).
fn defines(header: &str) -> BTreeMap<String, u64> {
    header
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            if it.next()? != "#define" {
                return None;
            }
            let name = it.next()?;
            let v = it.next()?;
            let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok()?,
                None => v.parse().ok()?,
            };
            Some((name.to_string(), n))
        })
        .collect()
}

fn define(header: &str, name: &str) -> u64 {
    defines(header)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("the header defines no {name}"))
}

#[test]
fn geneve_header_constants_match_snas_wire() {
    let h = snas_bpf::GENEVE_H;
    assert_eq!(
        define(h, "GENEVE_OVERHEAD"),
        geneve::OVERLAY_OVERHEAD as u64
    );
    assert_eq!(
        define(h, "GENEVE_HDR_LEN"),
        geneve::GENEVE_HEADER_LEN as u64
    );
    assert_eq!(
        define(h, "GENEVE_OPT_CLASS"),
        u64::from(geneve::SNAS_OPTION_CLASS)
    );
    assert_eq!(
        define(h, "GENEVE_OPT_TYPE"),
        u64::from(geneve::SNAS_OPTION_TYPE)
    );
    assert_eq!(snas_bpf::OVERLAY_OVERHEAD, geneve::OVERLAY_OVERHEAD);
}

#[test]
fn the_programs_default_geneve_port_is_snas_wires() {
    let line = COMMON_H
        .lines()
        .find(|l| l.contains("cfg_geneve_port ="))
        .expect("common.h declares cfg_geneve_port");
    let value: u16 = line
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().trim_end_matches(';').trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read the port of `{line}`"));
    assert_eq!(value, geneve::GENEVE_PORT);
    let node = snas_bpf::NodeConfig::new("n", 1, std::net::Ipv4Addr::LOCALHOST, 1500);
    assert_eq!(node.geneve_port, geneve::GENEVE_PORT);
}

#[test]
fn map_sizes_match_the_rust_limits() {
    let h = snas_bpf::MAPS_H;
    assert_eq!(
        define(h, "MAX_PORT_RULES"),
        snas_bpf::config::MAX_PORT_RULES as u64
    );
    assert_eq!(
        define(h, "MAX_PROXIES"),
        snas_bpf::tier1::MAX_PROXIES as u64
    );
    assert_eq!(define(h, "MAGLEV_M"), snas_bpf::maglev::TABLE_SIZE as u64);
}

#[test]
fn the_audit_mode_flag_and_event_kind_match_the_rust_side() {
    let h = snas_bpf::MAPS_H;
    assert_eq!(
        define(h, "JOB_F_AUDIT"),
        u64::from(snas_bpf::config::JOB_F_AUDIT)
    );
    assert_eq!(define(h, "AUDIT_WOULD_DENY"), 3);
}
