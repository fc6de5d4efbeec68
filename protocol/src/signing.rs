//! Analyst request signatures: what an analyst signs, how, and how a node checks it.
//!
//! An analyst signs every query with the private key of their federation certificate, so a
//! coordinator (another agency's node) can forward the query but cannot change it, replay it, or
//! send one of its own in the analyst's name. The signed message is
//!
//! ```text
//! cxfed-request-v2\n{"federation":..,"coordinator":..,"sql":..,"epsilon":..,"require_all":..,"nonce":..,"issued_at":..}
//! ```
//!
//! (the JSON of [`Claims`], fields in that order), signed with ECDSA P-256/P-384 (ASN.1 DER) or
//! Ed25519 according to the key. `coordinator` is the agency of the node the analyst sent the
//! query to: every node checks it against who actually forwarded the request (its own agency on
//! `/v1/query`, the TLS peer's on `/v1/partial`), so a node that received a forwarded partial
//! cannot replay it to the nodes that have not seen its nonce. [`RequestSignature`] carries the
//! nonce, time, coordinator, signature and the analyst's certificate (DER, hex) next to the
//! request; the node rebuilds the claims from the request it actually received, so any change to
//! the SQL, privacy parameters or coordinator breaks the signature.
//!
//! [`verify`] checks only the signature and reads the identity the certificate claims. Checking
//! the certificate against the federation CA, the coordinator, the freshness window and the nonce
//! is the node's job (it holds the CA and the nonces it has seen).
//!
//! Version 1 signatures (`cxfed-request-v1`, no coordinator) still [`verify`], so that audit logs
//! written before version 2 can be re-checked; nodes refuse them, since their empty coordinator
//! is never the expected one.

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity, IdentityError};

/// Domain separation prefix of every signed request.
pub const CONTEXT: &[u8] = b"cxfed-request-v2\n";

/// Prefix of version-1 signatures (no coordinator), accepted by [`verify`] only so that old
/// audit logs can be re-checked.
pub const CONTEXT_V1: &[u8] = b"cxfed-request-v1\n";

/// What the analyst vouches for. Serialized in this field order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Claims<'a> {
    /// The federation the request is for (a signature is not valid in another federation).
    pub federation: &'a str,
    /// The agency of the node the analyst sends the query to (the only node that may forward it).
    pub coordinator: &'a str,
    /// The SQL, byte for byte.
    pub sql: &'a str,
    /// ε the analyst asked to spend per node (`null`: each node's default; NaN and ±∞ as
    /// the strings of [`crate::epsilon_json`], so they are not signed as the default).
    #[serde(serialize_with = "crate::epsilon_json::serialize")]
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

    /// The bytes a version-1 client signed for these claims (no coordinator).
    fn message_v1(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct V1<'a> {
            federation: &'a str,
            sql: &'a str,
            epsilon: Option<f64>,
            require_all: bool,
            nonce: &'a str,
            issued_at: i64,
        }
        let mut m = CONTEXT_V1.to_vec();
        m.extend(
            serde_json::to_vec(&V1 {
                federation: self.federation,
                sql: self.sql,
                epsilon: self.epsilon,
                require_all: self.require_all,
                nonce: self.nonce,
                issued_at: self.issued_at,
            })
            .unwrap_or_default(),
        );
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
    /// The coordinator of the claims (empty in a version-1 signature).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub coordinator: String,
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
    /// The caller asked to sign a request without naming its coordinator (API misuse).
    #[error("a request must name the agency of the node it is sent to")]
    NoCoordinator,
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

    /// Signs a request for `sql`, to be sent to the node of agency `coordinator`, now, with a
    /// fresh nonce.
    pub fn sign(
        &self,
        coordinator: &str,
        sql: &str,
        epsilon: Option<f64>,
        require_all: bool,
    ) -> Result<RequestSignature, SignatureError> {
        self.sign_at(coordinator, sql, epsilon, require_all, unix_now())
    }

    /// Signs a request for `sql`, to be sent to the node of agency `coordinator`, as issued at
    /// `issued_at` (Unix seconds), with a fresh nonce.
    pub fn sign_at(
        &self,
        coordinator: &str,
        sql: &str,
        epsilon: Option<f64>,
        require_all: bool,
        issued_at: i64,
    ) -> Result<RequestSignature, SignatureError> {
        if coordinator.is_empty() {
            return Err(SignatureError::NoCoordinator);
        }
        let mut n = [0u8; 16];
        self.rng.fill(&mut n).map_err(|_| SignatureError::Random)?;
        let nonce = hex(&n);
        let message = Claims {
            federation: self.identity.federation(),
            coordinator,
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
            coordinator: coordinator.to_owned(),
            signature: hex(&sig),
            certificate: hex(&self.certificate),
        })
    }
}

impl Signer {
    /// The certificate (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// Signs `message` (already domain-separated by the caller) with the key.
    pub fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, SignatureError> {
        Ok(match &self.key {
            SigningKey::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map_err(|_| SignatureError::Random)?
                .as_ref()
                .to_vec(),
            SigningKey::Ed25519(k) => k.sign(message).as_ref().to_vec(),
        })
    }
}

/// Checks that `signature` signs `message` with the key of certificate `cert_der` and returns
/// the identity the certificate claims. Does **not** check the certificate's chain.
pub fn verify_bytes(
    cert_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<Identity, SignatureError> {
    let identity = identity::from_certificate_der(cert_der)?;
    check_signature(cert_der, message, signature)?;
    Ok(identity)
}

fn check_signature(cert_der: &[u8], message: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
    let key = public_key(cert_der)?;
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
    signature::UnparsedPublicKey::new(algorithm, &key)
        .verify(message, sig)
        .map_err(|_| SignatureError::Mismatch)
}

/// Checks that `sig` signs the claims made of `federation`, the request's `sql`, `epsilon` and
/// `require_all`, and `sig`'s own coordinator, nonce and time, with the key of its certificate,
/// and returns the certificate and the identity it claims. Does **not** check the certificate's
/// chain or validity, nor whether `sig.coordinator` is the node that should have received it.
/// A signature with an empty coordinator is checked as version 1.
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
    let claims = Claims {
        federation,
        coordinator: &sig.coordinator,
        sql,
        epsilon,
        require_all,
        nonce: &sig.nonce,
        issued_at: sig.issued_at,
    };
    let message = if sig.coordinator.is_empty() {
        claims.message_v1()
    } else {
        claims.message()
    };
    check_signature(&cert, &message, &signature)?;
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
            coordinator: "SSA",
            sql: "SELECT 1",
            epsilon: Some(0.5),
            require_all: true,
            nonce: "00",
            issued_at: 7,
        }
        .message();
        assert_eq!(
            String::from_utf8(m).unwrap_or_default(),
            "cxfed-request-v2\n{\"federation\":\"f\",\"coordinator\":\"SSA\",\"sql\":\"SELECT 1\",\"epsilon\":0.5,\"require_all\":true,\"nonce\":\"00\",\"issued_at\":7}"
        );
    }

    /// An analyst certificate of federation `f` and its signer (test-time key, never committed).
    fn analyst() -> Signer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://f/SSA/analyst/a".try_into().expect("uri"),
        )];
        let cert = params.self_signed(&key).expect("cert");
        Signer::new(&key.serialize_der(), cert.der().to_vec()).expect("signer")
    }

    #[test]
    fn the_coordinator_is_signed() {
        let signer = analyst();
        let sig = signer.sign("SSA", "SELECT 1", None, true).expect("sign");
        assert_eq!(sig.coordinator, "SSA");
        let (_, id) = verify(&sig, "f", "SELECT 1", None, true).expect("verifies");
        assert_eq!(id.agency(), "SSA");
        // Naming another coordinator in the block breaks the signature.
        let mut moved = sig.clone();
        moved.coordinator = "CMS".into();
        assert_eq!(
            verify(&moved, "f", "SELECT 1", None, true).err(),
            Some(SignatureError::Mismatch)
        );
        // So does dropping it (the v1 message is a different one).
        moved.coordinator.clear();
        assert_eq!(
            verify(&moved, "f", "SELECT 1", None, true).err(),
            Some(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.sign("", "SELECT 1", None, true).err(),
            Some(SignatureError::NoCoordinator)
        );
    }

    #[test]
    fn a_signed_nan_epsilon_is_not_a_signed_default() {
        let signer = analyst();
        for eps in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let sig = signer
                .sign("SSA", "SELECT 1", Some(eps), true)
                .expect("sign");
            assert!(
                verify(&sig, "f", "SELECT 1", Some(eps), true).is_ok(),
                "{eps}"
            );
            assert_eq!(
                verify(&sig, "f", "SELECT 1", None, true).err(),
                Some(SignatureError::Mismatch),
                "{eps} signed as no ε"
            );
        }
    }

    #[test]
    fn version_1_signatures_still_verify_for_old_logs() {
        let signer = analyst();
        let claims = Claims {
            federation: "f",
            coordinator: "",
            sql: "SELECT 1",
            epsilon: Some(0.5),
            require_all: true,
            nonce: "00112233445566778899aabbccddeeff",
            issued_at: 7,
        };
        let message = claims.message_v1();
        assert!(message.starts_with(b"cxfed-request-v1\n{\"federation\":\"f\",\"sql\""));
        let SigningKey::Ecdsa(k) = &signer.key else {
            panic!("P-256 key")
        };
        let s = k.sign(&signer.rng, &message).expect("sign");
        let sig = RequestSignature {
            nonce: claims.nonce.into(),
            issued_at: 7,
            coordinator: String::new(),
            signature: hex(s.as_ref()),
            certificate: hex(&signer.certificate),
        };
        assert!(verify(&sig, "f", "SELECT 1", Some(0.5), true).is_ok());
        // The v1 block serializes without a coordinator, as old logs hold it.
        let json = serde_json::to_string(&sig).expect("json");
        assert!(!json.contains("coordinator"), "{json}");
    }
}
