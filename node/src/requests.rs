//! Checking an analyst's signed request on this node, before anything is planned: the signature
//! over exactly what arrived, the certificate's chain to the federation CA, the analyst role, the
//! time window and the nonce. Every node does this itself, so a coordinator can forward a query
//! but cannot alter it, replay it, or invent one in an analyst's name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

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
    /// `unsigned-request`, `bad-signature`, `untrusted-certificate`, `not-an-analyst`,
    /// `stale-request` or `replayed-request`.
    pub kind: &'static str,
    /// One line for a person.
    pub message: String,
}

impl SignatureRefusal {
    /// The stable code of every signature refusal.
    pub const CODE: &'static str = "CXF-A401";

    fn new(kind: &'static str, message: impl Into<String>) -> Self {
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
}

/// The node's checker; remembers nonces it has accepted for twice the freshness window.
pub struct RequestChecker {
    verifier: Arc<dyn ClientCertVerifier>,
    federation: String,
    seen: Mutex<HashMap<String, i64>>,
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
        Ok(RequestChecker {
            verifier,
            federation: federation.to_owned(),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Records a nonce accepted before (e.g. read back from the audit log after a restart);
    /// nonces too old to be accepted again are not kept.
    pub fn remember(&self, nonce: &str, issued_at: i64) {
        if issued_at < signing::unix_now() - 2 * FRESHNESS_SECS {
            return;
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce.to_owned(), issued_at);
    }

    /// Checks that `req` is signed by an analyst of this federation whose certificate the CA
    /// accepted at the time of signing. No freshness or replay check: this is what an auditor
    /// re-checks on a logged request.
    pub fn authenticate(&self, req: Received<'_>) -> Result<Identity, SignatureRefusal> {
        let sig = req.signature.ok_or_else(|| {
            SignatureRefusal::new(
                "unsigned-request",
                "the request is not signed by an analyst; sign it with `cxfed query`",
            )
        })?;
        if sig.nonce.len() != NONCE_HEX_LEN || signing::unhex(&sig.nonce).is_none() {
            return Err(SignatureRefusal::new(
                "bad-signature",
                format!("nonce must be {NONCE_HEX_LEN} hex digits"),
            ));
        }
        let (cert, identity) =
            signing::verify(sig, &self.federation, req.sql, req.epsilon, req.require_all)
                .map_err(|e| SignatureRefusal::new("bad-signature", e.to_string()))?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(sig.issued_at).unwrap_or(0),
        ));
        self.verifier
            .verify_client_cert(&CertificateDer::from(cert), &[], at)
            .map_err(|e| {
                SignatureRefusal::new(
                    "untrusted-certificate",
                    format!("the signing certificate of {identity} is not accepted: {e}"),
                )
            })?;
        if identity.role() != Role::Analyst || identity.federation() != self.federation {
            return Err(SignatureRefusal::new(
                "not-an-analyst",
                format!(
                    "{identity} is not an analyst of federation {}",
                    self.federation
                ),
            ));
        }
        Ok(identity)
    }

    /// Checks `req` at time `now` (Unix seconds) and returns the analyst who signed it:
    /// [`RequestChecker::authenticate`], then the time window, then the nonce. The nonce is
    /// consumed only when every other check passed.
    pub fn check(&self, req: Received<'_>, now: i64) -> Result<Identity, SignatureRefusal> {
        let identity = self.authenticate(req)?;
        let Some(sig) = req.signature else {
            return Err(SignatureRefusal::new("unsigned-request", "not signed"));
        };
        let skew = now.checked_sub(sig.issued_at).map(i64::unsigned_abs);
        if skew.is_none_or(|d| d > FRESHNESS_SECS as u64) {
            return Err(SignatureRefusal::new(
                "stale-request",
                format!(
                    "the request was signed at {} but this node's clock says {now}; requests are \
                     accepted within {FRESHNESS_SECS} s",
                    sig.issued_at
                ),
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| *t >= now - 2 * FRESHNESS_SECS);
        if seen.contains_key(&sig.nonce) {
            return Err(SignatureRefusal::new(
                "replayed-request",
                format!("nonce {} was already answered by this node", sig.nonce),
            ));
        }
        seen.insert(sig.nonce.clone(), sig.issued_at);
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
        node: Signer,
        rogue: Signer,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("f", &["SSA".into()], &dir.path().join("a"), 1, false).expect("certs");
        // Another CA that also calls itself federation "f".
        let rogue = dev("f", &["SSA".into()], &dir.path().join("b"), 1, false).expect("certs");
        let signer = |c: &crate::certs::DevCerts, role| {
            crate::client::signer(&c.tls_files("SSA", role).expect("files")).expect("signer")
        };
        Fixture {
            checker: RequestChecker::new(&certs.ca_cert, "f").expect("checker"),
            analyst: signer(&certs, Role::Analyst),
            node: signer(&certs, Role::Node),
            rogue: signer(&rogue, Role::Analyst),
            _dir: dir,
        }
    }

    fn received<'a>(sig: &'a RequestSignature, sql: &'a str) -> Received<'a> {
        Received {
            signature: Some(sig),
            sql,
            epsilon: Some(0.5),
            require_all: true,
        }
    }

    fn kind(r: Result<Identity, SignatureRefusal>) -> &'static str {
        r.err().map_or("accepted", |e| e.kind)
    }

    #[test]
    fn accepts_once_and_refuses_every_kind_of_forgery() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT COUNT(*) FROM experience";
        let sig = f.analyst.sign(sql, Some(0.5), true).expect("sign");
        let id = f.checker.check(received(&sig, sql), now).expect("accepted");
        assert_eq!(id.to_string(), f.analyst.identity().to_string());
        assert_eq!(
            kind(f.checker.check(received(&sig, sql), now)),
            "replayed-request"
        );

        let fresh = f.analyst.sign(sql, Some(0.5), true).expect("sign");
        let altered_sql = "SELECT COUNT(*) FROM operational";
        assert_eq!(
            kind(f.checker.check(received(&fresh, altered_sql), now)),
            "bad-signature"
        );
        let mut altered_eps = received(&fresh, sql);
        altered_eps.epsilon = Some(5.0);
        assert_eq!(kind(f.checker.check(altered_eps, now)), "bad-signature");
        let mut altered_all = received(&fresh, sql);
        altered_all.require_all = false;
        assert_eq!(kind(f.checker.check(altered_all, now)), "bad-signature");
        // The refusals above did not consume the nonce: the true request still passes.
        assert_eq!(
            kind(f.checker.check(received(&fresh, sql), now)),
            "accepted"
        );

        let mut swapped = f.analyst.sign(sql, Some(0.5), true).expect("sign");
        swapped.certificate = f.node.sign(sql, Some(0.5), true).expect("sign").certificate;
        assert_eq!(
            kind(f.checker.check(received(&swapped, sql), now)),
            "bad-signature"
        );

        let by_node = f.node.sign(sql, Some(0.5), true).expect("sign");
        assert_eq!(
            kind(f.checker.check(received(&by_node, sql), now)),
            "not-an-analyst"
        );
        let by_rogue = f.rogue.sign(sql, Some(0.5), true).expect("sign");
        assert_eq!(
            kind(f.checker.check(received(&by_rogue, sql), now)),
            "untrusted-certificate"
        );
        let old = f
            .analyst
            .sign_at(sql, Some(0.5), true, now - FRESHNESS_SECS - 1)
            .expect("sign");
        assert_eq!(
            kind(f.checker.check(received(&old, sql), now)),
            "stale-request"
        );
        let future = f
            .analyst
            .sign_at(sql, Some(0.5), true, now + FRESHNESS_SECS + 1)
            .expect("sign");
        assert_eq!(
            kind(f.checker.check(received(&future, sql), now)),
            "stale-request"
        );
        let unsigned = Received {
            signature: None,
            sql,
            epsilon: None,
            require_all: true,
        };
        assert_eq!(kind(f.checker.check(unsigned, now)), "unsigned-request");
    }

    #[test]
    fn remembered_nonces_stay_answered() {
        let f = fixture();
        let now = signing::unix_now();
        let sql = "SELECT 1";
        let sig = f.analyst.sign(sql, Some(0.5), true).expect("sign");
        f.checker.remember(&sig.nonce, sig.issued_at);
        assert_eq!(
            kind(f.checker.check(received(&sig, sql), now)),
            "replayed-request"
        );
    }
}
