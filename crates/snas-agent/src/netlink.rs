//! A small synchronous rtnetlink client.
//!
//! Owns one `NETLINK_ROUTE` socket and the handful of requests job set-up needs (veth pair with
//! its peer created inside a namespace, addresses, link up, default route, delete, lookup).
//!
//! Why this shape: messages are built and parsed with `netlink-packet-route` (well kept, used by
//! `rtnetlink`), sent over a blocking `netlink-sys` socket. The async `rtnetlink` crate would need
//! a tokio runtime in every thread that enters a job's namespace; a blocking socket is simpler,
//! and a netlink socket stays bound to the namespace of the thread that opened it, which is how
//! one set-up thread talks to both the host and the job namespace. Spawning `ip` is not an
//! option: a fork/exec per step costs more than the whole set-up budget.
//!
//! # Invariants
//! - Every request carries `NLM_F_ACK` and [`Rtnl::request`] returns only after the kernel's
//!   ack (or error) for that sequence number, so requests are strictly ordered.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Errors from a netlink request. The message names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure (open, send, receive).
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request.
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be parsed.
    #[error("{op}: cannot parse netlink answer: {detail}")]
    Decode { op: String, detail: String },
}

impl NetlinkError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A blocking rtnetlink socket bound to the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Rtnl, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends `msg` and collects the answers up to the kernel's ack.
    pub fn request(
        &mut self,
        op: impl Fn() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0).map_err(NetlinkError::Socket)?;

        let mut answers = Vec::new();
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(NetlinkError::Socket)?;
            let mut off = 0;
            while off < n {
                let chunk = &self.buf[off..n];
                let len = NetlinkBuffer::new_checked(chunk)
                    .map_err(|e| NetlinkError::Decode {
                        op: op(),
                        detail: e.to_string(),
                    })?
                    .length() as usize;
                if len == 0 {
                    break;
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &chunk[..len.min(chunk.len())],
                )
                .map_err(|e| NetlinkError::Decode {
                    op: op(),
                    detail: e.to_string(),
                })?;
                off += (len + 3) & !3;
                if parsed.header.sequence_number != seq {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(code) => Err(NetlinkError::Kernel {
                                op: op(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Creates a veth pair: `host_name` here, `peer_name` inside the namespace `peer_netns_fd`,
    /// both with `mtu`; the peer sends super-packets of at most `peer_gso_max_size` bytes.
    pub fn create_veth_into_netns(
        &mut self,
        host_name: &str,
        peer_name: &str,
        mtu: u32,
        peer_gso_max_size: u32,
        peer_netns_fd: RawFd,
    ) -> Result<(), NetlinkError> {
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(peer_name.to_owned()),
            LinkAttribute::Mtu(mtu),
            LinkAttribute::GsoMaxSize(peer_gso_max_size),
            LinkAttribute::NetNsFd(peer_netns_fd),
        ];
        let mut link = LinkMessage::default();
        link.attributes = vec![
            LinkAttribute::IfName(host_name.to_owned()),
            LinkAttribute::Mtu(mtu),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.request(
            || format!("create veth {host_name} (peer {peer_name})"),
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// The index of interface `name`, or `None` if it does not exist.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link_index_mac(name)?.map(|(i, _)| i))
    }

    /// The index and MAC address of interface `name`, or `None` if it does not exist.
    pub fn link_index_mac(&mut self, name: &str) -> Result<Option<(u32, [u8; 6])>, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        match self.request(
            || format!("look up link {name}"),
            RouteNetlinkMessage::GetLink(link),
            0,
        ) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let mac = l
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
                            _ => None,
                        })
                        .unwrap_or_default();
                    Some((l.header.index, mac))
                }
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The MTU and up flag of interface `index`.
    pub fn link_info(&mut self, index: u32) -> Result<Option<(u32, bool)>, NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        match self.request(
            || format!("look up link #{index}"),
            RouteNetlinkMessage::GetLink(link),
            0,
        ) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let mtu = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Mtu(m) => Some(*m),
                        _ => None,
                    })?;
                    Some((mtu, l.header.flags.contains(LinkFlags::Up)))
                }
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets interface `index` administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(
            || format!("set link #{index} up"),
            RouteNetlinkMessage::SetLink(link),
            0,
        )?;
        Ok(())
    }

    /// Adds `addr/prefix_len` to interface `index`.
    pub fn add_address_v4(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let attributes = vec![
            AddressAttribute::Local(addr.into()),
            AddressAttribute::Address(addr.into()),
        ];
        self.add_address(
            AddressFamily::Inet,
            index,
            addr.into(),
            prefix_len,
            attributes,
        )
    }

    /// Adds the IPv4 default route via `gateway` on interface `index` (main table).
    pub fn add_default_route_v4(
        &mut self,
        gateway: Ipv4Addr,
        index: u32,
    ) -> Result<(), NetlinkError> {
        self.add_default_route(
            AddressFamily::Inet,
            RouteAddress::Inet(gateway),
            index,
            || format!("add default route via {gateway}"),
        )
    }

    /// Adds `addr/prefix_len` to interface `index` without duplicate address detection
    /// (`nodad`): the address is usable at once. Job addresses are unique by construction
    /// (the agent hands them out), and the host's link-local gateway address is alone on its
    /// link.
    pub fn add_address_v6_nodad(
        &mut self,
        index: u32,
        addr: Ipv6Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let attributes = vec![
            AddressAttribute::Address(addr.into()),
            AddressAttribute::Flags(AddressFlags::Nodad),
        ];
        self.add_address(
            AddressFamily::Inet6,
            index,
            addr.into(),
            prefix_len,
            attributes,
        )
    }

    /// Adds `addr/prefix_len` with `attributes` to interface `index` (the request behind the
    /// per-family `add_address_*`).
    fn add_address(
        &mut self,
        family: AddressFamily,
        index: u32,
        addr: std::net::IpAddr,
        prefix_len: u8,
        attributes: Vec<AddressAttribute>,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes = attributes;
        self.request(
            || format!("add address {addr}/{prefix_len} to link #{index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Adds the IPv6 default route via `gateway` (a link-local address) on interface `index`
    /// (main table).
    pub fn add_default_route_v6(
        &mut self,
        gateway: Ipv6Addr,
        index: u32,
    ) -> Result<(), NetlinkError> {
        self.add_default_route(
            AddressFamily::Inet6,
            RouteAddress::Inet6(gateway),
            index,
            || format!("add IPv6 default route via {gateway}"),
        )
    }

    /// Adds a static default route of `family` via `gateway` on interface `index` (main
    /// table); `what` names the request in an error.
    fn add_default_route(
        &mut self,
        family: AddressFamily,
        gateway: RouteAddress,
        index: u32,
        what: impl Fn() -> String,
    ) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = vec![RouteAttribute::Gateway(gateway), RouteAttribute::Oif(index)];
        self.request(
            what,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// The IPv4 default gateway of the main table, if any.
    pub fn default_gateway_v4(&mut self) -> Result<Option<(Ipv4Addr, u32)>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let answers = self.request(
            || "dump routes".to_owned(),
            RouteNetlinkMessage::GetRoute(msg),
            netlink_packet_core::NLM_F_DUMP,
        )?;
        Ok(answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 0
                    && r.header.table == RouteHeader::RT_TABLE_MAIN =>
            {
                let gw = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                    _ => None,
                })?;
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(o) => Some(*o),
                    _ => None,
                })?;
                Some((gw, oif))
            }
            _ => None,
        }))
    }

    /// The IPv4 addresses (with prefix length) on interface `index`.
    pub fn addresses_v4(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let answers = self.request(
            || "dump addresses".to_owned(),
            RouteNetlinkMessage::GetAddress(msg),
            netlink_packet_core::NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(std::net::IpAddr::V4(v4)) => {
                            Some((*v4, a.header.prefix_len))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Deletes interface `name` (a veth takes its peer with it). `Ok(false)` if it did not exist.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        match self.request(
            || format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(link),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
