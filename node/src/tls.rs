//! rustls configurations (TLS 1.3 only, ring) and peer identities.
//!
//! - [`server_config`]: requires a client certificate on every connection, chained to the
//!   federation CA *and* carrying a SPIFFE identity of this federation; every refusal is logged
//!   with the identity the client claimed. Session resumption is off, so every connection is
//!   fully verified.
//! - [`client_config`]: trusts only the federation CA and presents our certificate.
//! - [`peer_identity`]: the identity of a verified peer, from the certificates rustls kept.
//!
//! The `[tls]` section of `node.toml` is a [`TlsFiles`]. Its optional `crl` files (PEM
//! `X509 CRL` blocks, e.g. from `cxfed certs revoke`) are given to every webpki verifier built
//! here: a revoked client or server certificate is refused at the handshake, and the refusal is
//! logged with the identity and serial it presented. A certificate whose CA published no CRL
//! is not refused for that (so a CA roll-over works before the new CA has revoked anything).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cxfed_protocol::identity::{self, Part};
use cxfed_protocol::{Identity, IdentityError, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use serde::{Deserialize, Serialize};

/// ALPN protocols offered by servers and clients, in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read (missing, unreadable, ...).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file is not PEM, or its PEM is malformed.
    #[error("{} is not a valid PEM file: {reason}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A PEM file holds no `CERTIFICATE` block.
    #[error("{} contains no certificate (no CERTIFICATE block)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key block.
    #[error(
        "{} contains no private key (no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds more than one private key, so which one to use is ambiguous.
    #[error("{} contains {count} private keys; exactly one is allowed", path.display())]
    SeveralKeys {
        /// The file.
        path: PathBuf,
        /// How many keys it holds.
        count: usize,
    },
    /// The private key is malformed or of an unsupported type.
    #[error("{} holds an unusable private key: {reason}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA file holds a certificate that cannot be a trust anchor.
    #[error("{} cannot be used as the federation CA: {reason}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificate and the private key are not a pair.
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Our own certificate does not name a usable identity for this use.
    #[error("certificate {}: {reason}", path.display())]
    BadOwnCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Our own certificate's identity could not be read.
    #[error("certificate {}: {source}", path.display())]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// Why its identity is unreadable.
        #[source]
        source: IdentityError,
    },
    /// The configured federation name is not a valid SPIFFE trust domain segment.
    #[error("invalid federation: {0}")]
    Federation(#[source] IdentityError),
    /// A CRL file is unusable: not a CRL, not parseable, or not issued by a CA in the bundle.
    #[error("CRL {}: {reason}", path.display())]
    BadCrl {
        /// The CRL file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration (a bug or an unsupported key).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// The `[tls]` section of `node.toml`: CA, certificate and key PEM files, and optional CRLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The federation CA certificates (every one in the file is a trust anchor: during a CA
    /// roll-over the file holds the old and the new CA).
    pub ca: PathBuf,
    /// Our certificate (leaf first, then any intermediates).
    pub cert: PathBuf,
    /// Our private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM), one path or a list; none by default.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub crl: Vec<PathBuf>,
}

/// `crl = "a.pem"` or `crl = ["a.pem", "b.pem"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl TlsFiles {
    /// CA, certificate and key, no CRL.
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            ca,
            cert,
            key,
            crl: Vec::new(),
        }
    }

    /// The same files with relative paths resolved against `dir` (e.g. the config file's folder).
    pub fn relative_to(&self, dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(&self.ca),
            cert: dir.join(&self.cert),
            key: dir.join(&self.key),
            crl: self.crl.iter().map(|c| dir.join(c)).collect(),
        }
    }

    /// Every file, for watching: CA, certificate, key, then the CRLs.
    pub fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.ca.as_path(), self.cert.as_path(), self.key.as_path()];
        v.extend(self.crl.iter().map(PathBuf::as_path));
        v
    }

    /// The trust anchors and CRLs of these files.
    pub fn trust(&self) -> Result<Trust, TlsError> {
        Trust::load(&self.ca, &self.crl)
    }

    /// [`server_config`] for these files.
    pub fn server_config(&self, federation: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(self, federation)
    }

    /// [`client_config`] for these files.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        client_config(self)
    }
}

/// What a verifier trusts: the CA bundle and the revocation lists, as read from their files.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The CA file (named in errors).
    pub ca_path: PathBuf,
    /// Every certificate of the CA file, as trust anchors.
    pub roots: Arc<RootCertStore>,
    /// The CRLs, DER.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// How many certificates the CRLs revoke, in total.
    pub revoked: usize,
}

impl Trust {
    /// Reads the CA bundle `ca` and the CRLs `crls`. Each CRL must parse and be issued by a CA
    /// of the bundle (else it could never apply: a typo or a CRL of another federation).
    pub fn load(ca: &Path, crls: &[PathBuf]) -> Result<Trust, TlsError> {
        let ca_certs = load_certs(ca)?;
        let mut roots = RootCertStore::empty();
        for cert in &ca_certs {
            roots.add(cert.clone()).map_err(|e| TlsError::BadCa {
                path: ca.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let parsed: Vec<x509_parser::certificate::X509Certificate<'_>> = ca_certs
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, x)| x))
            .collect();
        let mut all = Vec::new();
        let mut revoked = 0;
        for path in crls {
            let bad = |reason: String| TlsError::BadCrl {
                path: path.clone(),
                reason,
            };
            let found: Vec<CertificateRevocationListDer<'static>> = read_pem(path)?
                .into_iter()
                .filter(|(kind, _)| *kind == SectionKind::Crl)
                .map(|(_, der)| CertificateRevocationListDer::from(der))
                .collect();
            if found.is_empty() {
                return Err(bad("contains no X509 CRL block".into()));
            }
            for der in found {
                let (_, crl) = x509_parser::parse_x509_crl(&der)
                    .map_err(|e| bad(format!("does not parse: {e}")))?;
                let named: Vec<_> = parsed
                    .iter()
                    .filter(|c| c.subject().as_raw() == crl.issuer().as_raw())
                    .collect();
                if named.is_empty() {
                    return Err(bad(format!(
                        "issued by \"{}\", which is not a CA in {}",
                        crl.issuer(),
                        ca.display()
                    )));
                }
                if !named
                    .iter()
                    .any(|c| crl.verify_signature(c.public_key()).is_ok())
                {
                    return Err(bad(format!(
                        "its signature does not verify with the key of any CA named \"{}\" in {} \
                         (a CRL of another CA of the same name?)",
                        crl.issuer(),
                        ca.display()
                    )));
                }
                if let Some(next) = crl.next_update()
                    && next.timestamp() < UnixTime::now().as_secs() as i64
                {
                    tracing::warn!(
                        crl = %path.display(),
                        next_update = %next,
                        "CRL is past its nextUpdate; issue a fresh one (cxfed certs revoke --ca-dir ...)"
                    );
                }
                revoked += crl.iter_revoked_certificates().count();
                all.push(der);
            }
        }
        Ok(Trust {
            ca_path: ca.to_owned(),
            roots: Arc::new(roots),
            crls: all,
            revoked,
        })
    }

    /// How many CA certificates the bundle holds.
    pub fn cas(&self) -> usize {
        self.roots.len()
    }

    /// A webpki client-certificate verifier of this trust (CRLs applied; a certificate whose
    /// issuer published no CRL is not refused for it).
    pub fn client_verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let mut b = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider);
        if !self.crls.is_empty() {
            b = b
                .with_crls(self.crls.iter().cloned())
                .allow_unknown_revocation_status();
        }
        b.build().map_err(|e| TlsError::BadCa {
            path: self.ca_path.clone(),
            reason: e.to_string(),
        })
    }

    /// A webpki server-certificate verifier of this trust (CRLs applied as for clients).
    pub fn server_verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        let mut b = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider);
        if !self.crls.is_empty() {
            b = b
                .with_crls(self.crls.iter().cloned())
                .allow_unknown_revocation_status();
        }
        b.build().map_err(|e| TlsError::BadCa {
            path: self.ca_path.clone(),
            reason: e.to_string(),
        })
    }
}

/// The serial number of a certificate, hex with `:` (as `openssl x509 -serial` groups it),
/// or `unparseable`.
pub fn serial_of(cert: &[u8]) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, x)| x.raw_serial_as_string())
        .unwrap_or_else(|_| "unparseable".to_owned())
}

/// The crypto provider used everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = read_pem(path)?;
    let certs: Vec<CertificateDer<'static>> = sections
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the one private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
///
/// Warns if the file is readable by group or others.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = read_pem(path)?;
    let mut keys: Vec<PrivateKeyDer<'static>> = sections
        .into_iter()
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der))
        .collect();
    let key = match keys.len() {
        0 => {
            return Err(TlsError::NoKey {
                path: path.to_owned(),
            });
        }
        1 => keys.remove(0),
        count => {
            return Err(TlsError::SeveralKeys {
                path: path.to_owned(),
                count,
            });
        }
    };
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "private key file is readable by other users; chmod 600 it"
        );
    }
    Ok(key)
}

/// The server configuration of a node of `federation`: TLS 1.3 only, ring, ALPN h2 and
/// http/1.1, client certificate required and checked by [`FederationClientVerifier`].
///
/// Checks that `cert` and `key` are a pair, that `cert` names a `node` of `federation`, and that
/// it is currently accepted by the CA in `ca` and not revoked by the CRLs (a node is also a
/// client of its peers).
pub fn server_config(
    files: &TlsFiles,
    federation: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (ca, cert, key) = (&files.ca, &files.cert, &files.key);
    identity::check_segment(Part::Federation, federation).map_err(TlsError::Federation)?;
    let provider = provider();
    let trust = files.trust()?;
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;

    let own = own_identity_of(cert, &chain)?;
    if own.role() != Role::Node || own.federation() != federation {
        return Err(TlsError::BadOwnCertificate {
            path: cert.to_owned(),
            reason: format!(
                "names {own}, but a node of federation {federation:?} needs \
                 spiffe://{federation}/<agency>/node/<name>"
            ),
        });
    }

    let verifier = FederationClientVerifier::with_trust(&trust, provider.clone(), federation)?;
    if let Err(e) = verifier
        .inner
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
    {
        return Err(TlsError::BadOwnCertificate {
            path: cert.to_owned(),
            reason: format!("not accepted by the CA in {}: {e}", ca.display()),
        });
    }

    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, private_key)
        .map_err(|e| key_error(e, cert, key))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // No resumption: every connection presents and verifies a client certificate.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client configuration: TLS 1.3 only, ring, trusts only the federation CA of `files`
/// (minus what its CRLs revoke), and presents its certificate and key. Offers ALPN h2 and
/// http/1.1.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let (cert, key) = (&files.cert, &files.key);
    let provider = provider();
    let trust = files.trust()?;
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;
    // A certificate without an identity would be refused by every node: say so now.
    own_identity_of(cert, &chain)?;
    let server_verifier = trust.server_verifier(provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, private_key)
        .map_err(|e| key_error(e, cert, key))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration that trusts the federation CA in `ca` but presents **no** client
/// certificate: every node refuses it. For probes and for tests of that refusal.
pub fn anonymous_client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(load_roots(ca)?);
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: ca.to_owned(),
            reason: e.to_string(),
        })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier)
        .with_no_client_auth();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The identity of a peer from the certificates of a verified connection (DER, leaf first, as in
/// `axum_server::tls::TlsInfo::peer_certificates`).
pub fn peer_identity(peer_certificates: &[Vec<u8>]) -> Result<Identity, IdentityError> {
    let leaf = peer_certificates
        .first()
        .ok_or(IdentityError::NoCertificate)?;
    identity::from_certificate_der(leaf)
}

/// Verifies client certificates for one federation.
///
/// Delegates chain, signature, validity and EKU checks to rustls' webpki verifier, then requires
/// the leaf's SPIFFE identity to belong to the federation. Every refusal is logged with
/// `tracing::warn!` with the identity the client claimed and the reason.
pub struct FederationClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    federation: String,
}

impl fmt::Debug for FederationClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederationClientVerifier")
            .field("federation", &self.federation)
            .finish_non_exhaustive()
    }
}

impl FederationClientVerifier {
    /// A verifier trusting `roots` (read from `ca_path`, named in errors) for `federation`.
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        federation: &str,
        ca_path: &Path,
    ) -> Result<FederationClientVerifier, TlsError> {
        let trust = Trust {
            ca_path: ca_path.to_owned(),
            roots,
            crls: Vec::new(),
            revoked: 0,
        };
        Self::with_trust(&trust, provider, federation)
    }

    /// A verifier of `trust` (CA bundle and CRLs) for `federation`.
    pub fn with_trust(
        trust: &Trust,
        provider: Arc<CryptoProvider>,
        federation: &str,
    ) -> Result<FederationClientVerifier, TlsError> {
        identity::check_segment(Part::Federation, federation).map_err(TlsError::Federation)?;
        Ok(FederationClientVerifier {
            inner: trust.client_verifier(provider)?,
            federation: federation.to_owned(),
        })
    }
}

/// What an unverified certificate claims to be, for logs.
fn claimed(cert: &CertificateDer<'_>) -> String {
    identity::from_certificate_der(cert)
        .map(|id| id.to_string())
        .unwrap_or_else(|_| "unparseable".to_owned())
}

impl ClientCertVerifier for FederationClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let claimed_identity = identity::from_certificate_der(end_entity);
        let claimed_str = claimed_identity
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|_| "unparseable".to_owned());
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            let revoked = matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::Revoked)
            );
            tracing::warn!(
                peer = %claimed_str,
                serial = %serial_of(end_entity),
                reason = %e,
                revoked,
                "refused client certificate"
            );
            return Err(e);
        }
        match claimed_identity {
            Ok(id) if id.federation() == self.federation => Ok(ClientCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(
                    peer = %id,
                    reason = %format_args!(
                        "identity belongs to federation {:?}, not {:?}",
                        id.federation(),
                        self.federation
                    ),
                    "refused client certificate"
                );
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
            Err(e) => {
                tracing::warn!(
                    peer = "unparseable",
                    reason = %e,
                    "refused client certificate"
                );
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // Unreachable with TLS 1.3-only configurations; delegate and log like the rest.
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .inspect_err(|e| {
                tracing::warn!(peer = %claimed(cert), reason = %e, "refused client signature");
            })
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|e| {
                tracing::warn!(peer = %claimed(cert), reason = %e, "refused client signature");
            })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Reads every PEM section of a file; a file with none, or with broken PEM, is `NotPem`.
fn read_pem(path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let bytes = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if sections.is_empty() {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
            reason: "no -----BEGIN ...----- block found".into(),
        });
    }
    Ok(sections)
}

/// The CA file as a root store (every certificate in it is a trust anchor).
pub fn load_roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: ca.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The SPIFFE identity of the leaf of our own chain.
fn own_identity_of(path: &Path, chain: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: path.to_owned(),
    })?;
    identity::from_certificate_der(leaf).map_err(|source| TlsError::Identity {
        path: path.to_owned(),
        source,
    })
}

/// Turns rustls' refusal of a certificate/key pair into an error naming both files.
fn key_error(e: rustls::Error, cert: &Path, key: &Path) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        },
        rustls::Error::General(reason) => TlsError::BadKey {
            path: key.to_owned(),
            reason,
        },
        other => TlsError::Rustls(other),
    }
}

/// The request signer made of the key and certificate in `tls` (the key must be PKCS#8, as
/// `cxfed certs dev` writes it).
pub fn signer(tls: &TlsFiles) -> Result<cxfed_protocol::signing::Signer, TlsError> {
    let chain = load_certs(&tls.cert)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: tls.cert.clone(),
    })?;
    let key = load_key(&tls.key)?;
    let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(TlsError::BadKey {
            path: tls.key.clone(),
            reason: "request signing needs a PKCS#8 key (BEGIN PRIVATE KEY); convert it with \
                     `openssl pkcs8 -topk8 -nocrypt`"
                .into(),
        });
    };
    cxfed_protocol::signing::Signer::new(pkcs8.secret_pkcs8_der(), leaf.to_vec()).map_err(|e| {
        TlsError::BadKey {
            path: tls.key.clone(),
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration as StdDuration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection, StreamOwned};
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::certs::{self, DevCerts};

    const FED: &str = "cx-demo";

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        certs: DevCerts,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_owned();
        let certs = certs::dev(FED, &["SSA".into(), "CMS".into()], &root, 30, false).expect("dev");
        Fixture {
            _dir: dir,
            root,
            certs,
        }
    }

    impl Fixture {
        fn files(&self, agency: &str, role: Role) -> TlsFiles {
            self.certs.tls_files(agency, role).expect("issued")
        }

        fn server(&self) -> Arc<rustls::ServerConfig> {
            self.files("SSA", Role::Node)
                .server_config(FED)
                .expect("server config")
        }

        /// Writes a certificate for `identity` signed by the dev CA (or `ca` if given).
        fn custom(
            &self,
            file: &str,
            identity: &str,
            ca: Option<(&str, &str)>,
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
        ) -> TlsFiles {
            let dev_ca = (
                fs::read_to_string(&self.certs.ca_cert).expect("ca"),
                fs::read_to_string(&self.certs.ca_key).expect("ca key"),
            );
            let (ca_pem, ca_key) = ca.unwrap_or((&dev_ca.0, &dev_ca.1));
            let id = Identity::parse_uri(identity).expect("identity");
            let (cert, key) =
                certs::issue(ca_pem, ca_key, &id, &[], not_before, not_after).expect("issue");
            let cert_path = self.root.join(format!("{file}.pem"));
            let key_path = self.root.join(format!("{file}.key"));
            fs::write(&cert_path, cert).expect("write");
            fs::write(&key_path, key).expect("write");
            TlsFiles {
                ca: self.certs.ca_cert.clone(),
                cert: cert_path,
                key: key_path,
                crl: Vec::new(),
            }
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// Outcome of one real handshake over loopback.
    struct Outcome {
        /// What the server saw: the peer identity, or the handshake error.
        server: Result<Identity, String>,
        /// Whether the client could exchange application data.
        client: Result<(), String>,
    }

    /// Runs a real TLS handshake over 127.0.0.1 and exchanges one message each way.
    fn handshake(server: Arc<rustls::ServerConfig>, client: rustls::ClientConfig) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_thread = thread::spawn(move || -> Result<Identity, String> {
            let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
            tcp.set_read_timeout(Some(StdDuration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let conn = ServerConnection::new(server).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            let peer: Vec<Vec<u8>> = tls
                .conn
                .peer_certificates()
                .unwrap_or_default()
                .iter()
                .map(|c| c.to_vec())
                .collect();
            tls.write_all(b"pong").map_err(|e| e.to_string())?;
            tls.flush().map_err(|e| e.to_string())?;
            tls.conn.send_close_notify();
            let _ = tls.flush();
            peer_identity(&peer).map_err(|e| e.to_string())
        });

        let client_result = (|| -> Result<(), String> {
            let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            tcp.set_read_timeout(Some(StdDuration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let conn = ClientConnection::new(Arc::new(client), name).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, tcp);
            tls.write_all(b"ping").map_err(|e| e.to_string())?;
            tls.flush().map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            if &buf != b"pong" {
                return Err(format!("unexpected reply {buf:?}"));
            }
            Ok(())
        })();
        let server_result = server_thread
            .join()
            .unwrap_or_else(|_| Err("server thread panicked".into()));
        Outcome {
            server: server_result,
            client: client_result,
        }
    }

    fn assert_refused(outcome: &Outcome, server_reason: &str) {
        match &outcome.server {
            Ok(id) => panic!("server accepted {id}"),
            Err(e) => assert!(e.contains(server_reason), "server error {e:?}"),
        }
        assert!(outcome.client.is_err(), "client exchanged data");
    }

    #[test]
    fn accepts_same_federation_client() {
        let f = fixture();
        for (agency, role) in [
            ("SSA", Role::Analyst),
            ("CMS", Role::Node),
            ("CMS", Role::Auditor),
        ] {
            let client = f
                .files(agency, role)
                .client_config()
                .expect("client config");
            let outcome = handshake(f.server(), client);
            assert_eq!(outcome.client, Ok(()));
            let id = outcome.server.expect("accepted");
            assert_eq!(id.federation(), FED);
            assert_eq!(id.agency(), agency);
            assert_eq!(id.role(), role);
        }
    }

    #[test]
    fn refuses_client_without_certificate() {
        let f = fixture();
        let client = anonymous_client_config(&f.certs.ca_cert).expect("client config");
        let outcome = handshake(f.server(), client);
        assert_refused(&outcome, "no certificates");
    }

    #[test]
    fn refuses_client_from_foreign_ca() {
        let f = fixture();
        // A foreign CA copying our CA's name (so webpki tries it and the signature fails), and
        // one with another name (so no issuer is found at all).
        for (foreign_fed, reason) in [(FED, "BadSignature"), ("elsewhere", "UnknownIssuer")] {
            let (foreign_ca, foreign_key) = certs::new_ca(foreign_fed).expect("foreign ca");
            let files = f.custom(
                "foreign",
                "spiffe://cx-demo/SSA/analyst/ssa-analyst",
                Some((&foreign_ca, &foreign_key)),
                now() - Duration::hours(1),
                now() + Duration::days(1),
            );
            // `files.ca` is the real CA: the client trusts the server; only its cert is foreign.
            let client = files.client_config().expect("client config");
            let outcome = handshake(f.server(), client);
            assert_refused(&outcome, reason);
        }
    }

    #[test]
    fn refuses_expired_client_certificate() {
        let f = fixture();
        let files = f.custom(
            "expired",
            "spiffe://cx-demo/SSA/analyst/ssa-analyst",
            None,
            now() - Duration::days(10),
            now() - Duration::days(1),
        );
        let client = files.client_config().expect("client config");
        let outcome = handshake(f.server(), client);
        assert_refused(&outcome, "expired");
    }

    #[test]
    fn refuses_not_yet_valid_client_certificate() {
        let f = fixture();
        let files = f.custom(
            "future",
            "spiffe://cx-demo/SSA/analyst/ssa-analyst",
            None,
            now() + Duration::days(1),
            now() + Duration::days(10),
        );
        let client = files.client_config().expect("client config");
        let outcome = handshake(f.server(), client);
        assert_refused(&outcome, "not valid yet");
    }

    #[test]
    fn refuses_client_of_another_federation() {
        let f = fixture();
        let files = f.custom(
            "other-fed",
            "spiffe://other-fed/SSA/analyst/ssa-analyst",
            None,
            now() - Duration::hours(1),
            now() + Duration::days(1),
        );
        let client = files.client_config().expect("client config");
        let outcome = handshake(f.server(), client);
        assert_refused(&outcome, "ApplicationVerificationFailure");
    }

    #[test]
    fn refuses_client_certificate_without_spiffe_id() {
        let f = fixture();
        // `issue` always writes a SPIFFE ID, so sign a bare clientAuth certificate by hand
        // with the dev CA (same subject name and default key identifier method as `certs`).
        let ca_key = rcgen::KeyPair::from_pem(&fs::read_to_string(&f.certs.ca_key).expect("key"))
            .expect("ca key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{FED} federation CA"));
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_before = now() - Duration::hours(1);
        params.not_after = now() + Duration::days(1);
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");

        let mut roots = RootCertStore::empty();
        for ca in load_certs(&f.certs.ca_cert).expect("ca") {
            roots.add(ca).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("client config");
        let outcome = handshake(f.server(), client);
        assert_refused(&outcome, "ApplicationVerificationFailure");
    }

    /// Collects what `tracing` writes, for checking refusal logs.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logs_refusals_with_the_claimed_identity_and_reason() {
        let f = fixture();
        let roots = Arc::new(load_roots(&f.certs.ca_cert).expect("roots"));
        let verifier = FederationClientVerifier::new(roots, provider(), FED, &f.certs.ca_cert)
            .expect("verifier");
        let other = f.custom(
            "other-fed",
            "spiffe://other-fed/SSA/analyst/eve",
            None,
            now() - Duration::hours(1),
            now() + Duration::days(1),
        );
        let expired = f.custom(
            "expired",
            "spiffe://cx-demo/SSA/analyst/old",
            None,
            now() - Duration::days(10),
            now() - Duration::days(1),
        );
        let good = f.files("SSA", Role::Analyst);

        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for files in [&other, &expired, &good] {
                let chain = load_certs(&files.cert).expect("cert");
                let _ = verifier.verify_client_cert(&chain[0], &[], UnixTime::now());
            }
            let garbage = CertificateDer::from(b"garbage".to_vec());
            let _ = verifier.verify_client_cert(&garbage, &[], UnixTime::now());
        });
        let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("WARN") && l.contains("refused client certificate"))
        );
        assert!(
            lines[0].contains("spiffe://other-fed/SSA/analyst/eve"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("federation"), "{}", lines[0]);
        assert!(
            lines[1].contains("spiffe://cx-demo/SSA/analyst/old"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("expired"), "{}", lines[1]);
        assert!(lines[2].contains("unparseable"), "{}", lines[2]);
    }

    #[test]
    fn crl_refuses_a_revoked_client_at_the_handshake_and_logs_its_serial() {
        let f = fixture();
        let crl = f.root.join(certs::CRL_FILE);
        let revoked = f.files("SSA", Role::Analyst);
        let written = certs::revoke(&f.root, &crl, std::slice::from_ref(&revoked.cert), None, 30)
            .expect("revoke");
        let serial = written.certs[0].serial.clone();
        let mut node = f.files("SSA", Role::Node);
        node.crl = vec![crl.clone()];
        let server = node.server_config(FED).expect("server config");

        let outcome = handshake(server.clone(), revoked.client_config().expect("client"));
        assert_refused(&outcome, "Revoked");

        // The refusal is logged with the identity and serial (the handshake's server thread
        // logs to the global subscriber; check the verifier itself here).
        let trust = node.trust().expect("trust");
        assert_eq!((trust.crls.len(), trust.revoked), (1, 1));
        let verifier =
            FederationClientVerifier::with_trust(&trust, provider(), FED).expect("verifier");
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let chain = load_certs(&revoked.cert).expect("cert");
            let e = verifier
                .verify_client_cert(&chain[0], &[], UnixTime::now())
                .expect_err("revoked");
            assert_eq!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::Revoked)
            );
        });
        let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
        assert!(log.contains("refused client certificate"), "{log}");
        assert!(
            log.contains("spiffe://cx-demo/SSA/analyst/ssa-analyst"),
            "{log}"
        );
        assert!(
            log.contains(&serial) && log.contains("revoked=true"),
            "{log}"
        );

        // Every other certificate of the CA is still accepted, the same node's too.
        for (agency, role) in [("CMS", Role::Analyst), ("SSA", Role::Steward)] {
            let outcome = handshake(
                server.clone(),
                f.files(agency, role).client_config().expect("c"),
            );
            assert_eq!(outcome.client, Ok(()), "{agency} {role}");
        }
        // Without the CRL the same certificate is accepted (the CRL is what refuses it).
        let outcome = handshake(f.server(), revoked.client_config().expect("client"));
        assert_eq!(outcome.client, Ok(()));
    }

    #[test]
    fn crl_refuses_a_revoked_server_and_a_revoked_own_certificate() {
        let f = fixture();
        let crl = f.root.join(certs::CRL_FILE);
        let cms_node = f.files("CMS", Role::Node);
        certs::revoke(
            &f.root,
            &crl,
            std::slice::from_ref(&cms_node.cert),
            None,
            30,
        )
        .expect("revoke");
        // A client with the CRL refuses the revoked node's server certificate.
        let mut analyst = f.files("SSA", Role::Analyst);
        analyst.crl = vec![crl.clone()];
        let cms_server = cms_node.server_config(FED).expect("server");
        let outcome = handshake(cms_server, analyst.client_config().expect("client"));
        assert!(outcome.client.is_err(), "client accepted a revoked server");
        // A node refuses to serve with its own revoked certificate, naming it.
        let mut own = cms_node.clone();
        own.crl = vec![crl];
        let err = own.server_config(FED).expect_err("revoked own cert");
        assert!(err.to_string().contains("node.pem"), "{err}");
        assert!(err.to_string().contains("Revoked"), "{err}");
    }

    #[test]
    fn bad_crl_files_are_refused_naming_the_file() {
        let f = fixture();
        let mut files = f.files("SSA", Role::Node);
        files.crl = vec![f.root.join("missing-crl.pem")];
        let err = files.server_config(FED).expect_err("missing");
        assert!(err.to_string().contains("missing-crl.pem"), "{err}");

        files.crl = vec![files.cert.clone()];
        let err = files.server_config(FED).expect_err("not a CRL");
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err}");
        assert!(err.to_string().contains("no X509 CRL"), "{err}");

        // A CRL of another CA could never apply: refused.
        let other = tempfile::tempdir().expect("tempdir");
        certs::dev(FED, &["SSA".into()], other.path(), 30, false).expect("dev");
        let foreign = other.path().join(certs::CRL_FILE);
        certs::revoke(other.path(), &foreign, &[], None, 30).expect("empty crl");
        files.crl = vec![foreign];
        let err = files.server_config(FED).expect_err("foreign CRL");
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err}");
        // Same CA name (both dev CAs are "cx-demo federation CA"), another key.
        assert!(err.to_string().contains("does not verify"), "{err}");
        assert!(
            err.to_string()
                .contains(other.path().to_str().expect("utf8")),
            "{err}"
        );
        let elsewhere = tempfile::tempdir().expect("tempdir");
        certs::dev("elsewhere", &["SSA".into()], elsewhere.path(), 30, false).expect("dev");
        let named = elsewhere.path().join(certs::CRL_FILE);
        certs::revoke(elsewhere.path(), &named, &[], None, 30).expect("empty crl");
        files.crl = vec![named];
        let err = files.server_config(FED).expect_err("foreign CRL");
        assert!(err.to_string().contains("not a CA in"), "{err}");
    }

    #[test]
    fn a_ca_bundle_of_two_cas_accepts_both_during_a_roll_over() {
        let f = fixture();
        let (new_ca, new_key) = certs::new_ca(FED).expect("new ca");
        let new_cert = f.custom(
            "rolled",
            "spiffe://cx-demo/CMS/analyst/cms-analyst",
            Some((&new_ca, &new_key)),
            now() - Duration::hours(1),
            now() + Duration::days(1),
        );
        let bundle = f.root.join("bundle.pem");
        let old = fs::read_to_string(&f.certs.ca_cert).expect("ca");
        fs::write(&bundle, format!("{old}{new_ca}")).expect("write");
        let mut node = f.files("SSA", Role::Node);
        // Before the roll-over the new CA's certificate is refused (same CA name, other key) ...
        let outcome = handshake(f.server(), {
            let mut c = new_cert.clone();
            c.ca = bundle.clone();
            c.client_config().expect("client")
        });
        assert_refused(&outcome, "BadSignature");
        // ... with the bundle, both CAs' certificates are accepted.
        node.ca = bundle.clone();
        let server = node.server_config(FED).expect("server");
        let mut rolled = new_cert;
        rolled.ca = bundle;
        for client in [rolled, f.files("CMS", Role::Analyst)] {
            let outcome = handshake(server.clone(), client.client_config().expect("client"));
            assert_eq!(outcome.client, Ok(()));
        }
    }

    #[test]
    fn refuses_tls12_only_client() {
        let f = fixture();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = f.server();
        let server_thread = thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            tcp.set_read_timeout(Some(StdDuration::from_secs(10)))
                .expect("timeout");
            let conn = ServerConnection::new(server).expect("conn");
            let mut tls = StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 1];
            tls.read(&mut buf).map_err(|e| e.to_string())
        });

        // A minimal TLS 1.2 ClientHello: legacy_version 1.2, no supported_versions extension,
        // one TLS 1.2 cipher suite (ECDHE-ECDSA-AES128-GCM-SHA256).
        let extensions: Vec<u8> = [
            // supported_groups: secp256r1
            &[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17][..],
            // ec_point_formats: uncompressed
            &[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00],
            // signature_algorithms: ecdsa_secp256r1_sha256
            &[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03],
        ]
        .concat();
        let mut body = vec![0x03, 0x03];
        body.extend([0x42; 32]); // random
        body.push(0); // session id
        body.extend([0x00, 0x02, 0xc0, 0x2b]); // cipher suites
        body.extend([0x01, 0x00]); // compression: null
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake_msg = vec![0x01, 0x00];
        handshake_msg.extend((body.len() as u16).to_be_bytes());
        handshake_msg.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend((handshake_msg.len() as u16).to_be_bytes());
        record.extend(handshake_msg);

        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(StdDuration::from_secs(10)))
            .expect("timeout");
        tcp.write_all(&record).expect("send hello");
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply);
        let server_result = server_thread.join().expect("server thread");
        assert!(server_result.is_err(), "server accepted a TLS 1.2 hello");
        // The server answers with a fatal alert (content type 21), protocol_version (70).
        assert!(reply.len() >= 7, "reply {reply:?}");
        assert_eq!(reply[0], 0x15, "reply {reply:?}");
        assert_eq!(&reply[5..7], &[0x02, 70], "reply {reply:?}");
    }

    #[test]
    fn server_refuses_non_node_certificate() {
        let f = fixture();
        let err = f
            .files("SSA", Role::Analyst)
            .server_config(FED)
            .expect_err("refused");
        assert!(matches!(err, TlsError::BadOwnCertificate { .. }), "{err}");
        assert!(err.to_string().contains("node"), "{err}");
    }

    #[test]
    fn server_refuses_node_certificate_of_another_federation() {
        let f = fixture();
        let err = f
            .files("SSA", Role::Node)
            .server_config("other-fed")
            .expect_err("refused");
        assert!(matches!(err, TlsError::BadOwnCertificate { .. }), "{err}");
    }

    #[test]
    fn server_refuses_mismatched_key() {
        let f = fixture();
        let mut files = f.files("SSA", Role::Node);
        files.key = f.files("CMS", Role::Node).key;
        let err = files.server_config(FED).expect_err("refused");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        let err = files.client_config().expect_err("refused");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn server_refuses_expired_own_certificate() {
        let f = fixture();
        let files = f.custom(
            "expired-node",
            "spiffe://cx-demo/SSA/node/ssa-node",
            None,
            now() - Duration::days(10),
            now() - Duration::days(1),
        );
        let err = files.server_config(FED).expect_err("refused");
        assert!(err.to_string().contains("not accepted by the CA"), "{err}");
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let f = fixture();
        let missing = f.root.join("missing.pem");
        let err = load_certs(&missing).expect_err("missing");
        assert!(matches!(err, TlsError::Read { .. }));
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let garbage = f.root.join("garbage.pem");
        fs::write(&garbage, "hello, not pem\n").expect("write");
        let err = load_certs(&garbage).expect_err("garbage");
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let key_as_cert = f.files("SSA", Role::Node).key;
        let err = load_certs(&key_as_cert).expect_err("no cert");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("node.key"), "{err}");

        let cert_as_key = f.files("SSA", Role::Node).cert;
        let err = load_key(&cert_as_key).expect_err("no key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert!(err.to_string().contains("node.pem"), "{err}");

        let truncated = f.root.join("truncated.pem");
        fs::write(&truncated, "-----BEGIN CERTIFICATE-----\nMIIB\n").expect("write");
        let err = load_certs(&truncated).expect_err("truncated");
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");

        let two_keys = f.root.join("two.key");
        let key = fs::read_to_string(f.files("SSA", Role::Node).key).expect("key");
        fs::write(&two_keys, format!("{key}{key}")).expect("write");
        assert!(matches!(
            load_key(&two_keys),
            Err(TlsError::SeveralKeys { count: 2, .. })
        ));
    }

    #[test]
    fn peer_identity_reads_the_leaf() {
        let f = fixture();
        let leaf = load_certs(&f.files("CMS", Role::Steward).cert).expect("cert");
        let ca = load_certs(&f.certs.ca_cert).expect("ca");
        let id = peer_identity(&[leaf[0].to_vec(), ca[0].to_vec()]).expect("identity");
        assert_eq!(id.to_string(), "spiffe://cx-demo/CMS/steward/cms-steward");
        assert_eq!(peer_identity(&[]), Err(IdentityError::NoCertificate));
    }

    #[test]
    fn tls_files_deserialize_from_toml() {
        let files: TlsFiles =
            toml::from_str("ca = \"certs/ca.pem\"\ncert = \"certs/ssa/node.pem\"\nkey = \"k\"\n")
                .expect("toml");
        assert_eq!(files.ca, PathBuf::from("certs/ca.pem"));
        let abs = files.relative_to(Path::new("/etc/cxfed"));
        assert_eq!(abs.cert, PathBuf::from("/etc/cxfed/certs/ssa/node.pem"));
        assert!(
            toml::from_str::<TlsFiles>("ca = \"a\"\ncert = \"b\"\nkey = \"c\"\nx = 1\n").is_err()
        );
    }
}

/// Verifies a node's server certificate: the chain and name via webpki, then that its SPIFFE
/// identity is a `node` of `federation` and, when given, of `agency` — so a coordinator only
/// ever sends a query to the agency it meant to.
#[derive(Debug)]
pub struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    federation: String,
    agency: Option<String>,
}

impl rustls::client::danger::ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                tracing::warn!(
                    server = ?server_name,
                    peer = %claimed(end_entity),
                    serial = %serial_of(end_entity),
                    reason = %e,
                    "refused server certificate"
                );
            })?;
        let wrong = match identity::from_certificate_der(end_entity) {
            Err(e) => Some(format!("no usable identity: {e}")),
            Ok(id) if id.role() != Role::Node => Some(format!("{id} is not a node")),
            Ok(id) if id.federation() != self.federation => {
                Some(format!("{id} is not of federation {}", self.federation))
            }
            Ok(id) if self.agency.as_deref().is_some_and(|a| a != id.agency()) => Some(format!(
                "{id} is not the node of {}",
                self.agency.as_deref().unwrap_or("")
            )),
            Ok(_) => None,
        };
        match wrong {
            None => Ok(verified),
            Some(reason) => {
                tracing::warn!(server = ?server_name, %reason, "refused server certificate");
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Like [`client_config`], but the server must be the `node` of `agency` (any node when
/// `None`) in `federation`.
pub fn node_client_config(
    files: &TlsFiles,
    federation: &str,
    agency: Option<&str>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let trust = files.trust()?;
    let chain = load_certs(&files.cert)?;
    let private_key = load_key(&files.key)?;
    own_identity_of(&files.cert, &chain)?;
    let inner = trust.server_verifier(provider.clone())?;
    let verifier = NodeServerVerifier {
        inner,
        federation: federation.to_string(),
        agency: agency.map(String::from),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, private_key)
        .map_err(|e| key_error(e, &files.cert, &files.key))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
