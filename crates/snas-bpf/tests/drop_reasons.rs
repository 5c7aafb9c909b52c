//! The C drop-reason header and `snas_wire::Reason` name the same numbers. No root needed.

use std::collections::BTreeMap;

use snas_wire::Reason;

fn c_reasons() -> BTreeMap<String, u8> {
    snas_bpf::DROP_REASONS_H
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            if it.next()? != "#define" {
                return None;
            }
            let name = it.next()?.strip_prefix("SNAS_DROP_")?;
            if name == "COUNT" {
                return None;
            }
            Some((name.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn c_header_names_every_reason_with_its_number() {
    let c = c_reasons();
    for r in Reason::ALL {
        let name = r.name().to_ascii_uppercase();
        assert_eq!(
            c.get(&name),
            Some(&r.code()),
            "SNAS_DROP_{name} must be {}",
            r.code()
        );
    }
    assert_eq!(
        c.len(),
        Reason::ALL.len(),
        "C header has reasons Rust does not know: {c:?}"
    );
}

#[test]
fn c_header_count_matches_rust() {
    let count = snas_bpf::DROP_REASONS_H
        .lines()
        .find_map(|l| l.strip_prefix("#define SNAS_DROP_COUNT "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    assert_eq!(count, Some(Reason::COUNT));
}
