//! Development CA and identities (`cxfed certs dev`).
//!
//! [`dev`] makes a federation CA and, for every agency, one certificate per [`Role`]:
//!
//! ```text
//! OUT/ca.pem  OUT/ca.key                      federation CA (ECDSA P-256, pathlen 0)
//! OUT/<agency>/node.pem     node.key          spiffe://<fed>/<AGENCY>/node/<agency>-node
//!                                             + DNS localhost, <agency>; IP 127.0.0.1
//! OUT/<agency>/analyst.pem  analyst.key       spiffe://<fed>/<AGENCY>/analyst/<agency>-analyst
//! OUT/<agency>/steward.pem  steward.key       ...
//! OUT/<agency>/auditor.pem  auditor.key       ...
//! ```
//!
//! Every file is written atomically (temporary file + rename); `.key` files are created with
//! mode 0600 so they are never readable by others, not even briefly. `ca.key` is written last,
//! and an existing one is only replaced with `force`.
//!
//! [`renew`] (`cxfed certs renew`) replaces a certificate and key with a new pair for the same
//! identity (a rotation; with a new CA in the CA directory, a CA roll-over).
//! [`revoke`] (`cxfed certs revoke`) adds certificates to the CA's revocation list,
//! `OUT/crl.pem`, re-signing it with a higher CRL number; nodes that list it in `[tls] crl`
//! refuse those certificates at the handshake from their next reload (SIGHUP) on.
//!
//! [`issue`] and [`new_ca`] are the building blocks, also used by tests that need expired,
//! foreign or otherwise unusual certificates. Keys leave this module only as PEM strings and are
//! never logged.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cxfed_protocol::identity::{self, Part};
use cxfed_protocol::{Identity, IdentityError, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

use crate::tls::TlsFiles;

/// Default validity of development certificates, in days.
pub const DEFAULT_VALID_DAYS: u32 = 90;

/// Validity of a CA made by [`new_ca`], in days.
pub const NEW_CA_VALID_DAYS: u32 = 365;

/// How far back `not_before` is set, to tolerate clock skew between machines.
const BACKDATE: Duration = Duration::hours(1);

/// File name of the CA certificate in a `dev` output directory.
pub const CA_CERT_FILE: &str = "ca.pem";

/// File name of the CA private key in a `dev` output directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// File name of the revocation list [`revoke`] writes in a CA directory.
pub const CRL_FILE: &str = "crl.pem";

/// Default days from a CRL's issue to its `nextUpdate`.
pub const DEFAULT_CRL_DAYS: u32 = 30;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A federation, agency or identity is not a valid SPIFFE segment.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// `dev` was given no agency.
    #[error("no agencies given: pass at least one, e.g. --agencies SSA,CMS,OPM")]
    NoAgencies,
    /// Two agencies would share one output directory (names equal ignoring case).
    #[error("agency {0:?} is listed twice (agency names are compared ignoring case)")]
    DuplicateAgency(String),
    /// The validity window is empty or cannot be represented.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// The output already holds a CA key and `force` was not given.
    #[error("refusing to overwrite existing CA key {}: pass --force to replace the CA", .0.display())]
    CaKeyExists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The CA certificate or key given to [`issue`] is unusable.
    #[error("invalid CA: {0}")]
    InvalidCa(String),
    /// rcgen could not generate a key or certificate (a bug or an unsupported input).
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// A certificate or CRL given to [`revoke`] is unusable.
    #[error("{}: {reason}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One certificate [`revoke`] was asked to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCert {
    /// The certificate file.
    pub path: PathBuf,
    /// Its identity, when it names one.
    pub identity: Option<Identity>,
    /// Its serial (hex, `:`-separated).
    pub serial: String,
    /// Whether the CRL already listed it.
    pub already: bool,
}

/// What [`revoke`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlWritten {
    /// The CRL file.
    pub path: PathBuf,
    /// Its CRL number (one more than the CRL it replaced).
    pub number: u64,
    /// How many certificates it revokes in all.
    pub revoked: usize,
    /// The certificates asked for, in order.
    pub certs: Vec<RevokedCert>,
    /// Its `nextUpdate` (RFC 3339).
    pub next_update: String,
}

/// A text file (a PEM), or an error naming it.
fn read_text(p: &Path) -> Result<String, CertError> {
    fs::read_to_string(p).map_err(|source| CertError::Io {
        path: p.to_owned(),
        source,
    })
}

/// Revokes `certs` (PEM files issued by the CA in `ca_dir`): reads `ca_dir/ca.pem` and
/// `ca_dir/ca.key`, keeps every entry of the CRL at `crl` (when it exists), adds the
/// certificates' serials with `reason`, and writes the CRL again, atomically, signed by the CA,
/// with the next CRL number and a `nextUpdate` `valid_days` away. With no certificate, re-issues
/// the CRL as it is (a fresh `nextUpdate`; also how an empty CRL is made).
///
/// Refuses a certificate of another CA, and a CRL file of another CA, naming the file.
pub fn revoke(
    ca_dir: &Path,
    crl: &Path,
    certs: &[PathBuf],
    reason: Option<rcgen::RevocationReason>,
    valid_days: u32,
) -> Result<CrlWritten, CertError> {
    use rcgen::{CertificateRevocationListParams, RevokedCertParams};
    if valid_days == 0 {
        return Err(CertError::InvalidValidity(
            "a CRL must be valid for at least 1 day".into(),
        ));
    }
    let read = read_text;
    let ca_path = ca_dir.join(CA_CERT_FILE);
    let ca_pem = read(&ca_path)?;
    let ca_key_pem = read(&ca_dir.join(CA_KEY_FILE))?;
    let ca_der = pem_certificate(&ca_pem)?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| CertError::InvalidCa(format!("CA certificate does not parse: {e}")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| CertError::InvalidCa(format!("CA key does not parse: {e}")))?;
    if ca_key.subject_public_key_info() != ca.public_key().raw {
        return Err(CertError::InvalidCa(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    let subject = ca.subject().as_raw().to_vec();
    let key_identifier_method = ca
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
            }
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256);
    let issuer = issuer_from(&ca, ca_key)?;
    let unusable = |path: &Path, reason: String| CertError::Unusable {
        path: path.to_owned(),
        reason,
    };

    // The entries of the CRL in force.
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    let mut number: u64 = 0;
    if fs::symlink_metadata(crl).is_ok() {
        use rustls::pki_types::CertificateRevocationListDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateRevocationListDer::from_pem_file(crl)
            .map_err(|e| unusable(crl, format!("not a PEM X509 CRL: {e}")))?;
        let (_, old) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| unusable(crl, format!("CRL does not parse: {e}")))?;
        if old.issuer().as_raw() != subject.as_slice()
            || old.verify_signature(ca.public_key()).is_err()
        {
            return Err(unusable(
                crl,
                format!(
                    "the CRL is issued by \"{}\" but not signed by the CA in {}",
                    old.issuer(),
                    ca_path.display()
                ),
            ));
        }
        number = old
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        for entry in old.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(unsigned(entry.raw_serial())),
                revocation_time: OffsetDateTime::from_unix_timestamp(
                    entry.revocation_date.timestamp(),
                )
                .map_err(|e| unusable(crl, format!("revocation date: {e}")))?,
                reason_code: entry.reason_code().and_then(|(_, r)| reason_from(r.0)),
                invalidity_date: None,
            });
        }
    }

    let now = OffsetDateTime::now_utc();
    let mut asked = Vec::new();
    for path in certs {
        let pem = read(path)?;
        let der = pem_certificate(&pem)
            .map_err(|_| unusable(path, "contains no PEM certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| unusable(path, format!("certificate does not parse: {e}")))?;
        if cert.issuer().as_raw() != subject.as_slice()
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            return Err(unusable(
                path,
                format!(
                    "issued by \"{}\" but not signed by the CA in {}: revoke it with its own CA",
                    cert.issuer(),
                    ca_path.display()
                ),
            ));
        }
        let serial = SerialNumber::from_slice(unsigned(cert.raw_serial()));
        let already = revoked.iter().any(|r| r.serial_number == serial);
        if !already {
            revoked.push(RevokedCertParams {
                serial_number: serial,
                revocation_time: now,
                reason_code: reason,
                invalidity_date: None,
            });
        }
        asked.push(RevokedCert {
            path: path.clone(),
            identity: identity::from_certificate_der(&der).ok(),
            serial: cert.raw_serial_as_string(),
            already,
        });
    }

    let next_update = now
        .checked_add(Duration::days(i64::from(valid_days)))
        .ok_or_else(|| CertError::InvalidValidity(format!("{valid_days} days is too far")))?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update,
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method,
    };
    let total = params.revoked_certs.len();
    let pem = params.signed_by(&issuer)?.pem()?;
    if let Some(dir) = crl.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    write_atomic(crl, pem.as_bytes(), false)?;
    for c in &asked {
        tracing::info!(
            cert = %c.path.display(),
            identity = %c.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
            serial = %c.serial,
            already = c.already,
            crl = %crl.display(),
            "revoked certificate"
        );
    }
    Ok(CrlWritten {
        path: crl.to_owned(),
        number: number + 1,
        revoked: total,
        certs: asked,
        next_update: next_update
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    })
}

/// A DER INTEGER's content without its sign byte(s), so serials compare as numbers.
fn unsigned(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[zeros.min(bytes.len().saturating_sub(1))..]
}

/// What [`renew`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// The identity, as in the certificate it replaced.
    pub identity: Identity,
    /// The serial of the certificate replaced.
    pub old_serial: String,
    /// The serial of the new one.
    pub new_serial: String,
    /// Its `notAfter` (RFC 3339).
    pub not_after: String,
}

/// Replaces the certificate at `cert` and the key at `key` with a new pair for the same identity
/// and server names, issued by the CA in `ca_dir` (which may be a new CA, during a roll-over),
/// valid from an hour ago for `valid_days` days. The key is written first, then the
/// certificate, each atomically; a node picks the pair up on SIGHUP (or once both files stop
/// changing).
pub fn renew(
    ca_dir: &Path,
    cert: &Path,
    key: &Path,
    valid_days: u32,
) -> Result<Renewed, CertError> {
    if valid_days == 0 {
        return Err(CertError::InvalidValidity(
            "valid_days must be at least 1".into(),
        ));
    }
    let read = read_text;
    let unusable = |reason: String| CertError::Unusable {
        path: cert.to_owned(),
        reason,
    };
    let ca_pem = read(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key = read(&ca_dir.join(CA_KEY_FILE))?;
    let old_der = pem_certificate(&read(cert)?)
        .map_err(|_| unusable("contains no PEM certificate".into()))?;
    let identity = identity::from_certificate_der(&old_der)
        .map_err(|e| unusable(format!("names no identity to renew: {e}")))?;
    let (_, old) = x509_parser::parse_x509_certificate(&old_der)
        .map_err(|e| unusable(format!("certificate does not parse: {e}")))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = old.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).map(IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*ip).map(IpAddr::from).ok(),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let now = OffsetDateTime::now_utc();
    let not_after = now
        .checked_add(Duration::days(i64::from(valid_days)))
        .ok_or_else(|| CertError::InvalidValidity(format!("{valid_days} days is too far")))?;
    let (cert_pem, key_pem) = issue(
        &ca_pem,
        &ca_key,
        &identity,
        &names,
        now - BACKDATE,
        not_after,
    )?;
    let key_pem = Secret(key_pem);
    let new_der = pem_certificate(&cert_pem)?;
    let new_serial = x509_parser::parse_x509_certificate(&new_der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default();
    write_atomic(key, key_pem.expose().as_bytes(), true)?;
    write_atomic(cert, cert_pem.as_bytes(), false)?;
    let renewed = Renewed {
        identity,
        old_serial: old.raw_serial_as_string(),
        new_serial,
        not_after: not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    tracing::info!(
        identity = %renewed.identity,
        old_serial = %renewed.old_serial,
        new_serial = %renewed.new_serial,
        cert = %cert.display(),
        "renewed certificate"
    );
    Ok(renewed)
}

/// The rcgen reason of an X.509 reason code.
fn reason_from(code: u8) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason as R;
    Some(match code {
        1 => R::KeyCompromise,
        2 => R::CaCompromise,
        3 => R::AffiliationChanged,
        4 => R::Superseded,
        5 => R::CessationOfOperation,
        6 => R::CertificateHold,
        8 => R::RemoveFromCrl,
        9 => R::PrivilegeWithdrawn,
        10 => R::AaCompromise,
        _ => return None,
    })
}

/// One certificate and key written by [`dev`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedIdentity {
    /// The identity in the certificate's URI SAN.
    pub identity: Identity,
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key (mode 0600).
    pub key: PathBuf,
}

/// The certificates of one agency written by [`dev`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyCerts {
    /// The agency as given, e.g. `SSA`.
    pub agency: String,
    /// Its directory, `OUT/<agency lowercase>`.
    pub dir: PathBuf,
    /// One entry per role, in [`Role::ALL`] order.
    pub identities: Vec<IssuedIdentity>,
}

/// Everything [`dev`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    /// The federation name.
    pub federation: String,
    /// `OUT/ca.pem`.
    pub ca_cert: PathBuf,
    /// `OUT/ca.key` (mode 0600).
    pub ca_key: PathBuf,
    /// One entry per agency, in the order given.
    pub agencies: Vec<AgencyCerts>,
}

impl DevCerts {
    /// The certificate written for `agency` (compared ignoring case) and `role`.
    pub fn get(&self, agency: &str, role: Role) -> Option<&IssuedIdentity> {
        self.agencies
            .iter()
            .find(|a| a.agency.eq_ignore_ascii_case(agency))?
            .identities
            .iter()
            .find(|i| i.identity.role() == role)
    }

    /// The `[tls]` files for `agency` acting as `role` (CA, certificate, key).
    pub fn tls_files(&self, agency: &str, role: Role) -> Option<TlsFiles> {
        self.get(agency, role).map(|issued| TlsFiles {
            ca: self.ca_cert.clone(),
            cert: issued.cert.clone(),
            key: issued.key.clone(),
            crl: Vec::new(),
        })
    }
}

/// Makes a development federation: a CA in `out/ca.pem` + `out/ca.key` and, for each agency, a
/// node, analyst, steward and auditor certificate in `out/<agency lowercase>/`.
///
/// Certificates are valid from one hour ago for `valid_days` days. An existing `out/ca.key` is
/// refused unless `force` is set. Everything is generated in memory before the first file is
/// written, and `ca.key` is written last, so a run that fails midway can simply be repeated.
pub fn dev(
    federation: &str,
    agencies: &[String],
    out: &Path,
    valid_days: u32,
    force: bool,
) -> Result<DevCerts, CertError> {
    identity::check_segment(Part::Federation, federation)?;
    if agencies.is_empty() {
        return Err(CertError::NoAgencies);
    }
    for (i, agency) in agencies.iter().enumerate() {
        identity::check_segment(Part::Agency, agency)?;
        if agencies[..i]
            .iter()
            .any(|earlier| earlier.eq_ignore_ascii_case(agency))
        {
            return Err(CertError::DuplicateAgency(agency.clone()));
        }
    }
    if valid_days == 0 {
        return Err(CertError::InvalidValidity(
            "valid_days must be at least 1".into(),
        ));
    }
    let ca_cert_path = out.join(CA_CERT_FILE);
    let ca_key_path = out.join(CA_KEY_FILE);
    if !force && fs::symlink_metadata(&ca_key_path).is_ok() {
        return Err(CertError::CaKeyExists(ca_key_path));
    }

    let now = OffsetDateTime::now_utc();
    let not_before = now - BACKDATE;
    let not_after = now
        .checked_add(Duration::days(i64::from(valid_days)))
        .ok_or_else(|| CertError::InvalidValidity(format!("{valid_days} days is too far")))?;

    let (ca_pem, ca_key) = make_ca(federation, not_before, not_after)?;

    // Generate everything first: nothing is written if any step fails.
    struct Pending {
        path: PathBuf,
        contents: Secret,
        private: bool,
    }
    let mut pending = Vec::new();
    let mut result = Vec::new();
    for agency in agencies {
        let lower = agency.to_ascii_lowercase();
        let dir = out.join(&lower);
        let mut identities = Vec::new();
        for role in Role::ALL {
            let identity = Identity::new(
                federation,
                agency,
                role,
                &format!("{lower}-{}", role.as_str()),
            )?;
            let server_names: &[&str] = if role == Role::Node {
                &["localhost", "127.0.0.1", &lower]
            } else {
                &[]
            };
            let (cert_pem, key_pem) = issue(
                &ca_pem,
                ca_key.expose(),
                &identity,
                server_names,
                not_before,
                not_after,
            )?;
            let cert = dir.join(format!("{role}.pem"));
            let key = dir.join(format!("{role}.key"));
            pending.push(Pending {
                path: cert.clone(),
                contents: Secret(cert_pem),
                private: false,
            });
            pending.push(Pending {
                path: key.clone(),
                contents: Secret(key_pem),
                private: true,
            });
            identities.push(IssuedIdentity {
                identity,
                cert,
                key,
            });
        }
        result.push(AgencyCerts {
            agency: agency.clone(),
            dir,
            identities,
        });
    }

    create_dir(out)?;
    for agency in &result {
        create_dir(&agency.dir)?;
    }
    for file in &pending {
        write_atomic(&file.path, file.contents.expose().as_bytes(), file.private)?;
    }
    write_atomic(&ca_cert_path, ca_pem.as_bytes(), false)?;
    write_atomic(&ca_key_path, ca_key.expose().as_bytes(), true)?;
    tracing::info!(
        federation,
        out = %out.display(),
        agencies = agencies.len(),
        "wrote development certificates"
    );

    Ok(DevCerts {
        federation: federation.to_owned(),
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        agencies: result,
    })
}

/// Makes a new federation CA valid for [`NEW_CA_VALID_DAYS`]: returns (certificate PEM,
/// PKCS#8 key PEM). Also useful for tests that need a foreign CA.
pub fn new_ca(federation: &str) -> Result<(String, String), CertError> {
    let now = OffsetDateTime::now_utc();
    let (cert, key) = make_ca(
        federation,
        now - BACKDATE,
        now + Duration::days(i64::from(NEW_CA_VALID_DAYS)),
    )?;
    Ok((cert, key.0))
}

/// Issues a certificate for `identity`, signed by the CA, with a fresh ECDSA P-256 key: returns
/// (certificate PEM, PKCS#8 key PEM).
///
/// `server_names` become DNS SANs, or IP SANs when they parse as IP addresses. Node identities
/// get the serverAuth and clientAuth extended key usages, every other role clientAuth only.
/// Any validity window is accepted as long as `not_before < not_after`, so tests can make
/// expired or not-yet-valid certificates.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    identity: &Identity,
    server_names: &[&str],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, String), CertError> {
    if not_before >= not_after {
        return Err(CertError::InvalidValidity(
            "not_before must be earlier than not_after".into(),
        ));
    }
    let ca_der = pem_certificate(ca_cert_pem)?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| CertError::InvalidCa(format!("CA certificate does not parse: {e}")))?;
    let ca_key = KeyPair::from_pem(ca_key_pem)
        .map_err(|e| CertError::InvalidCa(format!("CA key does not parse: {e}")))?;
    if ca_key.subject_public_key_info() != ca.public_key().raw {
        return Err(CertError::InvalidCa(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    if !ca.is_ca() {
        return Err(CertError::InvalidCa(
            "the CA certificate is not a CA (basicConstraints cA is not set)".into(),
        ));
    }
    let issuer = issuer_from(&ca, ca_key)?;

    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, identity.agency());
    params
        .distinguished_name
        .push(DnType::CommonName, identity.name());
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if identity.role() == Role::Node {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into()?)];
    for name in server_names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into()?),
        });
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;

    // The issuer name is rebuilt from the parsed CA subject: make sure it encodes identically,
    // or no verifier would ever chain this certificate to the CA.
    let (_, leaf) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|e| CertError::InvalidCa(format!("issued certificate does not parse: {e}")))?;
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err(CertError::InvalidCa(
            "the CA subject name uses an encoding this tool cannot reproduce".into(),
        ));
    }
    Ok((cert.pem(), key.serialize_pem()))
}

/// A PEM string that must not be printed.
struct Secret(String);

impl Secret {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A self-signed CA for `federation`: (certificate PEM, key PEM).
fn make_ca(
    federation: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, Secret), CertError> {
    identity::check_segment(Part::Federation, federation)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{federation} federation CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Secret(key.serialize_pem())))
}

/// Rebuilds what rcgen needs to sign as `ca` (its subject name, key identifier and key usages).
///
/// rcgen's own `Issuer::from_ca_cert_pem` needs its `x509-parser` feature, which this crate does
/// not enable; this does the same with the x509-parser we already depend on.
fn issuer_from(
    ca: &X509Certificate<'_>,
    key: KeyPair,
) -> Result<Issuer<'static, KeyPair>, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for attr in ca.subject().iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| CertError::InvalidCa("CA subject has an unsupported OID".into()))?
            .collect();
        let text = attr
            .as_str()
            .map_err(|_| CertError::InvalidCa("CA subject has a non-text attribute".into()))?;
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into()?),
            other => {
                return Err(CertError::InvalidCa(format!(
                    "CA subject uses unsupported string type {other}"
                )));
            }
        };
        params
            .distinguished_name
            .push(DnType::from_oid(&oid), value);
    }
    params.key_identifier_method = ca
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
            }
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(Issuer::new(params, key))
}

/// The DER of the first CERTIFICATE block of a PEM string.
fn pem_certificate(pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| CertError::InvalidCa(format!("CA certificate is not PEM: {e}")))
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep 16 significant bytes
    Ok(SerialNumber::from_slice(&bytes))
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// [`crate::storage::write_atomic`] with this module's error.
fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), CertError> {
    crate::storage::write_atomic(path, contents, private).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use cxfed_protocol::identity::from_certificate_der;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn agencies() -> Vec<String> {
        ["SSA", "CMS", "OPM"].map(String::from).to_vec()
    }

    fn der_of(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path)
            .expect("PEM certificate")
            .to_vec()
    }

    #[test]
    fn dev_writes_every_file_with_the_right_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let certs = dev("cx-demo", &agencies(), &out, 30, false).expect("dev");

        assert!(out.join("ca.pem").is_file());
        assert!(out.join("ca.key").is_file());
        assert_eq!(certs.agencies.len(), 3);
        for agency in ["SSA", "CMS", "OPM"] {
            let lower = agency.to_ascii_lowercase();
            for role in Role::ALL {
                let cert = out.join(&lower).join(format!("{role}.pem"));
                let key = out.join(&lower).join(format!("{role}.key"));
                assert!(cert.is_file(), "{}", cert.display());
                assert!(key.is_file(), "{}", key.display());
                let der = der_of(&cert);
                let id = from_certificate_der(&der).expect("identity");
                assert_eq!(
                    id.to_string(),
                    format!("spiffe://cx-demo/{agency}/{role}/{lower}-{role}")
                );
                let issued = certs.get(agency, role).expect("listed");
                assert_eq!(issued.identity, id);
                assert_eq!(issued.cert, cert);

                let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("x509");
                let sans = x509
                    .subject_alternative_name()
                    .expect("san ok")
                    .expect("san present");
                let dns: Vec<&str> = sans
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(*d),
                        _ => None,
                    })
                    .collect();
                let ips: Vec<&[u8]> = sans
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::IPAddress(ip) => Some(*ip),
                        _ => None,
                    })
                    .collect();
                let eku = x509
                    .extended_key_usage()
                    .expect("eku ok")
                    .expect("eku present")
                    .value;
                assert!(eku.client_auth);
                assert!(!x509.is_ca());
                if role == Role::Node {
                    assert!(dns.contains(&"localhost"));
                    assert!(dns.contains(&lower.as_str()));
                    assert_eq!(ips, vec![&[127u8, 0, 0, 1][..]]);
                    assert!(eku.server_auth);
                } else {
                    assert!(dns.is_empty() && ips.is_empty(), "{role}: {dns:?} {ips:?}");
                    assert!(!eku.server_auth);
                }
            }
        }
    }

    #[test]
    fn dev_ca_is_a_constrained_signing_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let der = der_of(&certs.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let bc = ca.basic_constraints().expect("bc").expect("present").value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = ca.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            ca.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok()),
            Some("cx-demo federation CA")
        );
        let validity = ca.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(lifetime, 30 * 86_400 + 3_600);
    }

    #[test]
    fn key_files_are_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let mut keys = vec![certs.ca_key.clone()];
        for agency in &certs.agencies {
            keys.extend(agency.identities.iter().map(|i| i.key.clone()));
        }
        assert_eq!(keys.len(), 13);
        for key in keys {
            let mode = fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let ca_mode = fs::metadata(&certs.ca_cert)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(
            ca_mode & 0o022,
            0,
            "certificates are not writable by others"
        );
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn refuses_to_overwrite_ca_key_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let before = fs::read(dir.path().join("ca.key")).expect("key");
        let err = dev("cx-demo", &agencies(), dir.path(), 30, false).expect_err("refused");
        assert!(matches!(err, CertError::CaKeyExists(_)));
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(fs::read(dir.path().join("ca.key")).expect("key"), before);

        dev("cx-demo", &agencies(), dir.path(), 30, true).expect("forced");
        assert_ne!(fs::read(dir.path().join("ca.key")).expect("key"), before);
        let mode = fs::metadata(dir.path().join("ca.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_invalid_agency_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in ["", "S/A", "../x", "S A", ".."] {
            let err =
                dev("cx-demo", &[bad.to_owned()], dir.path(), 30, false).expect_err("refused");
            assert!(matches!(err, CertError::Identity(_)), "{bad:?}: {err}");
        }
        assert!(matches!(
            dev("cx demo", &agencies(), dir.path(), 30, false),
            Err(CertError::Identity(_))
        ));
        assert!(matches!(
            dev("cx-demo", &[], dir.path(), 30, false),
            Err(CertError::NoAgencies)
        ));
        assert!(matches!(
            dev(
                "cx-demo",
                &["SSA".into(), "ssa".into()],
                dir.path(),
                30,
                false
            ),
            Err(CertError::DuplicateAgency(_))
        ));
        assert!(matches!(
            dev("cx-demo", &agencies(), dir.path(), 0, false),
            Err(CertError::InvalidValidity(_))
        ));
        // Nothing was written by the refused runs.
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn issue_chains_to_the_given_ca_with_matching_key_ids() {
        let (ca_pem, ca_key) = new_ca("cx-demo").expect("ca");
        let id = Identity::new("cx-demo", "SSA", Role::Analyst, "alice").expect("id");
        let now = OffsetDateTime::now_utc();
        let (cert_pem, key_pem) = issue(
            &ca_pem,
            &ca_key,
            &id,
            &[],
            now - Duration::days(10),
            now - Duration::days(1),
        )
        .expect("issue");
        assert!(key_pem.contains("PRIVATE KEY"));
        let ca_der = pem_certificate(&ca_pem).expect("ca der");
        let leaf_der = pem_certificate(&cert_pem).expect("leaf der");
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        let ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        let aki = leaf
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert!(ski.is_some());
        assert_eq!(ski, aki);
        assert!(!leaf.validity().is_valid());
        assert_eq!(from_certificate_der(&leaf_der), Ok(id));
    }

    #[test]
    fn issue_refuses_mismatched_ca_key() {
        let (ca_pem, _) = new_ca("cx-demo").expect("ca");
        let (_, other_key) = new_ca("cx-demo").expect("other");
        let id = Identity::new("cx-demo", "SSA", Role::Analyst, "alice").expect("id");
        let now = OffsetDateTime::now_utc();
        let err = issue(&ca_pem, &other_key, &id, &[], now, now + Duration::days(1))
            .expect_err("refused");
        assert!(matches!(err, CertError::InvalidCa(_)), "{err}");
    }

    #[test]
    fn issue_refuses_leaf_as_ca() {
        let (ca_pem, ca_key) = new_ca("cx-demo").expect("ca");
        let id = Identity::new("cx-demo", "SSA", Role::Analyst, "alice").expect("id");
        let now = OffsetDateTime::now_utc();
        let (leaf, leaf_key) =
            issue(&ca_pem, &ca_key, &id, &[], now, now + Duration::days(1)).expect("issue");
        let err =
            issue(&leaf, &leaf_key, &id, &[], now, now + Duration::days(1)).expect_err("refused");
        assert!(matches!(err, CertError::InvalidCa(_)), "{err}");
    }

    #[test]
    fn issue_refuses_empty_validity() {
        let (ca_pem, ca_key) = new_ca("cx-demo").expect("ca");
        let id = Identity::new("cx-demo", "SSA", Role::Analyst, "alice").expect("id");
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            issue(&ca_pem, &ca_key, &id, &[], now, now),
            Err(CertError::InvalidValidity(_))
        ));
    }

    #[test]
    fn revoke_accumulates_entries_and_numbers_each_crl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let crl = dir.path().join(CRL_FILE);
        let analyst = certs
            .get("SSA", Role::Analyst)
            .expect("analyst")
            .cert
            .clone();
        let node = certs.get("CMS", Role::Node).expect("node").cert.clone();

        let empty = revoke(dir.path(), &crl, &[], None, 30).expect("empty");
        assert_eq!((empty.number, empty.revoked), (1, 0));
        let first = revoke(
            dir.path(),
            &crl,
            std::slice::from_ref(&analyst),
            Some(rcgen::RevocationReason::KeyCompromise),
            30,
        )
        .expect("revoke");
        assert_eq!((first.number, first.revoked), (2, 1));
        assert!(!first.certs[0].already);
        assert_eq!(
            first.certs[0].identity.as_ref().map(|i| i.to_string()),
            Some("spiffe://cx-demo/SSA/analyst/ssa-analyst".into())
        );
        let second = revoke(dir.path(), &crl, &[analyst.clone(), node], None, 30).expect("again");
        assert_eq!((second.number, second.revoked), (3, 2));
        assert!(second.certs[0].already && !second.certs[1].already);

        // The file is a CRL of the CA listing both serials, the first with its reason.
        use rustls::pki_types::CertificateRevocationListDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateRevocationListDer::from_pem_file(&crl).expect("pem");
        let (_, parsed) = x509_parser::parse_x509_crl(&der).expect("crl");
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial_as_string())
            .collect();
        assert_eq!(
            serials,
            vec![
                first.certs[0].serial.clone(),
                second.certs[1].serial.clone()
            ]
        );
        let reason = parsed
            .iter_revoked_certificates()
            .next()
            .and_then(|r| r.reason_code())
            .map(|(_, r)| r.0);
        assert_eq!(reason, Some(1));
        let ca_der = der_of(&certs.ca_cert);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        assert_eq!(parsed.issuer().as_raw(), ca.subject().as_raw());
    }

    #[test]
    fn revoke_refuses_foreign_certificates_and_crls_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let foreign = dev("cx-demo", &["SSA".into()], other.path(), 30, false).expect("dev");
        let crl = dir.path().join(CRL_FILE);
        let foreign_cert = foreign.get("SSA", Role::Analyst).expect("a").cert.clone();
        let err = revoke(
            dir.path(),
            &crl,
            std::slice::from_ref(&foreign_cert),
            None,
            30,
        )
        .expect_err("foreign cert");
        assert!(err.to_string().contains("analyst.pem"), "{err}");
        assert!(err.to_string().contains("not signed by the CA"), "{err}");
        assert!(!crl.exists(), "nothing written");

        let foreign_crl = other.path().join(CRL_FILE);
        revoke(other.path(), &foreign_crl, &[], None, 30).expect("foreign crl");
        let err = revoke(dir.path(), &foreign_crl, &[], None, 30).expect_err("foreign crl");
        assert!(err.to_string().contains("crl.pem"), "{err}");

        let err = revoke(dir.path(), &crl, &[dir.path().join("nope.pem")], None, 30)
            .expect_err("missing");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        assert!(matches!(
            revoke(dir.path(), &crl, &[], None, 0),
            Err(CertError::InvalidValidity(_))
        ));
    }

    #[test]
    fn renew_keeps_identity_and_names_with_a_new_key_and_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("cx-demo", &agencies(), dir.path(), 30, false).expect("dev");
        let node = certs.get("CMS", Role::Node).expect("node").clone();
        let before = (
            fs::read(&node.cert).expect("c"),
            fs::read(&node.key).expect("k"),
        );
        let r = renew(dir.path(), &node.cert, &node.key, 10).expect("renew");
        assert_eq!(r.identity.to_string(), "spiffe://cx-demo/CMS/node/cms-node");
        assert_ne!(r.old_serial, r.new_serial);
        assert_ne!(fs::read(&node.cert).expect("c"), before.0);
        assert_ne!(fs::read(&node.key).expect("k"), before.1);
        let mode = fs::metadata(&node.key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let der = der_of(&node.cert);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let sans = x509.subject_alternative_name().expect("ok").expect("san");
        let dns: Vec<String> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                GeneralName::IPAddress(ip) => Some(format!("{ip:?}")),
                _ => None,
            })
            .collect();
        assert_eq!(dns, ["localhost", "[127, 0, 0, 1]", "cms"]);
        // The pair is usable as a node's.
        let files = certs.tls_files("CMS", Role::Node).expect("files");
        files.server_config("cx-demo").expect("server config");
        let err = renew(dir.path(), &node.key, &node.key, 10).expect_err("a key is no certificate");
        assert!(err.to_string().contains("node.key"), "{err}");
    }

    #[test]
    fn debug_output_never_contains_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dev("cx-demo", &["SSA".into()], dir.path(), 30, false).expect("dev");
        let debug = format!("{certs:?}");
        assert!(!debug.contains("PRIVATE KEY"));
        let secret = Secret("-----BEGIN PRIVATE KEY-----".into());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let key = KeyPair::generate().expect("key");
        assert!(!format!("{key:?}").contains(&key.serialize_pem()));
    }
}
