//! Fuzz the first-payload parsers of the name check: TLS ClientHello (records and bare
//! messages), HTTP/1.x request heads, and the TCP classification over any split of the bytes
//! into two out-of-order segments. Any panic is a bug; a classification must not change when
//! the same bytes arrive in another order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_proxy::names::{classify_tcp, http, tls, Assembler};

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    let _ = tls::client_hello_from_records(data, &mut scratch, 4096);
    let _ = tls::client_hello_message(data, 4096);
    let _ = http::request_head(data);
    let whole = classify_tcp(data, true, &mut scratch, 4096);
    if data.is_empty() {
        return;
    }
    let cut = usize::from(data[0]) * data.len() / 256;
    let mut a = Assembler::new(4096);
    a.add(cut as u64, &data[cut..]);
    a.add(0, &data[..cut]);
    let reassembled = classify_tcp(a.prefix(), true, &mut scratch, 4096);
    if data.len() <= 4096 {
        assert_eq!(whole, reassembled);
    }
});
