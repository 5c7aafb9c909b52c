#!/usr/bin/env python3
"""SNAS demo workload: what an untrusted job sees from inside its gVisor sandbox.

Run it on the local testbed (root; see docs/sandbox.md):

    snas testbed up                      # once; `snas run` would also do it
    cat > /tmp/demo.toml <<'EOF'
    tenant = "acme"
    job = "demo"
    ttl = "1h"
    [[egress]]
    host = "api.example.com:80"
    [[egress]]
    host = "api.example.com:443"
    [[egress]]
    host = "api.example.com:7"
    protocol = "udp"
    EOF
    snas policy sign --key /run/snas-testbed/snastb/keys/testbed-snastb.key /tmp/demo.toml > /tmp/demo.jwt
    snas run --policy @/tmp/demo.jwt --app examples -- python3 /app/sandbox_demo.py \
        "$(cat /run/snas-testbed/snastb/tls/ca.pem)"

The optional argument is the testbed CA certificate (PEM text): with it the two HTTPS checks
run (the allowed name with its certificate verified, another site's SNI on its address reset);
without it both are skipped, for a policy that does not allow port 443.

Every check prints one line `PASS|FAIL name: what happened (time)`; the exit status is the
number of failed checks (0 = the sandbox behaved as the policy says). The escape attempts
(raw sockets, a forged GENEVE packet to a proxy, DNS to 8.8.8.8, DNS tunnelling) are
expected to be contained; `snas run` prints the audit summary that shows them.
"""

import errno
import os
import random
import socket
import ssl
import struct
import sys
import time
import urllib.request

ALLOWED = "api.example.com"
BLOCKED_NAME = "blocked.example.com"
BLOCKED_IP = "203.0.113.20"
OUTSIDE_NAME = "nothere.example.org"
PROXY_GENEVE = ("192.0.2.21", 6081)
FAST = 2.0  # seconds: "fails fast" means well before any TCP timeout

failures = 0


def check(name, fn):
    global failures
    t0 = time.monotonic()
    try:
        ok, what = fn()
    except Exception as e:  # a check that crashes is a failed check
        ok, what = False, f"{type(e).__name__}: {e}"
    ms = (time.monotonic() - t0) * 1e3
    if not ok:
        failures += 1
    print(f"{'PASS' if ok else 'FAIL'} {name}: {what} ({ms:.0f} ms)", flush=True)


def resolve_allowed():
    addr = socket.gethostbyname(ALLOWED)
    return addr.startswith("203.0.113."), f"{ALLOWED} -> {addr}"


def http_allowed():
    body = urllib.request.urlopen(f"http://{ALLOWED}/", timeout=5).read().decode().strip()
    return body.startswith("hello from"), repr(body)


def name_outside_policy():
    try:
        addrs = socket.getaddrinfo(OUTSIDE_NAME, 80)
        return False, f"resolved to {addrs[0][4][0]}"
    except socket.gaierror as e:
        return True, f"does not resolve ({e.strerror})"


def blocked_name():
    try:
        addr = socket.gethostbyname(BLOCKED_NAME)
        return False, f"resolved to {addr}"
    except socket.gaierror as e:
        return True, f"does not resolve ({e.strerror})"


def blocked_ip_fails_fast():
    t0 = time.monotonic()
    try:
        socket.create_connection((BLOCKED_IP, 80), timeout=10).close()
        return False, "connected"
    except OSError as e:
        took = time.monotonic() - t0
        code = errno.errorcode.get(e.errno, str(e))
        return took < FAST and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET), f"{code} after {took*1e3:.0f} ms"


CA = sys.argv[1] if len(sys.argv) > 1 else None


def https_allowed():
    ctx = ssl.create_default_context(cadata=CA)
    with socket.create_connection((ALLOWED, 443), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=ALLOWED) as t:
            version = t.version()  # read before close: a closed socket reports None
            t.sendall(f"GET / HTTP/1.1\r\nHost: {ALLOWED}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := t.recv(4096):
                data += chunk
    body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
    return body.startswith("hello from"), f"{version}, certificate verified: {body!r}"


def refused(fn):
    # The proxy resets a flow whose first payload names another site: RST, or EOF with nothing.
    try:
        got = fn()
        return not got, f"answered {got[:40]!r}" if got else "closed with no answer"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
        return True, f"reset ({type(e).__name__})"


def http_other_host_on_allowed_address():
    # Domain fronting: the allowed name's address, another site's Host header.
    def go():
        with socket.create_connection((ALLOWED, 80), timeout=5) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {BLOCKED_NAME}\r\nConnection: close\r\n\r\n".encode())
            return s.recv(4096)
    return refused(go)


def tls_other_sni_on_allowed_address():
    def go():
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((ALLOWED, 443), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="evil.example.net") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n")
                return t.recv(4096)
    return refused(go)


def udp_echo_allowed():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"snas-demo", (ALLOWED, 7))
    data, _ = s.recvfrom(100)
    return data == b"snas-demo", f"echo {data!r}"


def raw_socket():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        return False, "raw socket created"
    except OSError as e:
        return True, f"refused ({errno.errorcode.get(e.errno, e.errno)})"


def forged_geneve():
    # A GENEVE header with the SNAS option claiming another job; tier 1 must drop it.
    opt = struct.pack("!HBB", 0xFF53, 0x81, 4) + struct.pack("!IQI", 1, 0x4141414141414141, 1)
    gen = struct.pack("!BBHI", 5, 0x40, 0x0800, 0) + opt
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(gen + b"\x45" + b"\x00" * 19, PROXY_GENEVE)
    try:
        data, peer = s.recvfrom(100)
        return False, f"answered by {peer}"
    except socket.timeout:
        return True, "sent, no answer (dropped)"
    except OSError as e:
        return True, f"refused ({errno.errorcode.get(e.errno, e.errno)})"


def dns_query(server, name, qtype=1):
    tid = random.getrandbits(16)
    q = struct.pack("!HHHHHH", tid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    q += struct.pack("!HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    data, peer = s.recvfrom(2048)
    rcode = data[3] & 0x0F
    ancount = struct.unpack("!H", data[6:8])[0]
    return rcode, ancount


def dns_to_public_resolver_is_captured():
    # Sent to 8.8.8.8; tier 1 hands it to the job's DNS stub, so the answer follows the
    # policy (allowed name answered, other names refused) and nothing reaches the outside.
    rcode_ok, an_ok = dns_query("8.8.8.8", ALLOWED)
    rcode_out, _ = dns_query("8.8.8.8", OUTSIDE_NAME)
    return rcode_ok == 0 and an_ok > 0 and rcode_out != 0, (
        f"{ALLOWED}: rcode {rcode_ok} answers {an_ok}; {OUTSIDE_NAME}: rcode {rcode_out}"
    )


def resolver():
    with open("/etc/resolv.conf") as f:
        for line in f:
            if line.startswith("nameserver"):
                return line.split()[1]
    return "8.8.8.8"


def dns_tunnel():
    # Data smuggled in query names under a zone the policy does not allow.
    refused = 0
    for i in range(20):
        label = os.urandom(24).hex()
        try:
            rcode, _ = dns_query(resolver(), f"{label}.t{i}.example.org")
            refused += rcode != 0
        except socket.timeout:
            refused += 1
    return refused == 20, f"{refused}/20 tunnelled queries refused or dropped"


def main():
    print(f"uid {os.getuid()} gid {os.getgid()} host {socket.gethostname()}", flush=True)
    check("resolve allowed name", resolve_allowed)
    check("http to allowed name", http_allowed)
    check("Host: another site, allowed address", http_other_host_on_allowed_address)
    if CA:
        # Both need port 443 allowed (the quickstart's policy does, when it passes the CA).
        check("https to allowed name", https_allowed)
        check("TLS SNI of another site, allowed address", tls_other_sni_on_allowed_address)
    check("udp echo to allowed name", udp_echo_allowed)
    check("name outside the policy", name_outside_policy)
    check("blocked name", blocked_name)
    check("blocked address fails fast", blocked_ip_fails_fast)
    check("raw socket", raw_socket)
    check("forged GENEVE to a proxy", forged_geneve)
    check("DNS to 8.8.8.8 is captured", dns_to_public_resolver_is_captured)
    check("DNS tunnelling", dns_tunnel)
    sys.exit(failures)


if __name__ == "__main__":
    main()
