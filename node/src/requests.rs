//! Checking an analyst's signed request on this node, before anything is planned: the signature
//! over exactly what arrived, the certificate's chain to the federation CA, the analyst role, the
//! analyst the request is said to be for, the coordinator it was signed for, the time window and
//! the nonce. Every node does this itself, so a coordinator can forward a query but cannot alter
//! it, replay it (to this node, or — being bound to one coordinator — to any other), or invent one
//! in an analyst's name.
//!
//! Nonces are remembered per signing certificate (its SHA-256 fingerprint), so one analyst cannot
//! use up another's, and only once every other check has passed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use cxfed_protocol::codes::ApiCode;
use cxfed_protocol::signing::{self, RequestSignature};
use cxfed_protocol::{Identity, Role};

use crate::tls::TlsError;

/// How far (seconds) a request's `issued_at` may be from this node's clock.
pub const FRESHNESS_SECS: i64 = 300;

/// Length of a nonce in hex digits (128 bits).
const NONCE_HEX_LEN: usize = 32;

/// Why a request is not accepted as the analyst's (HTTP 401, code `CXF-A401`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SignatureRefusal {
    /// Which refusal: one of the `CXF-A401` members of [`ApiCode`].
    pub kind: ApiCode,
    /// One line for a person.
    pub message: String,
}

impl SignatureRefusal {
    /// The stable code of every signature refusal.
    pub const CODE: &'static str = ApiCode::UnsignedRequest.code();

    fn new(kind: ApiCode, message: impl Into<String>) -> Self {
        SignatureRefusal {
            kind,
            message: message.into(),
        }
    }
}

/// What a request says, as this node received it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The signature block, if any.
    pub signature: Option<&'a RequestSignature>,
    /// The SQL.
    pub sql: &'a str,
    /// ε asked for.
    pub epsilon: Option<f64>,
    /// Whether every node must answer.
    pub require_all: bool,
    /// When this node received (and checks) it, Unix seconds: the clock of the freshness check.
    pub received_at: i64,
}

/// Who a request must be from and for, as this node knows it (not as the request claims).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The analyst: the TLS peer on `/v1/query`, the one the coordinator names on `/v1/partial`.
    pub analyst: &'a str,
    /// The coordinator's agency: this node's own on `/v1/query`, the TLS peer's on `/v1/partial`.
    pub coordinator: &'a str,
}

/// The key under which a nonce is remembered: the SHA-256 (hex) of the signing certificate, and
/// the nonce.
pub type NonceKey = (String, String);

/// The nonce key of a signature block.
pub fn nonce_key(sig: &RequestSignature) -> NonceKey {
    let der = signing::unhex(&sig.certificate).unwrap_or_default();
    (crate::audit::digest(&der), sig.nonce.clone())
}

/// The node's checker; remembers nonces it has accepted for twice the freshness window.
pub struct RequestChecker {
    /// The CA bundle and CRLs in force (replaced when the node reloads its TLS files).
    verifier: RwLock<Arc<dyn ClientCertVerifier>>,
    federation: String,
    seen: Mutex<HashMap<NonceKey, i64>>,
}

impl std::fmt::Debug for RequestChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestChecker")
            .field("federation", &self.federation)
            .finish_non_exhaustive()
    }
}

impl RequestChecker {
    /// A checker trusting the federation CA in `ca`.
    pub fn new(ca: &Path, federation: &str) -> Result<RequestChecker, TlsError> {
        let roots = Arc::new(crate::tls::load_roots(ca)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, crate::tls::provider())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: ca.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self::with_verifier(verifier, federation))
    }

    /// A checker whose signing certificates `verifier` checks (e.g. [`crate::tls::Trust`]'s,
    /// with CRLs).
    pub fn with_verifier(verifier: Arc<dyn ClientCertVerifier>, federation: &str) -> Self {
        RequestChecker {
            verifier: RwLock::new(verifier),
            federation: federation.to_owned(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the verifier of signing certificates (a new CA bundle or CRL); remembered
    /// nonces stay.
    pub fn set_verifier(&self, verifier: Arc<dyn ClientCertVerifier>) {
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = verifier;
    }

    /// Whether the federation CA (and CRLs) in force accept `cert` (DER) now.
    pub fn certificate_accepted(&self, cert: &[u8]) -> Result<(), String> {
        let verifier = Arc::clone(&self.verifier.read().unwrap_or_else(|p| p.into_inner()));
        verifier
            .verify_client_cert(&CertificateDer::from(cert.to_vec()), &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Records the nonce of a request accepted before (read back from the audit log after a
    /// restart: only lines whose signature was accepted); nonces too old to be accepted again are
    /// not kept.
    pub fn remember(&self, sig: &RequestSignature) {
        if sig.issued_at < signing::unix_now() - 2 * FRESHNESS_SECS {
            return;
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce_key(sig), sig.issued_at);
    }

    /// Checks that `req` is signed by an analyst of this federation whose certificate the CA
    /// accepted at the time of signing. No freshness or replay check: this is what an auditor
    /// re-checks on a logged request.
    pub fn authenticate(&self, req: Received<'_>) -> Result<Identity, SignatureRefusal> {
        let sig = req.signature.ok_or_else(|| {
            SignatureRefusal::new(
                ApiCode::UnsignedRequest,
                "the request is not signed by an analyst; sign it with `cxfed query`",
            )
        })?;
        if sig.nonce.len() != NONCE_HEX_LEN || signing::unhex(&sig.nonce).is_none() {
            return Err(SignatureRefusal::new(
                ApiCode::BadSignature,
                format!("nonce must be {NONCE_HEX_LEN} hex digits"),
            ));
        }
        let (cert, identity) =
            signing::verify(sig, &self.federation, req.sql, req.epsilon, req.require_all)
                .map_err(|e| SignatureRefusal::new(ApiCode::BadSignature, e.to_string()))?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(sig.issued_at).unwrap_or(0),
        ));
        let verifier = Arc::clone(&self.verifier.read().unwrap_or_else(|p| p.into_inner()));
        verifier
            .verify_client_cert(&CertificateDer::from(cert), &[], at)
            .map_err(|e| {
                SignatureRefusal::new(
                    ApiCode::UntrustedCertificate,
                    format!("the signing certificate of {identity} is not accepted: {e}"),
                )
            })?;
        if identity.role() != Role::Analyst || identity.federation() != self.federation {
            return Err(SignatureRefusal::new(
                ApiCode::NotAnAnalyst,
                format!(
                    "{identity} is not an analyst of federation {}",
                    self.federation
                ),
            ));
        }
        Ok(identity)
    }

    /// Checks `req` (at its `received_at`) against what this node expects and returns the
    /// analyst who signed it: [`RequestChecker::authenticate`], then the analyst named, the
    /// coordinator, the time window, and last the nonce, which is consumed only when every
    /// other check passed.
    pub fn check(
        &self,
        req: Received<'_>,
        expected: Expected<'_>,
    ) -> Result<Identity, SignatureRefusal> {
        let identity = self.authenticate(req)?;
        let Some(sig) = req.signature else {
            return Err(SignatureRefusal::new(
                ApiCode::UnsignedRequest,
                "not signed",
            ));
        };
        if identity.to_string() != expected.analyst {
            return Err(SignatureRefusal::new(
                ApiCode::BadSignature,
                format!(
                    "the request names {} but is signed by {identity}",
                    expected.analyst
                ),
            ));
        }
        if sig.coordinator != expected.coordinator {
            return Err(SignatureRefusal::new(
                ApiCode::WrongCoordinator,
                if sig.coordinator.is_empty() {
                    format!(
                        "the request was signed without a coordinator (a version-1 client?) but \
                         came through {}; sign it with this version of `cxfed query`",
                        expected.coordinator
                    )
                } else {
                    format!(
                        "the analyst signed the request for coordinator {} but it came through {}",
                        sig.coordinator, expected.coordinator
                    )
                },
            ));
        }
        let now = req.received_at;
        let skew = now.checked_sub(sig.issued_at).map(i64::unsigned_abs);
        if skew.is_none_or(|d| d > FRESHNESS_SECS as u64) {
            return Err(SignatureRefusal::new(
                ApiCode::StaleRequest,
                format!(
                    "the request was signed at {} but this node's clock says {now}; requests are \
                     accepted within {FRESHNESS_SECS} s",
                    sig.issued_at
                ),
            ));
        }
        let key = nonce_key(sig);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| *t >= now - 2 * FRESHNESS_SECS);
        if seen.contains_key(&key) {
            return Err(SignatureRefusal::new(
                ApiCode::ReplayedRequest,
                format!(
                    "nonce {} of {identity} was already answered by this node",
                    sig.nonce
                ),
            ));
        }
        seen.insert(key, sig.issued_at);
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::dev;
    use cxfed_protocol::signing::Signer;

    struct Fixture {
        _dir: tempfile::TempDir,
        checker: RequestChecker,
        analyst: Signer,
        other: Signer,
        node: Signer,
        rogue: Signer,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let agencies = ["SSA".to_string(), "CMS".to_string()];
        let certs = dev("f", &agencies, &dir.path().join("a"), 1, false).expect("certs");
        // Another CA that also calls itself federation "f".
        let rogue = dev("f", &agencies[..1], &dir.path().join("b"), 1, false).expect("certs");
        let signer = |c: &crate::certs::DevCerts, agency, role| {
            crate::client::signer(&c.tls_files(agency, role).expect("files")).expect("signer")
        };
        Fixture {
            checker: RequestChecker::new(&certs.ca_cert, "f").expect("checker"),
            analyst: signer(&certs, "SSA", Role::Analyst),
            other: signer(&certs, "CMS", Role::Analyst),
            node: signer(&certs, "SSA", Role::Node),
            rogue: signer(&rogue, "SSA", Role::Analyst),
            _dir: dir,
        }
    }

    const SSA_ANALYST: &str = "spiffe://f/SSA/analyst/ssa-analyst";

    fn received<'a>(sig: &'a RequestSignature, sql: &'a str, now: i64) -> Received<'a> {
        Received {
            signature: Some(sig),
            sql,
            epsilon: Some(0.5),
            require_all: true,
            received_at: now,
        }
    }

    /// What the SSA node expects of the SSA analyst's query.
    fn at_ssa(analyst: &str) -> Expected<'_> {
        Expected {
            analyst,
            coordinator: "SSA",
        }
    }

    fn kind(r: Result<Identity, SignatureRefusal>) -> &'static str {
        r.err().map_or("accepted", |e| e.kind.slug())
    }

    #[test]
    fn accepts_once_and_refuses_every_kind_of_forgery() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT COUNT(*) FROM experience";
        let sign = |s: &Signer| s.sign("SSA", sql, Some(0.5), true).expect("sign");
        let sig = sign(&f.analyst);
        let id = f
            .checker
            .check(received(&sig, sql, now), at_ssa(SSA_ANALYST))
            .expect("accepted");
        assert_eq!(id.to_string(), f.analyst.identity().to_string());
        assert_eq!(
            kind(
                f.checker
                    .check(received(&sig, sql, now), at_ssa(SSA_ANALYST))
            ),
            "replayed-request"
        );

        let fresh = sign(&f.analyst);
        let altered_sql = "SELECT COUNT(*) FROM operational";
        assert_eq!(
            kind(
                f.checker
                    .check(received(&fresh, altered_sql, now), at_ssa(SSA_ANALYST))
            ),
            "bad-signature"
        );
        let mut altered_eps = received(&fresh, sql, now);
        altered_eps.epsilon = Some(5.0);
        assert_eq!(
            kind(f.checker.check(altered_eps, at_ssa(SSA_ANALYST))),
            "bad-signature"
        );
        let mut altered_all = received(&fresh, sql, now);
        altered_all.require_all = false;
        assert_eq!(
            kind(f.checker.check(altered_all, at_ssa(SSA_ANALYST))),
            "bad-signature"
        );
        // The refusals above did not consume the nonce: the true request still passes.
        assert_eq!(
            kind(
                f.checker
                    .check(received(&fresh, sql, now), at_ssa(SSA_ANALYST))
            ),
            "accepted"
        );

        let mut swapped = sign(&f.analyst);
        swapped.certificate = sign(&f.node).certificate;
        assert_eq!(
            kind(
                f.checker
                    .check(received(&swapped, sql, now), at_ssa(SSA_ANALYST))
            ),
            "bad-signature"
        );

        let by_node = sign(&f.node);
        let node_id = f.node.identity().to_string();
        assert_eq!(
            kind(
                f.checker
                    .check(received(&by_node, sql, now), at_ssa(&node_id))
            ),
            "not-an-analyst"
        );
        let by_rogue = sign(&f.rogue);
        assert_eq!(
            kind(
                f.checker
                    .check(received(&by_rogue, sql, now), at_ssa(SSA_ANALYST))
            ),
            "untrusted-certificate"
        );
        let old = f
            .analyst
            .sign_at("SSA", sql, Some(0.5), true, now - FRESHNESS_SECS - 1)
            .expect("sign");
        assert_eq!(
            kind(
                f.checker
                    .check(received(&old, sql, now), at_ssa(SSA_ANALYST))
            ),
            "stale-request"
        );
        let future = f
            .analyst
            .sign_at("SSA", sql, Some(0.5), true, now + FRESHNESS_SECS + 1)
            .expect("sign");
        assert_eq!(
            kind(
                f.checker
                    .check(received(&future, sql, now), at_ssa(SSA_ANALYST))
            ),
            "stale-request"
        );
        let unsigned = Received {
            signature: None,
            sql,
            epsilon: None,
            require_all: true,
            received_at: now,
        };
        assert_eq!(
            kind(f.checker.check(unsigned, at_ssa(SSA_ANALYST))),
            "unsigned-request"
        );
    }

    #[test]
    fn refuses_a_request_signed_for_another_coordinator_without_using_its_nonce() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT COUNT(*) FROM experience";
        // Signed for SSA's node; CMS's node, which received it forwarded, replays it here.
        let sig = f.analyst.sign("SSA", sql, Some(0.5), true).expect("sign");
        let from_cms = Expected {
            analyst: SSA_ANALYST,
            coordinator: "CMS",
        };
        let refused = f
            .checker
            .check(received(&sig, sql, now), from_cms)
            .expect_err("refused");
        assert_eq!(refused.kind, ApiCode::WrongCoordinator);
        assert!(refused.message.contains("coordinator SSA"), "{refused}");
        // Naming the wrong analyst is refused before the nonce is used, too.
        let other = f.other.identity().to_string();
        assert_eq!(
            kind(f.checker.check(received(&sig, sql, now), at_ssa(&other))),
            "bad-signature"
        );
        // The genuine forwarding from SSA still passes.
        assert_eq!(
            kind(
                f.checker
                    .check(received(&sig, sql, now), at_ssa(SSA_ANALYST))
            ),
            "accepted"
        );
    }

    #[test]
    fn one_analyst_cannot_use_up_anothers_nonce() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT COUNT(*) FROM experience";
        let victim = f.analyst.sign("SSA", sql, Some(0.5), true).expect("sign");
        // CMS's analyst got a request carrying the victim's nonce accepted first (a nonce is
        // only random bits: anyone can sign one they have seen).
        let squatter = f.other.sign("SSA", sql, Some(0.5), true).expect("sign");
        f.checker.remember(&RequestSignature {
            nonce: victim.nonce.clone(),
            ..squatter
        });
        // Nonces are kept per signing certificate: the victim's request still passes, once.
        assert_eq!(
            kind(
                f.checker
                    .check(received(&victim, sql, now), at_ssa(SSA_ANALYST))
            ),
            "accepted"
        );
        assert_eq!(
            kind(
                f.checker
                    .check(received(&victim, sql, now), at_ssa(SSA_ANALYST))
            ),
            "replayed-request"
        );
    }

    #[test]
    fn remembered_nonces_stay_answered() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT 1";
        let sig = f.analyst.sign("SSA", sql, Some(0.5), true).expect("sign");
        f.checker.remember(&sig);
        assert_eq!(
            kind(
                f.checker
                    .check(received(&sig, sql, now), at_ssa(SSA_ANALYST))
            ),
            "replayed-request"
        );
    }
}
