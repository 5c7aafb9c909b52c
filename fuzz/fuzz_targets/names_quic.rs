//! Fuzz the QUIC client Initial reader of the name check: long headers, header protection and
//! AEAD opening under the keys of the packet's own DCID, frame parsing and CRYPTO reassembly.
//! The input is used twice: as a datagram, and as the plaintext frames of an Initial sealed
//! with a fixed DCID (so the frame parser sees inputs past the AEAD). Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_proxy::names::quic::{self, build::client_initial, InitialKeys};
use snas_proxy::names::{tls, Assembler};

fn read(datagram: &[u8]) {
    let Ok(h) = quic::initial_header(datagram) else {
        return;
    };
    let Ok(keys) = InitialKeys::client(h.version, h.dcid) else {
        return;
    };
    let (off, end) = (h.pn_offset, h.packet_len);
    let mut packet = datagram[..end].to_vec();
    if let Ok(frames) = quic::open_initial(&keys, &mut packet, off) {
        let mut s = Assembler::new(4096);
        let _ = quic::crypto_frames(frames, |o, d| {
            s.add(o, d);
        });
        let _ = tls::client_hello_message(s.prefix(), 4096);
    }
}

fuzz_target!(|data: &[u8]| {
    read(data);
    let sealed = client_initial(quic::V1, &[0x5a; 8], 0, data, 1200);
    read(&sealed);
});
