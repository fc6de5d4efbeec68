//! Analyst request signatures: what an analyst signs, how, and how a node checks it.
//!
//! An analyst signs every query with the private key of their federation certificate, so a
//! coordinator (another agency's node) can forward the query but cannot change it, replay it, or
//! send one of its own in the analyst's name. The signed message is
//!
//! ```text
//! cxfed-request-v1\n{"federation":..,"sql":..,"epsilon":..,"require_all":..,"nonce":..,"issued_at":..}
//! ```
//!
//! (the JSON of [`Claims`], fields in that order), signed with ECDSA P-256/P-384 (ASN.1 DER) or
//! Ed25519 according to the key. [`RequestSignature`] carries the nonce, time, signature and the
//! analyst's certificate (DER, hex) next to the request; the node rebuilds the claims from the
//! request it actually received, so any change to the SQL or privacy parameters breaks the
//! signature.
//!
//! [`verify`] checks only the signature and reads the identity the certificate claims. Checking
//! the certificate against the federation CA, the freshness window and the nonce is the node's
//! job (it holds the CA and the nonces it has seen).

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity, IdentityError};

/// Domain separation prefix of every signed request.
pub const CONTEXT: &[u8] = b"cxfed-request-v1\n";

/// What the analyst vouches for. Serialized in this field order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Claims<'a> {
    /// The federation the request is for (a signature is not valid in another federation).
    pub federation: &'a str,
    /// The SQL, byte for byte.
    pub sql: &'a str,
    /// ε the analyst asked to spend per node (`null`: each node's default).
    pub epsilon: Option<f64>,
    /// Whether every node must answer.
    pub require_all: bool,
    /// 128 random bits, hex: a node answers a nonce once.
    pub nonce: &'a str,
    /// Unix seconds when the analyst signed.
    pub issued_at: i64,
}

impl Claims<'_> {
    /// The exact bytes signed.
    pub fn message(&self) -> Vec<u8> {
        let mut m = CONTEXT.to_vec();
        // Serializing a struct of strings, numbers and booleans cannot fail.
        m.extend(serde_json::to_vec(self).unwrap_or_default());
        m
    }
}

/// The signature block sent with a query and forwarded with every partial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestSignature {
    /// The nonce of the claims.
    pub nonce: String,
    /// The time of the claims (Unix seconds).
    pub issued_at: i64,
    /// The signature, hex.
    pub signature: String,
    /// The analyst's certificate (DER, hex).
    pub certificate: String,
}

/// Why a signature could not be made or does not hold.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The private key is not PKCS#8 ECDSA P-256, P-384 or Ed25519, or does not match.
    #[error("private key: {0}")]
    Key(String),
    /// The certificate or signature is not well-formed hex/DER.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// `certificate` or `signature`.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The certificate names no usable identity.
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
    /// The signature does not match the request: altered in transit, or forged.
    #[error("the signature does not match the request (altered or forged)")]
    Mismatch,
    /// The random number generator failed.
    #[error("random number generator failed")]
    Random,
}

enum SigningKey {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// An analyst's signing key with their certificate.
pub struct Signer {
    key: SigningKey,
    certificate: Vec<u8>,
    identity: Identity,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a PKCS#8 private key (DER) and the matching certificate (DER).
    pub fn new(pkcs8: &[u8], certificate: Vec<u8>) -> Result<Signer, SignatureError> {
        let rng = SystemRandom::new();
        let key = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
        {
            SigningKey::Ecdsa(k)
        } else if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8, &rng)
        {
            SigningKey::Ecdsa(k)
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
            SigningKey::Ed25519(k)
        } else {
            return Err(SignatureError::Key(
                "not a PKCS#8 ECDSA P-256, P-384 or Ed25519 key".into(),
            ));
        };
        let public = match &key {
            SigningKey::Ecdsa(k) => k.public_key().as_ref().to_vec(),
            SigningKey::Ed25519(k) => k.public_key().as_ref().to_vec(),
        };
        if public_key(&certificate)? != public {
            return Err(SignatureError::Key(
                "the key does not belong to the certificate".into(),
            ));
        }
        let identity = identity::from_certificate_der(&certificate)?;
        Ok(Signer {
            key,
            certificate,
            identity,
            rng,
        })
    }

    /// The identity of the certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Signs a request for `sql` now, with a fresh nonce.
    pub fn sign(
        &self,
        sql: &str,
        epsilon: Option<f64>,
        require_all: bool,
    ) -> Result<RequestSignature, SignatureError> {
        self.sign_at(sql, epsilon, require_all, unix_now())
    }

    /// Signs a request for `sql` as issued at `issued_at` (Unix seconds), with a fresh nonce.
    pub fn sign_at(
        &self,
        sql: &str,
        epsilon: Option<f64>,
        require_all: bool,
        issued_at: i64,
    ) -> Result<RequestSignature, SignatureError> {
        let mut n = [0u8; 16];
        self.rng.fill(&mut n).map_err(|_| SignatureError::Random)?;
        let nonce = hex(&n);
        let message = Claims {
            federation: self.identity.federation(),
            sql,
            epsilon,
            require_all,
            nonce: &nonce,
            issued_at,
        }
        .message();
        let sig = match &self.key {
            SigningKey::Ecdsa(k) => k
                .sign(&self.rng, &message)
                .map_err(|_| SignatureError::Random)?
                .as_ref()
                .to_vec(),
            SigningKey::Ed25519(k) => k.sign(&message).as_ref().to_vec(),
        };
        Ok(RequestSignature {
            nonce,
            issued_at,
            signature: hex(&sig),
            certificate: hex(&self.certificate),
        })
    }
}

/// Checks that `sig` signs `claims` (whose nonce and time must be `sig`'s) with the key of its
/// certificate, and returns the certificate and the identity it claims. Does **not** check the
/// certificate's chain or validity.
pub fn verify(
    sig: &RequestSignature,
    federation: &str,
    sql: &str,
    epsilon: Option<f64>,
    require_all: bool,
) -> Result<(Vec<u8>, Identity), SignatureError> {
    let cert = unhex(&sig.certificate).ok_or(SignatureError::Malformed {
        what: "certificate",
        reason: "not hex".into(),
    })?;
    let signature = unhex(&sig.signature).ok_or(SignatureError::Malformed {
        what: "signature",
        reason: "not hex".into(),
    })?;
    let identity = identity::from_certificate_der(&cert)?;
    let key = public_key(&cert)?;
    let algorithm: &dyn signature::VerificationAlgorithm = match key.len() {
        65 => &signature::ECDSA_P256_SHA256_ASN1,
        97 => &signature::ECDSA_P384_SHA384_ASN1,
        32 => &signature::ED25519,
        n => {
            return Err(SignatureError::Malformed {
                what: "certificate",
                reason: format!("unsupported {n}-byte public key"),
            });
        }
    };
    let message = Claims {
        federation,
        sql,
        epsilon,
        require_all,
        nonce: &sig.nonce,
        issued_at: sig.issued_at,
    }
    .message();
    signature::UnparsedPublicKey::new(algorithm, &key)
        .verify(&message, &signature)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok((cert, identity))
}

fn public_key(cert_der: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| SignatureError::Malformed {
            what: "certificate",
            reason: e.to_string(),
        })?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes of lowercase or uppercase hex; `None` if `s` is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001ABff"), Some(b.to_vec()));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn claims_message_is_fixed() {
        let m = Claims {
            federation: "f",
            sql: "SELECT 1",
            epsilon: Some(0.5),
            require_all: true,
            nonce: "00",
            issued_at: 7,
        }
        .message();
        assert_eq!(
            String::from_utf8(m).unwrap_or_default(),
            "cxfed-request-v1\n{\"federation\":\"f\",\"sql\":\"SELECT 1\",\"epsilon\":0.5,\"require_all\":true,\"nonce\":\"00\",\"issued_at\":7}"
        );
    }
}
