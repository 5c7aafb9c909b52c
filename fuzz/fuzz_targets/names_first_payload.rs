//! Fuzz the first-payload parsers of the name check: TLS ClientHello (records and bare
//! messages), HTTP/1.x request heads, and the TCP classification over any split of the bytes
//! into two out-of-order segments, and the in-place classification of a first payload packet.
//! Any panic is a bug; a classification must not change when the same bytes arrive in another
//! order, nor between the in-place decision and the hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_proxy::names::{classify_first_packet, classify_tcp, http, tls, Assembler};

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    let _ = tls::client_hello_from_records(data, &mut scratch, 4096);
    let _ = tls::client_hello_message(data, 4096);
    let _ = http::request_head(data);
    let whole = classify_tcp(data, true, &mut scratch, 4096);
    if data.is_empty() {
        return;
    }
    // Decided in place from one packet: what the hold decides of the same packet.
    let fin = data[0] & 1 == 1;
    let mut held = Assembler::new(4096);
    held.add(0, data);
    assert_eq!(
        classify_first_packet(data, fin, &mut scratch, 4096),
        classify_tcp(held.prefix(), fin || held.full(), &mut scratch, 4096)
    );
    let cut = usize::from(data[0]) * data.len() / 256;
    let mut a = Assembler::new(4096);
    a.add(cut as u64, &data[cut..]);
    a.add(0, &data[..cut]);
    let reassembled = classify_tcp(a.prefix(), true, &mut scratch, 4096);
    if data.len() <= 4096 {
        assert_eq!(whole, reassembled);
    }
});
