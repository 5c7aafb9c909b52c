//! Fuzz the overlay parsers: full decapsulation (outer IPv4/UDP/GENEVE) and the UDP-payload entry
//! point, plus re-encapsulation of whatever they accept. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_wire::geneve::{self, GeneveHeader, OuterParams, GENEVE_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = geneve::decapsulate(data) {
        assert_eq!(&data[d.inner_range.clone()], d.inner);
        let outer = OuterParams {
            src: d.outer_dst,
            dst: d.outer_src,
            src_port: d.outer_src_port,
        };
        let again = geneve::encapsulate(&outer, &d.option, d.inner)
            .expect("accepted inner re-encapsulates");
        let back = geneve::decapsulate(&again).expect("our own encapsulation parses");
        assert_eq!((back.option, back.inner), (d.option, d.inner));
    }
    if let Ok(g) = geneve::parse_payload(data) {
        let mut hdr = [0u8; GENEVE_HEADER_LEN];
        geneve::write_geneve_header(&mut hdr, &g.option, g.inner_proto)
            .expect("buffer is large enough");
        let mut rebuilt = hdr.to_vec();
        rebuilt.extend_from_slice(&data[g.inner_offset..]);
        let again = geneve::parse_payload(&rebuilt).expect("our own header parses");
        assert_eq!((again.option, again.inner_proto), (g.option, g.inner_proto));
    } else if let Err(e) = geneve::parse_payload(data) {
        let _ = e.reason();
    }
    if let Ok(h) = GeneveHeader::parse(data) {
        for opt in h.options() {
            let _ = opt.map(|o| o.is_critical());
        }
    }
});
