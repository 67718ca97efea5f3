//! The bearer token: loaded once from `DIR/secrets/api-token` (written by `init`, 0600) and
//! compared in constant time. The token is never logged, printed or put in an error.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// The expected token, kept only as its SHA-256: comparing digests of equal length in
/// constant time hides both the token's bytes and its length from timing.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn new(secret: &str) -> Token {
        Token {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Reads the token file; refuses a missing or empty one (an API without a token would be
    /// open to anyone who reaches the socket) and warns when others can read it.
    pub fn load(path: &Path) -> anyhow::Result<Token> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the API token {}; `pgs-agent init` writes one (or write 32+ random \
                 characters there, mode 0600), or set [api] listen = \"\" to serve no API",
                path.display()
            )
        })?;
        let secret = text.trim();
        if secret.len() < 16 {
            bail!(
                "the API token in {} is shorter than 16 characters; write a longer random one",
                path.display()
            );
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    "the API token file is readable by other users; chmod 600 it"
                );
            }
        }
        Ok(Token::new(secret))
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        constant_time_eq(&got, &self.digest)
    }

    /// Checks the request's `Authorization: Bearer <token>` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "this route needs `Authorization: Bearer <token>`; the token is in \
                 DIR/secrets/api-token",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        if self.matches(presented) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("the bearer token is not valid"))
        }
    }
}

/// Compares two equal-length byte arrays without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // Keep the optimizer from turning the loop back into a short-circuiting comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let t = Token::new("s3cret-token-0123456789");
        assert!(t
            .check(&headers(Some("Bearer s3cret-token-0123456789")))
            .is_ok());
        assert!(t
            .check(&headers(Some("bearer s3cret-token-0123456789")))
            .is_ok());
        for bad in [
            None,
            Some("Bearer s3cret-token-012345678"),
            Some("Bearer s3cret-token-0123456789x"),
            Some("Basic s3cret-token-0123456789"),
            Some("s3cret-token-0123456789"),
            Some("Bearer "),
        ] {
            let e = t.check(&headers(bad)).unwrap_err();
            assert_eq!(e.code, "unauthorized", "{bad:?}");
            assert!(!e.message.contains("s3cret"), "{}", e.message);
        }
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn short_or_missing_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        assert!(Token::load(&path).is_err());
        std::fs::write(&path, "short\n").unwrap();
        assert!(Token::load(&path).is_err());
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert!(Token::load(&path).unwrap().matches("0123456789abcdef0123"));
    }
}
