//! A minimal PostgreSQL client login over a unix socket (startup, SCRAM-SHA-256, ReadyForQuery):
//! how the agent proves a tenant's server really accepts logins before routing to it. It sends
//! no queries and holds no connection.

use std::io;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub enum LoginError {
    /// The server is not there yet or is starting up: try again.
    NotYet(String),
    /// The server answered and refused: waiting will not help.
    Fatal(String),
}

const PROTOCOL_3: u32 = 3 << 16;
const MAX_MESSAGE: usize = 1 << 20;

/// Logs in as `user` to database `user` and waits for ReadyForQuery. Returns how the
/// password was checked.
pub async fn login(socket: &Path, user: &str, password: &str) -> Result<&'static str, LoginError> {
    let not_yet = |e: io::Error| LoginError::NotYet(format!("{}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).await.map_err(not_yet)?;
    let mut params = Vec::new();
    for (k, v) in [
        ("user", user),
        ("database", user),
        ("application_name", "pgs-agent"),
    ] {
        params.extend_from_slice(k.as_bytes());
        params.push(0);
        params.extend_from_slice(v.as_bytes());
        params.push(0);
    }
    params.push(0);
    let mut startup = Vec::with_capacity(params.len() + 8);
    startup.extend_from_slice(&(params.len() as u32 + 8).to_be_bytes());
    startup.extend_from_slice(&PROTOCOL_3.to_be_bytes());
    startup.extend_from_slice(&params);
    s.write_all(&startup).await.map_err(not_yet)?;

    let mut scram: Option<scram::Client> = None;
    let mut verified = false;
    let mut how = "trust";
    loop {
        let (tag, body) = read_message(&mut s).await.map_err(not_yet)?;
        match tag {
            b'R' => {
                let code = be_u32(&body).ok_or_else(|| fatal("short authentication request"))?;
                let data = &body[4..];
                match code {
                    0 => {
                        if scram.is_some() && !verified {
                            return Err(fatal("server skipped SCRAM's final step"));
                        }
                    }
                    3 => {
                        how = "cleartext password";
                        let mut msg = password.as_bytes().to_vec();
                        msg.push(0);
                        send(&mut s, b'p', &msg).await.map_err(not_yet)?;
                    }
                    5 => {
                        // MD5 is not implemented here: the server is up and asks for a
                        // password, which is what readiness means; the password is unchecked.
                        let _ = send(&mut s, b'X', &[]).await;
                        return Ok("md5 requested, password not checked");
                    }
                    10 => {
                        let mechanisms: Vec<&[u8]> =
                            data.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                        if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                            return Err(fatal("server offers no SCRAM-SHA-256"));
                        }
                        let client = scram::Client::new(password).map_err(|e| fatal(&e))?;
                        let first = client.first_message();
                        let mut msg = b"SCRAM-SHA-256\0".to_vec();
                        msg.extend_from_slice(&(first.len() as u32).to_be_bytes());
                        msg.extend_from_slice(first.as_bytes());
                        send(&mut s, b'p', &msg).await.map_err(not_yet)?;
                        scram = Some(client);
                        how = "SCRAM-SHA-256";
                    }
                    11 => {
                        let client = scram
                            .as_mut()
                            .ok_or_else(|| fatal("SASL continue without SASL start"))?;
                        let server_first = std::str::from_utf8(data)
                            .map_err(|_| fatal("server-first-message is not UTF-8"))?;
                        let final_msg =
                            client.final_message(server_first).map_err(|e| fatal(&e))?;
                        send(&mut s, b'p', final_msg.as_bytes())
                            .await
                            .map_err(not_yet)?;
                    }
                    12 => {
                        let client = scram
                            .as_ref()
                            .ok_or_else(|| fatal("SASL final without SASL start"))?;
                        let server_final = std::str::from_utf8(data)
                            .map_err(|_| fatal("server-final-message is not UTF-8"))?;
                        client.verify_server(server_final).map_err(|e| fatal(&e))?;
                        verified = true;
                    }
                    other => {
                        return Err(fatal(&format!(
                            "unsupported authentication request {other}"
                        )))
                    }
                }
            }
            b'E' => return Err(classify_error(&body)),
            b'Z' => {
                let _ = send(&mut s, b'X', &[]).await;
                return Ok(how);
            }
            // ParameterStatus, BackendKeyData, NoticeResponse, ...
            _ => {}
        }
    }
}

fn fatal(message: &str) -> LoginError {
    LoginError::Fatal(message.to_owned())
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

async fn send(s: &mut UnixStream, tag: u8, body: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(body.len() + 5);
    msg.push(tag);
    msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg).await
}

async fn read_message(s: &mut UnixStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad message length {len}"),
        ));
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// ErrorResponse → retry (starting up, too many connections, shutting down) or give up
/// (wrong password, no such role or database).
pub fn classify_error(body: &[u8]) -> LoginError {
    let mut code = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("");
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    let text = format!("{message} (SQLSTATE {code})");
    match code {
        "28P01" | "28000" | "3D000" => LoginError::Fatal(text),
        _ => LoginError::NotYet(text),
    }
}

mod scram {
    //! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it: no
    //! channel binding, the user name comes from the startup message.

    use super::crypto::{b64_decode, b64_encode, hi, hmac, sha256};

    pub struct Client {
        password: String,
        nonce: String,
        first_bare: String,
        server_signature: Option<[u8; 32]>,
    }

    impl Client {
        pub fn new(password: &str) -> Result<Client, String> {
            let mut raw = [0u8; 18];
            getrandom::fill(&mut raw).map_err(|e| format!("getrandom: {e}"))?;
            Ok(Client::with_nonce(password, &b64_encode(&raw)))
        }

        pub fn with_nonce(password: &str, nonce: &str) -> Client {
            Client {
                password: password.to_owned(),
                nonce: nonce.to_owned(),
                first_bare: format!("n=,r={nonce}"),
                server_signature: None,
            }
        }

        /// For the RFC's test vector, which names its user.
        #[cfg(test)]
        pub fn set_first_bare(&mut self, first_bare: &str) {
            self.first_bare = first_bare.to_owned();
        }

        pub fn first_message(&self) -> String {
            format!("n,,{}", self.first_bare)
        }

        /// client-final-message for `server_first`; remembers the expected server signature.
        pub fn final_message(&mut self, server_first: &str) -> Result<String, String> {
            let mut nonce = None;
            let mut salt = None;
            let mut iterations = None;
            for attr in server_first.split(',') {
                match attr.split_once('=') {
                    Some(("r", v)) => nonce = Some(v),
                    Some(("s", v)) => salt = Some(b64_decode(v).ok_or("bad salt")?),
                    Some(("i", v)) => iterations = v.parse::<u32>().ok(),
                    _ => {}
                }
            }
            let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
                return Err(format!("malformed server-first-message {server_first:?}"));
            };
            if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
                return Err("server nonce does not extend ours".into());
            }
            if !(1..=1_000_000).contains(&iterations) {
                return Err(format!("unreasonable iteration count {iterations}"));
            }
            // The password is 64 hex digits: SASLprep leaves it as is.
            let salted = hi(self.password.as_bytes(), &salt, iterations);
            let client_key = hmac(&salted, b"Client Key");
            let stored_key = sha256(&client_key);
            let without_proof = format!("c=biws,r={nonce}");
            let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
            let client_signature = hmac(&stored_key, auth_message.as_bytes());
            let mut proof = client_key;
            for (p, s) in proof.iter_mut().zip(client_signature) {
                *p ^= s;
            }
            let server_key = hmac(&salted, b"Server Key");
            self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
            Ok(format!("{without_proof},p={}", b64_encode(&proof)))
        }

        /// Checks the server's proof that it knows the password too.
        pub fn verify_server(&self, server_final: &str) -> Result<(), String> {
            if let Some(e) = server_final.strip_prefix("e=") {
                return Err(format!("server rejected the login: {e}"));
            }
            let got = server_final
                .strip_prefix("v=")
                .and_then(|v| b64_decode(v.split(',').next().unwrap_or("")))
                .ok_or_else(|| format!("malformed server-final-message {server_final:?}"))?;
            match self.server_signature {
                Some(want) if got == want => Ok(()),
                _ => Err("the server's SCRAM signature is wrong".into()),
            }
        }
    }
}

mod crypto {
    //! The primitives SCRAM-SHA-256 needs, from the RustCrypto and base64 crates.

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    pub fn sha256(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    pub fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    /// SCRAM's `Hi`: PBKDF2-HMAC-SHA-256 with one output block.
    pub fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(password, &block);
        let mut out = u;
        for _ in 1..iterations {
            u = hmac(password, &u);
            for (o, x) in out.iter_mut().zip(u) {
                *o ^= x;
            }
        }
        out
    }

    pub fn b64_encode(data: &[u8]) -> String {
        STANDARD.encode(data)
    }

    pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
        STANDARD.decode(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::crypto::hi;
    use super::*;

    #[test]
    fn pbkdf2_matches_the_published_vector() {
        let hex: String = hi(b"password", b"salt", 4096)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn scram_matches_rfc_7677() {
        // RFC 7677 uses "n=user"; PostgreSQL sends an empty user name, so rebuild the
        // client-first-bare the RFC way to reuse its vector.
        let mut c = scram::Client::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.first_message(), "n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut rfc = scram::Client::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
        rfc.set_first_bare("n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(
            rfc.final_message(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        rfc.verify_server("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(rfc.verify_server("v=AAAA").is_err());
        assert!(rfc.verify_server("e=invalid-proof").is_err());
        // A server that does not extend our nonce is refused.
        assert!(c
            .final_message("r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .is_err());
    }

    #[test]
    fn login_errors_are_classified() {
        let body = |code: &str| format!("SFATAL\0C{code}\0Mmessage\0\0").into_bytes();
        assert!(matches!(
            classify_error(&body("57P03")),
            LoginError::NotYet(_)
        ));
        assert!(matches!(
            classify_error(&body("53300")),
            LoginError::NotYet(_)
        ));
        for fatal in ["28P01", "28000", "3D000"] {
            assert!(matches!(classify_error(&body(fatal)), LoginError::Fatal(_)));
        }
    }
}
