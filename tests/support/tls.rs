//! Test certificates (a CA and a server certificate for localhost, 127.0.0.1 and *.db.test,
//! made with the real `openssl`), and the clients TLS tests need: the libpq ≥ 17 Python client
//! from the test venv, and the raw-socket TLS helper `tls_client.py`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::find_tool;

/// The tenant domain the test certificate covers (`*.db.test`).
pub const DOMAIN: &str = "db.test";

pub struct TestCerts {
    dir: PathBuf,
    pub ca: PathBuf,
    /// Chain and key in one file, as HAProxy reads it.
    pub server_pem: PathBuf,
    serial: u32,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(find_tool("openssl").expect("openssl"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCerts {
    /// A new CA and a first server certificate under `parent/certs`.
    pub fn new(parent: &Path) -> TestCerts {
        let dir = parent.join("certs");
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=pgs test CA",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("ext.cnf"),
            format!("subjectAltName=DNS:localhost,DNS:*.{DOMAIN},IP:127.0.0.1\n"),
        )
        .unwrap();
        let mut certs = TestCerts {
            ca: dir.join("ca.crt"),
            server_pem: dir.join("server.pem"),
            dir,
            serial: 0,
        };
        certs.renew();
        certs
    }

    /// Issues a new certificate for the same key with the next serial, writes it into
    /// `server_pem` and returns its serial as HAProxy prints it (upper-case hex).
    pub fn renew(&mut self) -> String {
        self.serial += 1;
        let serial = format!("{:040X}", 0x5000 + self.serial);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{serial}"),
                "-out",
                "server.crt",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
            ],
        );
        let crt = std::fs::read_to_string(self.dir.join("server.crt")).unwrap();
        let key = std::fs::read_to_string(self.dir.join("server.key")).unwrap();
        std::fs::write(&self.server_pem, format!("{crt}{key}")).unwrap();
        serial.trim_start_matches('0').to_string()
    }
}

/// The venv Python with psycopg (libpq ≥ 17) that `scripts/install-deps.sh --tests` creates;
/// `PGS_TEST_PYTHON` overrides it.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("PGS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pgs-test-venv/bin/python"));
    p.is_file().then_some(p)
}

/// Runs `tls_client.py ARGS` and returns its output.
pub fn tls_client(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_client.py");
    Command::new(python().expect("test venv python"))
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tls_client.py")
}
