# Test servers for snas-sandbox tests, run inside the "server" namespace of a test lab:
# HTTP on TCP 80, echo on UDP 7, and a tiny DNS responder on UDP 53 that answers
# A queries for *.lab.example with 203.0.113.10 and NXDOMAIN for everything else.
import socket, struct, sys, threading

ADDR = sys.argv[1]

def http():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ADDR, 80)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.recv(4096)
            body = b"hello from the lab\n"
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        finally:
            c.close()

def echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ADDR, 7))
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)

def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ADDR, 53))
    while True:
        q, a = s.recvfrom(512)
        tid, flags, qd = struct.unpack("!HHH", q[:6])
        i = 12; labels = []
        while q[i]:
            labels.append(q[i+1:i+1+q[i]].decode()); i += 1 + q[i]
        qtype = struct.unpack("!H", q[i+1:i+3])[0]
        question = q[12:i+5]
        name = ".".join(labels).lower()
        if name.endswith(".lab.example") and qtype == 1:
            ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ADDR)
            s.sendto(struct.pack("!HHHHHH", tid, 0x8180, 1, 1, 0, 0) + question + ans, a)
        elif name.endswith(".lab.example"):
            s.sendto(struct.pack("!HHHHHH", tid, 0x8180, 1, 0, 0, 0) + question, a)
        else:
            s.sendto(struct.pack("!HHHHHH", tid, 0x8183, 1, 0, 0, 0) + question, a)

for f in (http, echo, dns):
    threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
