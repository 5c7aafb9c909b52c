//! The `server_name` of a TLS ClientHello, from the first bytes of a TCP stream (records) or of
//! a QUIC CRYPTO stream (handshake messages).
//!
//! Our own parser rather than a TLS library: we need one extension of one message, on bytes a
//! sandbox chose, without a handshake state machine; rustls' parsers are not public API and
//! pulling a TLS implementation in to read 2 fields would put far more code in front of
//! untrusted input than these ~200 lines. It follows RFC 8446 §4.1.2 and RFC 6066 §3 strictly:
//! anything a server would reject as a ClientHello (length fields that disagree, two
//! `server_name` extensions, two host names) is [`Hello::Malformed`], so what we check is what a
//! server would read.
//!
//! # Limits
//! - A ClientHello spread over several records is reassembled (up to `max` bytes of handshake
//!   message); records of another content type before it are not TLS as far as the check goes.
//! - With Encrypted Client Hello the *outer* ClientHello is what is on the wire: its
//!   `server_name` (the client-facing server's public name) is what is returned.

/// The TLS content type of handshake records.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// The `server_name` extension (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// Longest DNS name in text form.
const MAX_NAME: usize = 253;

/// What the bytes seen so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Could be a ClientHello; more bytes are needed.
    Incomplete,
    /// Not a TLS handshake record / message.
    NotTls,
    /// A TLS handshake that is not a well-formed ClientHello (or longer than allowed).
    Malformed(&'static str),
    /// A complete ClientHello; its host name, lower-cased, trailing dot removed (`None`: no
    /// `server_name` extension).
    ClientHello {
        /// The `host_name` of the `server_name` extension.
        sni: Option<String>,
    },
}

/// Whether `stream` starts like a TLS handshake record (content type, major version 3).
pub fn looks_like_tls(stream: &[u8]) -> bool {
    match stream {
        [] => false,
        [t] => *t == HANDSHAKE,
        [t, major, ..] => *t == HANDSHAKE && *major == 3,
    }
}

/// Parses the ClientHello at the start of a TCP stream (TLS records). `scratch` is reused for
/// the reassembled handshake message; `max` bounds it.
pub fn client_hello_from_records(stream: &[u8], scratch: &mut Vec<u8>, max: usize) -> Hello {
    scratch.clear();
    if !looks_like_tls(stream) {
        return Hello::NotTls;
    }
    let mut rest = stream;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        let (ty, major, minor) = (rest[0], rest[1], rest[2]);
        if ty != HANDSHAKE {
            // A ChangeCipherSpec or alert before the ClientHello ended.
            return Hello::Malformed("non-handshake record inside the ClientHello");
        }
        if major != 3 || minor > 4 {
            return Hello::Malformed("record version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::Malformed("record length");
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            // Take what has arrived of this record: enough, perhaps, to see a bad message.
            let partial = &rest[5..];
            if scratch.len() + partial.len() > max {
                return Hello::Malformed("ClientHello longer than the inspection limit");
            }
            scratch.extend_from_slice(partial);
            return client_hello_message(scratch, max);
        };
        if scratch.len() + fragment.len() > max {
            return Hello::Malformed("ClientHello longer than the inspection limit");
        }
        scratch.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        match client_hello_message(scratch, max) {
            Hello::Incomplete => continue,
            done => return done,
        }
    }
}

/// Parses a ClientHello handshake message (type, 24-bit length, body) at the start of `msg`
/// (the QUIC CRYPTO stream, or the reassembled records). Bytes after the message are ignored.
pub fn client_hello_message(msg: &[u8], max: usize) -> Hello {
    let Some(&ty) = msg.first() else {
        return Hello::Incomplete;
    };
    if ty != CLIENT_HELLO {
        return Hello::NotTls;
    }
    if msg.len() < 4 {
        return Hello::Incomplete;
    }
    let len = usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
    if len + 4 > max {
        return Hello::Malformed("ClientHello longer than the inspection limit");
    }
    match msg.get(4..4 + len) {
        Some(body) => client_hello_body(body),
        None => Hello::Incomplete,
    }
}

/// A cursor over a length-delimited structure; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn client_hello_body(body: &[u8]) -> Hello {
    let mut r = Reader(body);
    let Some(_legacy_version) = r.u16() else {
        return Hello::Malformed("truncated ClientHello");
    };
    if r.take(32).is_none() {
        return Hello::Malformed("truncated random");
    }
    match r.vec8() {
        Some(s) if s.len() <= 32 => {}
        _ => return Hello::Malformed("session id"),
    }
    match r.vec16() {
        Some(c) if !c.is_empty() && c.len() % 2 == 0 => {}
        _ => return Hello::Malformed("cipher suites"),
    }
    match r.vec8() {
        Some(c) if !c.is_empty() => {}
        _ => return Hello::Malformed("compression methods"),
    }
    if r.is_empty() {
        // A TLS 1.2 ClientHello may end here: no extensions, so no name.
        return Hello::ClientHello { sni: None };
    }
    let Some(exts) = r.vec16() else {
        return Hello::Malformed("extensions length");
    };
    if !r.is_empty() {
        return Hello::Malformed("bytes after the extensions");
    }
    let mut exts = Reader(exts);
    let mut sni = None;
    let mut seen_sni = false;
    while !exts.is_empty() {
        let (Some(ty), Some(data)) = (exts.u16(), exts.vec16()) else {
            return Hello::Malformed("extension length");
        };
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Hello::Malformed("two server_name extensions");
        }
        seen_sni = true;
        match server_name(data) {
            Ok(n) => sni = n,
            Err(why) => return Hello::Malformed(why),
        }
    }
    Hello::ClientHello { sni }
}

/// The `host_name` of a `server_name` extension body (RFC 6066 §3).
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(data);
    let list = r.vec16().ok_or("server_name list length")?;
    if !r.is_empty() {
        return Err("bytes after the server_name list");
    }
    let mut list = Reader(list);
    let mut host = None;
    while !list.is_empty() {
        let ty = list.u8().ok_or("server_name entry")?;
        let name = list.vec16().ok_or("server_name entry length")?;
        if ty != 0 {
            // Unknown name types are skipped (RFC 6066 names only host_name).
            continue;
        }
        if host.is_some() {
            return Err("two host names in server_name");
        }
        host = Some(host_name(name)?);
    }
    Ok(host)
}

/// A host name as sent: printable ASCII, lower-cased, one trailing dot removed.
fn host_name(name: &[u8]) -> Result<String, &'static str> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME {
        return Err("host name length");
    }
    if !name.iter().all(|b| b.is_ascii_graphic()) {
        return Err("host name is not printable ASCII");
    }
    Ok(name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// Test and fuzz helpers: well-formed ClientHellos of a chosen size.
pub mod build {
    /// A TLS 1.3-style ClientHello handshake message (type, length, body) with `sni` (if any),
    /// padded with a `padding` extension (RFC 7685) of `pad` bytes.
    pub fn client_hello_message(sni: Option<&str>, pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        // supported_versions: TLS 1.3
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        if pad > 0 {
            exts.extend_from_slice(&21u16.to_be_bytes());
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.resize(exts.len() + pad, 0);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x5a; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// `msg` in TLS handshake records of at most `record` bytes each.
    pub fn records(msg: &[u8], record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(record.max(1)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::{client_hello_message as hello, records};
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 4096;

    fn parse(stream: &[u8]) -> Hello {
        client_hello_from_records(stream, &mut Vec::new(), MAX)
    }

    #[test]
    fn a_one_record_client_hello_yields_its_lower_cased_name() {
        let s = records(&hello(Some("API.Example.com."), 0), 16384);
        assert_eq!(
            parse(&s),
            Hello::ClientHello {
                sni: Some("api.example.com".into())
            }
        );
    }

    #[test]
    fn a_post_quantum_sized_hello_split_anywhere_is_incomplete_until_its_last_byte() {
        let s = records(&hello(Some("api.example.com"), 1500), 16384);
        assert!(s.len() > 1500);
        for cut in 1..s.len() {
            assert_eq!(parse(&s[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert!(matches!(parse(&s), Hello::ClientHello { sni: Some(_) }));
    }

    #[test]
    fn a_hello_fragmented_over_many_records_is_reassembled() {
        let s = records(&hello(Some("a.example.com"), 300), 7);
        assert_eq!(
            parse(&s),
            Hello::ClientHello {
                sni: Some("a.example.com".into())
            }
        );
    }

    #[test]
    fn no_server_name_is_a_hello_without_a_name() {
        let s = records(&hello(None, 10), 16384);
        assert_eq!(parse(&s), Hello::ClientHello { sni: None });
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"\x16\x01"), Hello::NotTls);
        assert_eq!(parse(b""), Hello::NotTls);
        assert_eq!(parse(b"\x16"), Hello::Incomplete);
    }

    #[test]
    fn a_hello_over_the_limit_is_malformed_not_waited_for() {
        let s = records(&hello(Some("a.example.com"), 5000), 16384);
        assert!(matches!(parse(&s[..100]), Hello::Malformed(_)));
    }

    #[test]
    fn two_names_or_two_extensions_are_malformed() {
        let mut m = hello(Some("a.example.com"), 0);
        // Append a second server_name extension by hand.
        let ext = [0u8, 0, 0, 8, 0, 6, 0, 0, 3, b'b', b'.', b'c'];
        m.extend_from_slice(&ext);
        // Fix the lengths: handshake length, extensions length.
        let body_len = m.len() - 4;
        m[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        let ext_len_at = 4 + 2 + 32 + 1 + 4 + 2;
        let el = u16::from_be_bytes([m[ext_len_at], m[ext_len_at + 1]]) + ext.len() as u16;
        m[ext_len_at..ext_len_at + 2].copy_from_slice(&el.to_be_bytes());
        assert_eq!(
            client_hello_message(&m, MAX),
            Hello::Malformed("two server_name extensions")
        );
    }

    #[test]
    fn an_alert_record_inside_the_hello_is_malformed() {
        let mut s = records(&hello(Some("a.example.com"), 100), 50);
        s[55] = 21;
        assert!(matches!(parse(&s), Hello::Malformed(_)));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = parse(&b);
            let _ = client_hello_message(&b, MAX);
        }

        #[test]
        fn any_name_survives_any_record_split(
            name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){1,4}",
            pad in 0usize..2000,
            record in 1usize..3000,
        ) {
            let s = records(&hello(Some(&name), pad), record);
            prop_assert_eq!(parse(&s), Hello::ClientHello { sni: Some(name) });
        }

        #[test]
        fn a_prefix_of_a_hello_is_never_a_different_answer(
            pad in 0usize..1800,
            cut in 0usize..2000,
        ) {
            let s = records(&hello(Some("x.example.com"), pad), 1400);
            let cut = cut.clamp(1, s.len());
            let r = parse(&s[..cut]);
            prop_assert!(r == Hello::Incomplete || cut == s.len(), "{:?} at {}", r, cut);
        }

        #[test]
        fn corrupting_a_byte_never_panics(
            pad in 0usize..600,
            at in 0usize..800,
            v in any::<u8>(),
        ) {
            let mut s = records(&hello(Some("x.example.com"), pad), 16384);
            let at = at % s.len();
            s[at] = v;
            let _ = parse(&s);
        }
    }
}
