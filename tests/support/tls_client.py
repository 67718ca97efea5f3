"""Raw PostgreSQL-over-TLS exchanges for pgs's integration tests, one per call.

Prints one JSON object: what the server answered ("reply": auth | error | closed | ...),
with the SQLSTATE and message of an ErrorResponse, the ALPN protocol agreed, the serial of the
certificate served, and how long the exchange took. Standard library only, except the
`libpq` case, which uses psycopg (libpq >= 17) from the test venv.

  tls_client.py starttls PORT CA USER [--sni NAME] [--alpn P] [--gssenc-first] [--inside BYTES]
  tls_client.py direct PORT CA USER [--sni NAME] [--alpn P|none]
  tls_client.py pipelined PORT              SSLRequest with bytes already behind it
  tls_client.py plaintext-after-s PORT USER SSLRequest, 'S', then a plaintext startup
  tls_client.py silent-after-s PORT         SSLRequest, 'S', then nothing
  tls_client.py plaintext PORT USER         a plaintext startup
  tls_client.py libpq PORT USER NEGOTIATION SSLMODE CA SQL   (password in PGPASSWORD)
"""

import argparse
import json
import os
import socket
import ssl
import struct
import sys
import time

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


def message(code, payload=b""):
    return struct.pack(">II", 8 + len(payload), code) + payload


def startup(user):
    pairs = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    return message(3 << 16, pairs)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def read_reply(sock):
    """What the server sent first: a one-byte answer, an ErrorResponse, an auth request."""
    try:
        first = sock.recv(1)
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError) as e:
        return {"reply": "closed", "detail": type(e).__name__}
    except socket.timeout:
        return {"reply": "timeout"}
    if not first:
        return {"reply": "closed"}
    if first in (b"S", b"N"):
        return {"reply": first.decode()}
    if first == b"R":
        return {"reply": "auth"}
    if first == b"E":
        (length,) = struct.unpack(">I", recv_exact(sock, 4))
        body = recv_exact(sock, length - 4)
        fields = {}
        for part in body.split(b"\0"):
            if part:
                fields[chr(part[0])] = part[1:].decode(errors="replace")
        return {"reply": "error", "code": fields.get("C"), "message": fields.get("M"),
                "hint": fields.get("H")}
    return {"reply": "other", "bytes": (first + sock.recv(64)).hex()}


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls_context(ca, alpn):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if alpn and alpn != "none":
        ctx.set_alpn_protocols([alpn])
    return ctx


def handshake(sock, ca, sni, alpn):
    ctx = tls_context(ca, alpn)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=sni)
    except (ssl.SSLError, ConnectionResetError, OSError) as e:
        return None, {"reply": "handshake_failed", "detail": str(e)}
    cert = tls.getpeercert() or {}
    return tls, {"alpn": tls.selected_alpn_protocol(), "serial": cert.get("serialNumber")}


def case_starttls(a):
    sock = connect(a.port)
    if a.gssenc_first:
        sock.sendall(message(GSSENC_REQUEST))
        r = read_reply(sock)
        if r["reply"] != "N":
            return dict(r, step="gssenc")
    sock.sendall(message(SSL_REQUEST))
    r = read_reply(sock)
    if r["reply"] != "S":
        return dict(r, step="sslrequest")
    tls, info = handshake(sock, a.ca, a.sni, a.alpn)
    if tls is None:
        return info
    if a.inside == "sslrequest":
        tls.sendall(message(SSL_REQUEST))
    else:
        tls.sendall(startup(a.user))
    return dict(read_reply(tls), **info)


def case_direct(a):
    sock = connect(a.port)
    tls, info = handshake(sock, a.ca, a.sni, a.alpn)
    if tls is None:
        return info
    try:
        tls.sendall(startup(a.user))
    except (ssl.SSLError, OSError) as e:
        return dict(info, reply="closed", detail=str(e))
    return dict(read_reply(tls), **info)


def case_pipelined(a):
    sock = connect(a.port)
    sock.sendall(message(SSL_REQUEST) + startup("acme"))
    return read_reply(sock)


def case_plaintext_after_s(a):
    sock = connect(a.port)
    sock.sendall(message(SSL_REQUEST))
    r = read_reply(sock)
    if r["reply"] != "S":
        return dict(r, step="sslrequest")
    sock.sendall(startup(a.user))
    return read_reply(sock)


def case_silent_after_s(a):
    sock = connect(a.port)
    sock.settimeout(30)
    sock.sendall(message(SSL_REQUEST))
    r = read_reply(sock)
    if r["reply"] != "S":
        return dict(r, step="sslrequest")
    return read_reply(sock)


def case_plaintext(a):
    sock = connect(a.port)
    sock.sendall(startup(a.user))
    return read_reply(sock)


def case_libpq(a):
    import psycopg

    kwargs = dict(host=a.host, port=a.port, user=a.user, dbname="postgres",
                  password=os.environ["PGPASSWORD"], sslmode=a.sslmode,
                  sslnegotiation=a.negotiation, connect_timeout=10)
    if a.ca:
        kwargs["sslrootcert"] = a.ca
    if a.hostaddr:
        kwargs["hostaddr"] = a.hostaddr
    try:
        with psycopg.connect(**kwargs) as conn:
            row = conn.execute(a.sql).fetchone()
            return {"reply": "ok", "value": str(row[0]), "ssl": conn.pgconn.ssl_in_use,
                    "libpq": psycopg.pq.version()}
    except psycopg.Error as e:
        return {"reply": "error", "message": str(e).strip(), "code": getattr(e, "sqlstate", None)}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="case", required=True)
    s = sub.add_parser("starttls")
    s.add_argument("port", type=int); s.add_argument("ca"); s.add_argument("user")
    s.add_argument("--sni"); s.add_argument("--alpn")
    s.add_argument("--gssenc-first", action="store_true")
    s.add_argument("--inside", choices=["startup", "sslrequest"], default="startup")
    s = sub.add_parser("direct")
    s.add_argument("port", type=int); s.add_argument("ca"); s.add_argument("user")
    s.add_argument("--sni"); s.add_argument("--alpn", default="postgresql")
    s = sub.add_parser("pipelined"); s.add_argument("port", type=int)
    s = sub.add_parser("plaintext-after-s")
    s.add_argument("port", type=int); s.add_argument("user")
    s = sub.add_parser("silent-after-s"); s.add_argument("port", type=int)
    s = sub.add_parser("plaintext")
    s.add_argument("port", type=int); s.add_argument("user")
    s = sub.add_parser("libpq")
    s.add_argument("port", type=int); s.add_argument("user"); s.add_argument("negotiation")
    s.add_argument("sslmode"); s.add_argument("ca"); s.add_argument("sql")
    s.add_argument("--host", default="127.0.0.1"); s.add_argument("--hostaddr")
    a = p.parse_args()
    started = time.monotonic()
    result = {
        "starttls": case_starttls, "direct": case_direct, "pipelined": case_pipelined,
        "plaintext-after-s": case_plaintext_after_s, "silent-after-s": case_silent_after_s,
        "plaintext": case_plaintext, "libpq": case_libpq,
    }[a.case](a)
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
