//! pg-route.lua's startup-phase rules (DESIGN.md §6), one raw-socket exchange per rule, against
//! real HAProxy and a real PostgreSQL tenant. Every refused exchange is also checked not to have
//! reached the backend (HAProxy's session counter for it stays put).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{have_tools, Haproxy, Layout, Postgres};

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
const PROTOCOL_3: u32 = 3 << 16;

/// One enabled tenant `acme` and one disabled tenant `globex`, with a 1 s startup timeout.
struct Stack {
    haproxy: Haproxy,
    _acme: Postgres,
    layout: Layout,
}

impl Stack {
    fn start() -> Option<Stack> {
        if !have_tools(&["haproxy", "initdb", "postgres", "pg_isready"]) {
            return None;
        }
        let layout = Layout::init();
        let settings = std::fs::read_to_string(&layout.config).unwrap();
        std::fs::write(
            &layout.config,
            settings.replace("startup_timeout = \"5s\"", "startup_timeout = \"1s\""),
        )
        .unwrap();
        let acme = Postgres::start(layout.dir.path(), "pg_acme", "acme", None);
        layout.write_tenants(&format!(
            r#"{{"version": 1, "tenants": {{
                "acme":   {{"access": "enabled",  "external": {{"address": "{0}"}}}},
                "globex": {{"access": "disabled", "external": {{"address": "{0}"}}}}
            }}}}"#,
            acme.socket_path().display()
        ));
        layout.render();
        let haproxy = layout.start_haproxy();
        Some(Stack {
            haproxy,
            _acme: acme,
            layout,
        })
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.layout.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    fn sessions(&self) -> u64 {
        self.haproxy.backend_sessions("pgs_acme") + self.haproxy.backend_sessions("pgs_globex")
    }

    /// Sends `bytes` in one write and asserts the connection is refused without reaching a
    /// backend; returns the reply.
    fn refused(&self, case: &str, bytes: &[u8]) -> Reply {
        let before = self.sessions();
        let mut s = self.connect();
        s.write_all(bytes).unwrap();
        let reply = read_reply(&mut s);
        assert!(
            matches!(reply, Reply::Error { .. } | Reply::Closed),
            "{case}: expected a refusal, got {reply:?}"
        );
        assert_eq!(self.sessions(), before, "{case}: reached a backend");
        reply
    }
}

#[derive(Debug, PartialEq)]
enum Reply {
    /// 'N': no SSL/GSS, carry on.
    No,
    /// A PostgreSQL ErrorResponse.
    Error {
        code: String,
        message: String,
    },
    /// The backend's authentication request: the connection was routed.
    Auth,
    /// The peer closed without a message.
    Closed,
    Other(Vec<u8>),
}

fn be32(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

fn message(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(be32(8 + payload.len() as u32));
    m.extend(be32(code));
    m.extend(payload);
    m
}

fn startup_raw(pairs: &[u8]) -> Vec<u8> {
    message(PROTOCOL_3, pairs)
}

fn startup(user: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(b"user\0");
    p.extend(user);
    p.extend(b"\0database\0postgres\0\0");
    startup_raw(&p)
}

fn read_reply(s: &mut TcpStream) -> Reply {
    let mut first = [0u8; 1];
    match s.read(&mut first) {
        Ok(0) => return Reply::Closed,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Reply::Closed,
        Err(e) => panic!("read: {e}"),
    }
    match first[0] {
        b'N' => Reply::No,
        b'E' | b'R' => {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut body).unwrap();
            if first[0] == b'R' {
                return Reply::Auth;
            }
            let mut code = String::new();
            let mut msg = String::new();
            for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
                let text = String::from_utf8_lossy(&field[1..]).into_owned();
                match field[0] {
                    b'C' => code = text,
                    b'M' => msg = text,
                    _ => {}
                }
            }
            Reply::Error { code, message: msg }
        }
        other => {
            let mut rest = vec![other];
            let mut buf = [0u8; 256];
            if let Ok(n) = s.read(&mut buf) {
                rest.extend(&buf[..n]);
            }
            Reply::Other(rest)
        }
    }
}

fn code(reply: &Reply) -> &str {
    match reply {
        Reply::Error { code, .. } => code,
        _ => "",
    }
}

#[test]
fn negotiation_requests_are_answered_by_haproxy_and_the_startup_follows() {
    let Some(st) = Stack::start() else { return };
    let before = st.sessions();
    let mut s = st.connect();
    s.write_all(&message(GSSENC_REQUEST, b"")).unwrap();
    assert_eq!(read_reply(&mut s), Reply::No, "GSSENCRequest");
    s.write_all(&message(SSL_REQUEST, b"")).unwrap();
    assert_eq!(read_reply(&mut s), Reply::No, "SSLRequest after GSSENC");
    s.write_all(&startup(b"acme")).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Auth, "startup after both");
    assert_eq!(st.sessions(), before + 1);

    // A plain startup is routed too.
    let mut s = st.connect();
    s.write_all(&startup(b"acme")).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Auth);
}

/// CVE-2021-23214 class: bytes pipelined behind an SSLRequest could be injected plaintext.
#[test]
fn bytes_pipelined_after_a_negotiation_request_are_refused() {
    let Some(st) = Stack::start() else { return };
    for (case, first) in [
        ("SSLRequest", SSL_REQUEST),
        ("GSSENCRequest", GSSENC_REQUEST),
    ] {
        let mut bytes = message(first, b"");
        bytes.extend(startup(b"acme"));
        let r = st.refused(case, &bytes);
        assert_eq!(code(&r), "08P01", "{case}: {r:?}");
    }
}

#[test]
fn a_second_negotiation_request_is_refused() {
    let Some(st) = Stack::start() else { return };
    for (case, req) in [("SSL twice", SSL_REQUEST), ("GSSENC twice", GSSENC_REQUEST)] {
        let before = st.sessions();
        let mut s = st.connect();
        s.write_all(&message(req, b"")).unwrap();
        assert_eq!(read_reply(&mut s), Reply::No, "{case}");
        s.write_all(&message(req, b"")).unwrap();
        let r = read_reply(&mut s);
        assert_eq!(code(&r), "08P01", "{case}: {r:?}");
        assert_eq!(st.sessions(), before, "{case}");
    }
}

#[test]
fn bad_lengths_garbage_and_old_protocols_are_refused() {
    let Some(st) = Stack::start() else { return };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 7", [be32(7), be32(PROTOCOL_3)].concat()),
        ("length 10001", {
            let mut m = [be32(10001), be32(PROTOCOL_3)].concat();
            m.resize(10001, b'a');
            m
        }),
        (
            "length 0xFFFFFFFF",
            [be32(u32::MAX), be32(PROTOCOL_3)].concat(),
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("protocol 2", message(2 << 16, b"acme\0")),
        ("protocol 4", message(4 << 16, b"user\0acme\0\0")),
        ("SSLRequest with a payload", message(SSL_REQUEST, b"xxxx")),
        ("unknown request code", message(80877199, b"")),
        ("pairs without terminator", startup_raw(b"user\0acme\0")),
        ("odd pairs", startup_raw(b"user\0acme\0database\0\0")),
    ];
    cases.push(("zero bytes", vec![0u8; 64]));
    for (case, bytes) in &cases {
        let r = st.refused(case, bytes);
        assert_eq!(code(&r), "08P01", "{case}: {r:?}");
    }
}

#[test]
fn user_names_outside_the_tenant_pattern_are_refused() {
    let Some(st) = Stack::start() else { return };
    let long = "a".repeat(64);
    let cases: [(&str, &[u8]); 7] = [
        ("NUL inside", b"acme\0x"),
        ("upper case", b"ACME"),
        ("dash", b"a-b"),
        ("64 chars", long.as_bytes()),
        ("empty", b""),
        ("leading digit", b"1acme"),
        ("non-ASCII", "acmé".as_bytes()),
    ];
    for (case, user) in cases {
        let r = st.refused(case, &startup(user));
        assert!(code(&r) == "28000" || code(&r) == "08P01", "{case}: {r:?}");
    }
    let r = st.refused("no user", &startup_raw(b"database\0postgres\0\0"));
    assert_eq!(code(&r), "28000", "{r:?}");
}

#[test]
fn unknown_and_disabled_tenants_read_the_same() {
    let Some(st) = Stack::start() else { return };
    let Reply::Error {
        code: c1,
        message: m1,
    } = st.refused("disabled", &startup(b"globex"))
    else {
        panic!("disabled: not an ErrorResponse")
    };
    let Reply::Error {
        code: c2,
        message: m2,
    } = st.refused("unknown", &startup(b"initech"))
    else {
        panic!("unknown: not an ErrorResponse")
    };
    assert_eq!(c1, c2);
    assert_eq!(m1.replace("globex", "X"), m2.replace("initech", "X"));
}

#[test]
fn cancel_requests_and_silent_clients_are_closed_without_routing() {
    let Some(st) = Stack::start() else { return };
    let mut cancel = be32(16).to_vec();
    cancel.extend(be32(CANCEL_REQUEST));
    cancel.extend(be32(1234));
    cancel.extend(be32(5678));
    st.refused("CancelRequest", &cancel);

    // A truncated startup followed by silence is closed once the startup timeout (1 s) passes.
    let before = st.sessions();
    let mut s = st.connect();
    let full = startup(b"acme");
    s.write_all(&full[..full.len() - 5]).unwrap();
    let t0 = Instant::now();
    let r = read_reply(&mut s);
    assert!(matches!(r, Reply::Closed | Reply::Error { .. }), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "held for {:?}",
        t0.elapsed()
    );
    assert_eq!(st.sessions(), before);
}
