//! Site identity: an ECDSA P-256 key and a self-signed certificate naming the site.
//!
//! Peers are not authenticated by a CA but pinned by the SHA-256 fingerprint of the certificate's
//! DER bytes, printed as `sha256:<64 hex>`. The certificate is long-lived (100 years) because
//! rotation is explicit (re-init and re-pin), not an expiry surprise on a storage node.

use std::fmt;

/// Errors from creating or reading an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("site name {0:?} is not valid: expected 1-63 characters of a-z, 0-9, '-' and '_'")]
    BadSiteName(String),
    #[error("generating the site key or certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate PEM is not valid: expected one 'BEGIN CERTIFICATE' block")]
    BadPem,
    #[error("fingerprint {0:?} is not valid: expected sha256: followed by 64 hex digits (as `mover identity` prints)")]
    BadFingerprint(String),
}

/// A freshly generated identity, in PEM, ready to be written to disk.
pub struct Identity {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub fingerprint: Fingerprint,
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    /// Parses `sha256:<64 hex>` (as printed by `mover identity`).
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadFingerprint(text.to_string());
        let hex = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Fingerprint(bytes))
    }

    /// Fingerprint of the first certificate in a PEM document.
    pub fn of_pem(pem: &str) -> Result<Self, IdentityError> {
        let der = pem_certificate_der(pem).ok_or(IdentityError::BadPem)?;
        Ok(Self::of_der(&der))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Site names end up in certificates, file names and policy keys: keep them boring.
pub fn validate_site_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadSiteName(name.to_string()))
    }
}

/// Generates a key pair and a self-signed certificate whose subject and SAN name the site.
pub fn generate(site: &str) -> Result<Identity, IdentityError> {
    validate_site_name(site)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![format!("{site}.mover")])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("mover site {site}"));
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok(Identity {
        fingerprint: Fingerprint::of_der(cert.der()),
        certificate_pem: cert.pem(),
        private_key_pem: key.serialize_pem(),
    })
}

fn pem_certificate_der(pem: &str) -> Option<Vec<u8>> {
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let start = pem.find(begin)? + begin.len();
    let stop = start + pem[start..].find(end)?;
    let body: String = pem[start..stop].split_whitespace().collect();
    base64_decode(&body)
}

// A certificate body is the only base64 we read; not worth a dependency.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for group in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in group.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let produced = match group.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_of_pem_matches_generated() {
        let identity = generate("onprem").unwrap();
        let from_pem = Fingerprint::of_pem(&identity.certificate_pem).unwrap();
        assert_eq!(from_pem, identity.fingerprint);
        assert!(identity.fingerprint.to_string().starts_with("sha256:"));
        assert_eq!(identity.fingerprint.to_string().len(), 7 + 64);
    }

    #[test]
    fn fingerprints_parse_back() {
        let identity = generate("a").unwrap();
        let text = identity.fingerprint.to_string();
        assert_eq!(Fingerprint::parse(&text).unwrap(), identity.fingerprint);
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &text[..text.len() - 1],
            &text.replace("sha256:", "sha256:zz")[..71],
        ] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_identities_differ() {
        let a = generate("a").unwrap();
        let b = generate("a").unwrap();
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn site_names_are_checked() {
        assert!(validate_site_name("aws-east_1").is_ok());
        for bad in ["", "Upper", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_site_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_pem_is_refused() {
        assert!(Fingerprint::of_pem("nope").is_err());
        assert!(
            Fingerprint::of_pem("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----")
                .is_err()
        );
    }
}
