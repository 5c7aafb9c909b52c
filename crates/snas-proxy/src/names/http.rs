//! The names of an HTTP/1.x request head: the `Host` header and the authority of an
//! absolute-form or CONNECT (authority-form) request target. Parsed with `httparse` (the parser
//! hyper uses), so what we read is what common servers read.
//!
//! # Rules
//! - A request whose request line parsed (`METHOD SP target SP HTTP/1.x`) but whose head
//!   `httparse` rejects is [`Head::Malformed`], not "something else": a lenient server might
//!   still read a name from it.
//! - More than one `Host` header is malformed (RFC 9112 §3.2: a server must answer 400).
//! - Every name the head carries is returned; the caller checks all of them.
//! - An unfinished first line waits for more bytes only while its method could still be one of
//!   [`METHODS`] (or the method is complete): a client that sends `hi` and waits for an answer
//!   is not HTTP and is not held. The cost: a request with an unregistered method whose first
//!   segment stops inside the method is "not HTTP" (`require_name = true` refuses it).

/// Headers read at most; more is [`Head::Malformed`].
pub const MAX_HEADERS: usize = 64;
/// The methods of the HTTP method registry (and common extensions) a request may start with.
pub const METHODS: [&str; 30] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "QUERY",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PURGE",
    "LINK",
    "UNLINK",
    "ACL",
];

/// Longest DNS name in text form.
const MAX_NAME: usize = 253;

/// What the bytes seen so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Could be an HTTP/1.x request head; more bytes are needed.
    Incomplete,
    /// Not an HTTP/1.x request.
    NotHttp,
    /// An HTTP/1.x request line with a head no server should accept.
    Malformed(&'static str),
    /// A complete head; the names in it, lower-cased, ports and brackets removed (empty: none).
    Request {
        /// Names from the request target and the `Host` header, in that order, deduplicated.
        names: Vec<String>,
    },
}

/// Parses the request head at the start of `stream`.
pub fn request_head(stream: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(stream) {
        Ok(httparse::Status::Partial) if may_become_request(stream) => Head::Incomplete,
        Ok(httparse::Status::Partial) => Head::NotHttp,
        Ok(httparse::Status::Complete(_)) => names_of(&req),
        Err(e) if has_request_line(stream) => Head::Malformed(match e {
            httparse::Error::TooManyHeaders => "too many headers",
            httparse::Error::HeaderName => "header name",
            httparse::Error::HeaderValue => "header value",
            httparse::Error::NewLine => "line ending",
            _ => "request head",
        }),
        Err(_) => Head::NotHttp,
    }
}

/// Whether a head `httparse` found unfinished is worth waiting for: its method is complete (a
/// space follows it) or is a prefix of a registered method.
fn may_become_request(stream: &[u8]) -> bool {
    let start = stream
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(stream.len());
    let s = &stream[start..];
    match s.iter().position(|b| *b == b' ') {
        Some(_) => true,
        None => METHODS.iter().any(|m| m.as_bytes().starts_with(s)),
    }
}

/// Whether `stream` starts with a complete `token SP target SP HTTP/1.x` line.
fn has_request_line(stream: &[u8]) -> bool {
    let start = stream
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(stream.len());
    let s = &stream[start..];
    let Some(end) = s.iter().position(|b| *b == b'\n') else {
        return false;
    };
    let line = s[..end].strip_suffix(b"\r").unwrap_or(&s[..end]);
    let mut parts = line.split(|b| *b == b' ');
    let (Some(m), Some(t), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !m.is_empty() && !t.is_empty() && v.starts_with(b"HTTP/1.")
}

fn names_of(req: &httparse::Request<'_, '_>) -> Head {
    let mut names: Vec<String> = Vec::new();
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    if method.eq_ignore_ascii_case("CONNECT") {
        match authority_host(target) {
            Some(h) => names.push(h),
            None => return Head::Malformed("CONNECT target"),
        }
    } else if let Some(rest) = absolute_form(target) {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        match authority_host(authority) {
            Some(h) => names.push(h),
            None => return Head::Malformed("request target authority"),
        }
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    if let Some(h) = hosts.next() {
        if hosts.next().is_some() {
            return Head::Malformed("two Host headers");
        }
        let Ok(v) = std::str::from_utf8(h.value) else {
            return Head::Malformed("Host header");
        };
        match authority_host(v.trim_matches([' ', '\t'])) {
            Some(n) if !names.contains(&n) => names.push(n),
            Some(_) => {}
            None => return Head::Malformed("Host header"),
        }
    }
    Head::Request { names }
}

/// The part after `scheme://` of an absolute-form target (`None`: origin or asterisk form).
fn absolute_form(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    let ok = !scheme.is_empty()
        && scheme.as_bytes()[0].is_ascii_alphabetic()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    ok.then_some(rest)
}

/// The host of an authority (`[userinfo@]host[:port]`), lower-cased, brackets of an IPv6
/// literal removed, one trailing dot removed. `None`: empty or not a plausible host.
fn authority_host(authority: &str) -> Option<String> {
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        let (inside, after) = v6.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        inside
    } else {
        match hostport.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => hostport,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_NAME || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Head {
        Head::Request {
            names: v.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn the_host_header_is_the_name_without_its_port() {
        let h = request_head(b"GET /x HTTP/1.1\r\nHost: API.example.com:8080\r\n\r\n");
        assert_eq!(h, names(&["api.example.com"]));
    }

    #[test]
    fn absolute_form_and_host_are_both_returned() {
        let h = request_head(
            b"GET http://a.example.com/p?q HTTP/1.1\r\nHost: blocked.example.com\r\n\r\n",
        );
        assert_eq!(h, names(&["a.example.com", "blocked.example.com"]));
        let h = request_head(b"GET http://a.example.com HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
        assert_eq!(h, names(&["a.example.com"]));
    }

    #[test]
    fn connect_names_its_authority() {
        let h = request_head(b"CONNECT evil.example.net:443 HTTP/1.1\r\n\r\n");
        assert_eq!(h, names(&["evil.example.net"]));
        let h = request_head(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n");
        assert_eq!(h, names(&["2001:db8::1"]));
    }

    #[test]
    fn a_request_without_a_name_has_none() {
        assert_eq!(request_head(b"GET / HTTP/1.0\r\n\r\n"), names(&[]));
    }

    #[test]
    fn two_host_headers_are_malformed() {
        let h =
            request_head(b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n");
        assert_eq!(h, Head::Malformed("two Host headers"));
    }

    #[test]
    fn a_request_line_with_a_bad_head_is_malformed_not_other() {
        let h = request_head(b"GET / HTTP/1.1\r\nHost : evil.example.net\r\n\r\n");
        assert!(matches!(h, Head::Malformed(_)), "{h:?}");
    }

    #[test]
    fn partial_heads_wait_and_other_protocols_are_not_http() {
        assert_eq!(request_head(b"GE"), Head::Incomplete);
        assert_eq!(request_head(b"\r\nPROPF"), Head::Incomplete);
        assert_eq!(request_head(b"hi"), Head::NotHttp);
        assert_eq!(request_head(b"FOO /x"), Head::Incomplete);
        assert_eq!(
            request_head(b"GET / HTTP/1.1\r\nHost: a.exa"),
            Head::Incomplete
        );
        assert_eq!(request_head(b"SSH-2.0-OpenSSH_9.6\r\n"), Head::NotHttp);
        assert_eq!(request_head(b"\x16\x03\x01\x02\x00"), Head::NotHttp);
        assert_eq!(
            request_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Head::NotHttp
        );
        assert_eq!(request_head(b"EHLO client.example.com\r\n"), Head::NotHttp);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = request_head(&b);
        }

        #[test]
        fn every_prefix_of_a_head_is_incomplete(
            name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){1,4}",
            path in "/[a-zA-Z0-9/._-]{0,200}",
            cut in 0usize..400,
        ) {
            let head = format!("GET {path} HTTP/1.1\r\nUser-Agent: t\r\nHost: {name}\r\nAccept: */*\r\n\r\n");
            let cut = cut.min(head.len() - 1);
            prop_assert_eq!(request_head(&head.as_bytes()[..cut]), Head::Incomplete);
            prop_assert_eq!(request_head(head.as_bytes()), Head::Request { names: vec![name] });
        }
    }
}
