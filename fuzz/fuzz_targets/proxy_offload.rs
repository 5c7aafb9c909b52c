//! Fuzz the proxy's offload helpers on untrusted packets: the virtio-net header handling of
//! packets from jobs (`prepare_to_kernel`) and from the internet (`finish_from_kernel`, with
//! the first 10 bytes as the kernel's header), and software segmentation, whose segments must
//! add up to what the pacers charge. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snas_proxy::gso;
use snas_proxy::vnet::{self, Finished, VnetHdr, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN + 2 {
        return;
    }
    let (hdr, rest) = data.split_at(VNET_HDR_LEN);
    let mtu = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let mut packet = rest[2..].to_vec();
    let len = packet.len();
    let h = vnet::prepare_to_kernel(&mut packet, mtu);
    assert_eq!(packet.len(), len, "prepare never changes the length");
    if h.is_gso() {
        assert!(len > mtu, "only packets above the MTU become super-packets");
    }
    let mut packet = rest[2..].to_vec();
    let hdr: [u8; VNET_HDR_LEN] = hdr.try_into().expect("split at the header length");
    if let Ok(Finished::Segment { mtu: seg }) =
        vnet::finish_from_kernel(&VnetHdr::decode(&hdr), &mut packet)
    {
        let mut scratch = vec![0u8; seg.max(1)];
        let mut lens = Vec::new();
        if gso::segment_tcp(&packet, seg, &mut scratch, |s| lens.push(s.len())).is_ok()
            && gso::needs_segmenting(&packet, seg)
        {
            assert_eq!(lens, gso::segment_lens(&packet, seg).collect::<Vec<_>>());
            assert_eq!(lens.iter().sum::<usize>(), gso::wire_len(&packet, seg));
        }
    }
});
