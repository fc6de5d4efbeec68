//! Certificate rotation and revocation without downtime.
//!
//! A node's TLS material is its certificate and key, the CA bundle and the CRLs of its `[tls]`
//! section. [`load`] reads and checks a whole set of them and builds, before anything is
//! swapped, everything that uses them: the server configuration (for new connections to this
//! node), one client per peer (for new connections this node opens as coordinator), and the
//! verifier of analysts' request signatures. [`TlsState`] holds what is in force; the node
//! replaces all of it when it reloads (on SIGHUP, or when the files change — see
//! `server::watch`). Connections already open, and the queries on them, carry on with the
//! material they were opened with.
//!
//! A set that does not check — a key that is not the certificate's, a certificate the CA bundle
//! does not accept or the CRLs revoke, a CRL of no CA in the bundle, an unreadable file, a
//! certificate of another agency — is refused with an error naming the file, and the material
//! in force stays. Keys are never logged.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use cxfed_protocol::Identity;
use rustls::server::danger::ClientCertVerifier;

use crate::config::Peer;
use crate::tls::{self, TlsError, TlsFiles};

/// What a node presents and trusts: for logs, and for tests that check a rotation happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The identity of the certificate presented.
    pub identity: Identity,
    /// Its serial number (hex, `:`-separated).
    pub serial: String,
    /// SHA-256 of its DER (hex).
    pub sha256: String,
    /// Its `notAfter` (RFC 3339).
    pub not_after: String,
    /// CA certificates in the bundle.
    pub cas: usize,
    /// CRLs loaded.
    pub crls: usize,
    /// Certificates those CRLs revoke.
    pub revoked: usize,
}

/// Everything built from one set of TLS files, not yet in force.
pub struct Material {
    /// The files it was read from.
    pub files: TlsFiles,
    /// The server configuration for new connections.
    pub server: Arc<rustls::ServerConfig>,
    /// One client per peer agency, presenting this certificate.
    pub peers: HashMap<String, reqwest::Client>,
    /// The verifier of analysts' signing certificates (CA bundle and CRLs).
    pub requests: Arc<dyn ClientCertVerifier>,
    /// What it presents and trusts.
    pub served: Served,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("files", &self.files)
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

/// When each file was last changed, to notice changes and sets still being written.
pub type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

/// The stamp of `files` now (a missing file is `None`).
pub fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .paths()
        .into_iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

/// Reads and checks `files` for a node of `federation` with `peers`, and builds everything
/// that uses them. The files are read again if one of them changed while being read (a steward
/// copying a new set in), up to three times.
pub fn load(
    files: &TlsFiles,
    federation: &str,
    peers: &[Peer],
    timeout: Duration,
) -> Result<Material, TlsError> {
    let mut attempts = 0;
    loop {
        let before = stamp(files);
        let material = load_once(files, federation, peers, timeout)?;
        attempts += 1;
        if stamp(files) == before || attempts == 3 {
            return Ok(material);
        }
    }
}

fn load_once(
    files: &TlsFiles,
    federation: &str,
    peers: &[Peer],
    timeout: Duration,
) -> Result<Material, TlsError> {
    let server = files.server_config(federation)?;
    let mut clients = HashMap::new();
    for p in peers {
        let client = crate::client::peer_client(files, federation, &p.agency, timeout)?;
        clients.insert(p.agency.clone(), client);
    }
    let trust = files.trust()?;
    let requests = trust.client_verifier(tls::provider())?;
    let chain = tls::load_certs(&files.cert)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: files.cert.clone(),
    })?;
    let served = served(&files.cert, leaf, &trust)?;
    Ok(Material {
        files: files.clone(),
        server,
        peers: clients,
        requests,
        served,
    })
}

fn served(
    path: &Path,
    leaf: &rustls::pki_types::CertificateDer<'_>,
    trust: &tls::Trust,
) -> Result<Served, TlsError> {
    let identity = cxfed_protocol::identity::from_certificate_der(leaf).map_err(|source| {
        TlsError::Identity {
            path: path.to_owned(),
            source,
        }
    })?;
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .and_then(|(_, x)| {
            time::OffsetDateTime::from_unix_timestamp(x.validity().not_after.timestamp()).ok()
        })
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok(Served {
        identity,
        serial: tls::serial_of(leaf),
        sha256: crate::audit::digest(leaf),
        not_after,
        cas: trust.cas(),
        crls: trust.crls.len(),
        revoked: trust.revoked,
    })
}

/// The TLS material in force on a node; every part is replaced whole.
pub struct TlsState {
    /// The server configuration new connections are accepted with (axum-server swaps it
    /// atomically; the acceptor holds a clone).
    server: RustlsConfig,
    peers: RwLock<Arc<HashMap<String, reqwest::Client>>>,
    files: RwLock<TlsFiles>,
    served: RwLock<Arc<Served>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("served", &self.served())
            .finish_non_exhaustive()
    }
}

impl TlsState {
    /// The state of freshly loaded `material`, the request verifier aside (it lives in the
    /// node's [`crate::requests::RequestChecker`]).
    pub fn new(material: &Material) -> TlsState {
        TlsState {
            server: RustlsConfig::from_config(Arc::clone(&material.server)),
            peers: RwLock::new(Arc::new(material.peers.clone())),
            files: RwLock::new(material.files.clone()),
            served: RwLock::new(Arc::new(material.served.clone())),
        }
    }

    /// The server configuration handle for the acceptor.
    pub fn server(&self) -> RustlsConfig {
        self.server.clone()
    }

    /// The client for new requests to the peer of `agency`.
    pub fn peer(&self, agency: &str) -> Option<reqwest::Client> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(agency)
            .cloned()
    }

    /// The files in force.
    pub fn files(&self) -> TlsFiles {
        self.files.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What is presented and trusted now.
    pub fn served(&self) -> Arc<Served> {
        Arc::clone(&self.served.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Checks that `material` may replace what is in force: the certificate must name the same
    /// agency and role (peers accept this node's certificate only for its agency).
    pub fn check(&self, material: &Material) -> Result<(), TlsError> {
        let old = self.served();
        let new = &material.served.identity;
        if new.agency() != old.identity.agency()
            || new.role() != old.identity.role()
            || new.federation() != old.identity.federation()
        {
            return Err(TlsError::BadOwnCertificate {
                path: material.files.cert.clone(),
                reason: format!(
                    "names {new}, but this node serves as {}; a node cannot change agency \
                     without a restart",
                    old.identity
                ),
            });
        }
        Ok(())
    }

    /// Puts `material` in force for new connections (the request verifier is the caller's to
    /// set). Returns what was in force before.
    pub fn install(&self, material: &Material) -> Arc<Served> {
        self.server.reload_from_config(Arc::clone(&material.server));
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material.peers.clone());
        *self.files.write().unwrap_or_else(|p| p.into_inner()) = material.files.clone();
        std::mem::replace(
            &mut *self.served.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(material.served.clone()),
        )
    }
}

/// The paths of `files` as one line for logs.
pub fn describe(files: &TlsFiles) -> String {
    let mut s = format!(
        "cert {}, key {}, ca {}",
        files.cert.display(),
        files.key.display(),
        files.ca.display()
    );
    for c in &files.crl {
        s.push_str(&format!(", crl {}", c.display()));
    }
    s
}
