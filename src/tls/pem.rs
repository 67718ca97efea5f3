//! Reading a certificate file as HAProxy serves it (PEM: the chain, then or before it the
//! private key): the leaf's subject, names, expiry, serial and SHA-1 fingerprint. It checks
//! the file's shape; HAProxy has the last word when the agent hands the file over.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha1::{Digest, Sha1};
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

/// The leaf certificate of a PEM file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// RFC 4514 form, e.g. `CN=db.example.com`.
    pub subject: String,
    /// DNS names from subjectAltName (and IP addresses, as text).
    pub names: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    /// Upper-case hex, as HAProxy prints it.
    pub serial: String,
    /// SHA-1 of the leaf's DER, upper-case hex, as HAProxy's `show ssl cert` prints it.
    pub sha1: String,
}

impl CertInfo {
    /// Seconds until expiry (negative once expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        self.not_after as i64 - now as i64
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("no PEM block (-----BEGIN ...-----) found")]
    NoBlocks,
    #[error("no CERTIFICATE block")]
    NoCertificate,
    #[error("no private key block (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): HAProxy needs the key in the same file, e.g. `cat fullchain.pem privkey.pem > FILE`")]
    NoKey,
    #[error("a {label} block is not valid PEM: {reason}")]
    BadBlock { label: String, reason: String },
    #[error("the first certificate cannot be read: {0}")]
    BadCertificate(String),
}

/// PEM blocks in order: (label, DER bytes).
fn blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, PemError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start..];
        let label_end = after[11..]
            .find("-----")
            .ok_or_else(|| PemError::BadBlock {
                label: "?".into(),
                reason: "unterminated BEGIN line".into(),
            })?;
        let label = after[11..11 + label_end].to_string();
        let end_marker = format!("-----END {label}-----");
        let end = after.find(&end_marker).ok_or_else(|| PemError::BadBlock {
            label: label.clone(),
            reason: format!("no {end_marker} line"),
        })?;
        let block = &after[..end + end_marker.len()];
        let (got_label, der) = pem_rfc7468_decode(block).map_err(|reason| PemError::BadBlock {
            label: label.clone(),
            reason,
        })?;
        out.push((got_label, der));
        rest = &after[end + end_marker.len()..];
    }
    if out.is_empty() {
        return Err(PemError::NoBlocks);
    }
    Ok(out)
}

fn pem_rfc7468_decode(block: &str) -> Result<(String, Vec<u8>), String> {
    // Tolerate CRLF files: PEM's grammar wants LF.
    let block = block.replace("\r\n", "\n");
    x509_cert::der::pem::decode_vec(block.as_bytes())
        .map(|(label, der)| (label.to_string(), der))
        .map_err(|e| e.to_string())
}

/// Checks the shape HAProxy needs (a certificate and a key) and reads the leaf.
pub fn parse(text: &str) -> Result<CertInfo, PemError> {
    let blocks = blocks(text)?;
    let is_key = |l: &str| l.ends_with("PRIVATE KEY");
    if !blocks.iter().any(|(l, _)| is_key(l)) {
        return Err(PemError::NoKey);
    }
    let der = blocks
        .iter()
        .find(|(l, _)| l == "CERTIFICATE")
        .map(|(_, d)| d)
        .ok_or(PemError::NoCertificate)?;
    let cert = Certificate::from_der(der).map_err(|e| PemError::BadCertificate(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    let not_after = tbs.validity.not_after.to_unix_duration().as_secs();
    let mut names = Vec::new();
    if let Ok(Some((_, san))) = tbs.get::<SubjectAltName>() {
        for n in san.0 {
            match n {
                GeneralName::DnsName(d) => names.push(d.to_string()),
                GeneralName::IpAddress(ip) => names.push(ip_text(ip.as_bytes())),
                _ => {}
            }
        }
    }
    let der_again = cert
        .to_der()
        .map_err(|e| PemError::BadCertificate(e.to_string()))?;
    Ok(CertInfo {
        subject: tbs.subject.to_string(),
        names,
        not_after,
        serial: hex(tbs.serial_number.as_bytes()),
        sha1: hex(&Sha1::digest(&der_again)),
    })
}

/// Reads and parses a file.
pub fn read(path: &Path) -> Result<CertInfo, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse(&text).map_err(|e| e.to_string())
}

/// The file as HAProxy's Runtime API takes it in a payload: PEM blocks only, no empty lines
/// (an empty line ends the payload).
pub fn payload(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => hex(b),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_a_key_or_a_certificate_are_explained() {
        assert_eq!(parse("hello").unwrap_err(), PemError::NoBlocks);
        let key_only = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(parse(key_only).unwrap_err(), PemError::NoCertificate);
        let cert_only = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(parse(cert_only).unwrap_err(), PemError::NoKey);
        let cut = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(parse(cut).unwrap_err(), PemError::BadBlock { .. }));
    }

    #[test]
    fn payloads_have_no_empty_lines() {
        assert_eq!(payload("a\n\nb\r\n\n"), "a\nb");
    }
}
