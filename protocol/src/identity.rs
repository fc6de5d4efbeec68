//! SPIFFE identities: `spiffe://<federation>/<agency>/<role>/<name>`.
//!
//! Every party in a federation holds an X.509 certificate issued by the federation CA whose one
//! `spiffe://` URI SAN names it. An [`Identity`] can only be built from a well-formed URI (parse,
//! don't validate): once you hold one, every segment is known to be non-empty, at most
//! [`MAX_SEGMENT_LEN`] characters of `[A-Za-z0-9._-]`, and the role is one of [`Role`].
//!
//! [`from_certificate_der`] reads the identity a certificate *claims*. It does not verify the
//! certificate: only call it on certificates that rustls has already verified against the
//! federation CA (or for logging what an unverified peer claimed).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x509_parser::extensions::GeneralName;

/// The URI scheme prefix of every identity.
pub const SCHEME: &str = "spiffe://";

/// The longest allowed segment (a DNS label's limit, so a federation can be a host name part).
pub const MAX_SEGMENT_LEN: usize = 63;

/// Longest excerpt of untrusted input quoted in an error message.
const MAX_QUOTED: usize = 80;

/// What a caller is allowed to do in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A cxfed node: serves partials to coordinators and coordinates queries.
    Node,
    /// An analyst on a cross-agency team: submits queries.
    Analyst,
    /// An agency's data steward: runs its node, sets policy, watches budget use.
    Steward,
    /// An auditor: reads and verifies query logs.
    Auditor,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Node, Role::Analyst, Role::Steward, Role::Auditor];

    /// The lowercase name used in URIs (`node`, `analyst`, `steward`, `auditor`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Analyst => "analyst",
            Role::Steward => "steward",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    /// Parses the exact lowercase name; `Analyst` or `admin` are refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole { role: quote(s) })
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which segment of an identity an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The trust domain, e.g. `cx-demo`.
    Federation,
    /// The agency, e.g. `SSA`.
    Agency,
    /// The role, e.g. `analyst`.
    Role,
    /// The holder's name within the agency, e.g. `ssa-analyst`.
    Name,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Federation => "federation",
            Part::Agency => "agency",
            Part::Role => "role",
            Part::Name => "name",
        })
    }
}

/// Why an identity could not be built, parsed or read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {uri:?} is not a spiffe:// URI")]
    NotSpiffe {
        /// The offending URI (possibly shortened).
        uri: String,
    },
    /// The URI does not have exactly four path segments `<federation>/<agency>/<role>/<name>`.
    #[error(
        "identity {uri:?} has {found} segment(s); expected spiffe://<federation>/<agency>/<role>/<name>"
    )]
    WrongSegmentCount {
        /// The offending URI (possibly shortened).
        uri: String,
        /// How many `/`-separated segments it has after `spiffe://`.
        found: usize,
    },
    /// One segment is empty, too long, `.`/`..`, or contains a character outside `[A-Za-z0-9._-]`.
    #[error("invalid {part} {value:?} in identity: {reason}")]
    InvalidSegment {
        /// Which segment.
        part: Part,
        /// The offending value (possibly shortened).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The role segment is not one of `node`, `analyst`, `steward`, `auditor`.
    #[error("unknown role {role:?}: expected node, analyst, steward or auditor")]
    UnknownRole {
        /// The offending role (possibly shortened).
        role: String,
    },
    /// The peer presented no certificate at all.
    #[error("no certificate was presented")]
    NoCertificate,
    /// The bytes are not a DER X.509 certificate, or its extensions are malformed.
    #[error("malformed certificate: {0}")]
    MalformedCertificate(String),
    /// The certificate has no `spiffe://` URI subject alternative name.
    #[error("certificate has no spiffe:// URI subject alternative name")]
    NoSpiffeId,
    /// The certificate has more than one `spiffe://` URI SAN, so it names no single identity.
    #[error(
        "certificate has {count} spiffe:// URI subject alternative names; exactly one is allowed"
    )]
    SeveralSpiffeIds {
        /// How many were found.
        count: usize,
    },
}

/// A SPIFFE identity `spiffe://<federation>/<agency>/<role>/<name>`, well-formed by construction.
///
/// Displays, serializes and deserializes as the URI string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    federation: String,
    agency: String,
    role: Role,
    name: String,
}

impl Identity {
    /// Builds an identity from its parts, checking each segment.
    pub fn new(
        federation: &str,
        agency: &str,
        role: Role,
        name: &str,
    ) -> Result<Identity, IdentityError> {
        check_segment(Part::Federation, federation)?;
        check_segment(Part::Agency, agency)?;
        check_segment(Part::Name, name)?;
        Ok(Identity {
            federation: federation.to_owned(),
            agency: agency.to_owned(),
            role,
            name: name.to_owned(),
        })
    }

    /// Parses `spiffe://<federation>/<agency>/<role>/<name>`.
    ///
    /// Exactly four segments; no query, fragment, percent-encoding, port or user info (all
    /// excluded by the segment alphabet); the scheme must be lowercase.
    pub fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe { uri: quote(uri) })?;
        let segments: Vec<&str> = rest.split('/').collect();
        let [federation, agency, role, name] = segments[..] else {
            return Err(IdentityError::WrongSegmentCount {
                uri: quote(uri),
                found: segments.len(),
            });
        };
        check_segment(Part::Federation, federation)?;
        check_segment(Part::Agency, agency)?;
        check_segment(Part::Role, role)?;
        let role = role.parse()?;
        Identity::new(federation, agency, role, name)
    }

    /// The federation (SPIFFE trust domain), e.g. `cx-demo`.
    pub fn federation(&self) -> &str {
        &self.federation
    }

    /// The agency, as written in the certificate, e.g. `SSA`.
    pub fn agency(&self) -> &str {
        &self.agency
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The holder's name within the agency, e.g. `ssa-analyst`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `spiffe://` URI (same as `to_string()`).
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}/{}",
            self.federation, self.agency, self.role, self.name
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse_uri(s)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Identity::parse_uri(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks one identity segment: non-empty, at most [`MAX_SEGMENT_LEN`] characters of
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
///
/// Useful to check a federation or agency name before any identity is built from it
/// (for [`Part::Role`] only the alphabet is checked; use [`Role::from_str`] for the rest).
pub fn check_segment(part: Part, value: &str) -> Result<(), IdentityError> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > MAX_SEGMENT_LEN {
        Some("longer than 63 characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else if value == "." || value == ".." {
        Some("'.' and '..' are not allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(IdentityError::InvalidSegment {
            part,
            value: quote(value),
            reason,
        }),
        None => Ok(()),
    }
}

/// Reads the identity a DER X.509 certificate claims in its one `spiffe://` URI SAN.
///
/// Other URI SANs are ignored; zero or several `spiffe:` URIs (scheme compared
/// case-insensitively, so `SPIFFE://` counts too) are refused. This does **not** verify the
/// certificate's signature, issuer or validity.
pub fn from_certificate_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::MalformedCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::MalformedCertificate(format!(
            "{} trailing byte(s) after the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::MalformedCertificate(format!("subjectAltName: {e}")))?
        .ok_or(IdentityError::NoSpiffeId)?;
    let spiffe: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| {
            uri.get(..SCHEME.len())
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
        })
        .collect();
    match spiffe[..] {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => Identity::parse_uri(uri),
        _ => Err(IdentityError::SeveralSpiffeIds {
            count: spiffe.len(),
        }),
    }
}

/// Shortens untrusted input quoted in errors (they end up in logs).
fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(uri: &str) -> Identity {
        match Identity::parse_uri(uri) {
            Ok(id) => id,
            Err(e) => panic!("{uri} should parse: {e}"),
        }
    }

    fn err(uri: &str) -> IdentityError {
        match Identity::parse_uri(uri) {
            Ok(id) => panic!("{uri} should be refused, got {id:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_and_displays_round_trip() {
        let uri = "spiffe://cx-demo/SSA/analyst/ssa-analyst";
        let id = ok(uri);
        assert_eq!(id.federation(), "cx-demo");
        assert_eq!(id.agency(), "SSA");
        assert_eq!(id.role(), Role::Analyst);
        assert_eq!(id.name(), "ssa-analyst");
        assert_eq!(id.to_string(), uri);
        assert_eq!(id.to_uri(), uri);
        assert_eq!(uri.parse::<Identity>(), Ok(id));
    }

    #[test]
    fn new_matches_parse() {
        let id = Identity::new("cx-demo", "CMS", Role::Node, "cms-node").expect("valid");
        assert_eq!(id, ok("spiffe://cx-demo/CMS/node/cms-node"));
    }

    #[test]
    fn roles_round_trip_lowercase() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(role.to_string(), role.as_str());
        }
        assert!(matches!(
            "Analyst".parse::<Role>(),
            Err(IdentityError::UnknownRole { .. })
        ));
    }

    #[test]
    fn serde_uses_the_uri_string() {
        let id = ok("spiffe://cx-demo/OPM/auditor/opm-auditor");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://cx-demo/OPM/auditor/opm-auditor\"");
        let back: Identity = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        let role: Role = serde_json::from_str("\"steward\"").expect("role");
        assert_eq!(role, Role::Steward);
    }

    #[test]
    fn serde_refuses_malformed_uri() {
        let res: Result<Identity, _> = serde_json::from_str("\"spiffe://cx-demo/SSA/analyst\"");
        assert!(res.is_err());
    }

    #[test]
    fn refuses_uri_with_extra_segments() {
        assert_eq!(
            err("spiffe://cx-demo/SSA/analyst/ssa-analyst/extra"),
            IdentityError::WrongSegmentCount {
                uri: "spiffe://cx-demo/SSA/analyst/ssa-analyst/extra".into(),
                found: 5
            }
        );
    }

    #[test]
    fn refuses_uri_with_missing_segments() {
        assert!(matches!(
            err("spiffe://cx-demo/SSA/analyst"),
            IdentityError::WrongSegmentCount { found: 3, .. }
        ));
        assert!(matches!(
            err("spiffe://cx-demo"),
            IdentityError::WrongSegmentCount { found: 1, .. }
        ));
    }

    #[test]
    fn refuses_uri_with_trailing_slash() {
        assert!(matches!(
            err("spiffe://cx-demo/SSA/analyst/ssa-analyst/"),
            IdentityError::WrongSegmentCount { found: 5, .. }
        ));
    }

    #[test]
    fn refuses_uri_with_other_scheme() {
        assert!(matches!(
            err("https://cx-demo/SSA/analyst/ssa-analyst"),
            IdentityError::NotSpiffe { .. }
        ));
        assert!(matches!(
            err("SPIFFE://cx-demo/SSA/analyst/ssa-analyst"),
            IdentityError::NotSpiffe { .. }
        ));
        assert!(matches!(err(""), IdentityError::NotSpiffe { .. }));
    }

    #[test]
    fn refuses_unknown_role() {
        assert!(matches!(
            err("spiffe://cx-demo/SSA/admin/ssa-admin"),
            IdentityError::UnknownRole { .. }
        ));
        assert!(matches!(
            err("spiffe://cx-demo/SSA/Node/ssa-node"),
            IdentityError::UnknownRole { .. }
        ));
    }

    #[test]
    fn refuses_empty_segment() {
        assert!(matches!(
            err("spiffe://cx-demo//analyst/ssa-analyst"),
            IdentityError::InvalidSegment {
                part: Part::Agency,
                ..
            }
        ));
        assert!(matches!(
            err("spiffe:///SSA/analyst/ssa-analyst"),
            IdentityError::InvalidSegment {
                part: Part::Federation,
                ..
            }
        ));
    }

    #[test]
    fn refuses_segment_longer_than_63() {
        let long = "a".repeat(64);
        assert!(matches!(
            err(&format!("spiffe://cx-demo/SSA/analyst/{long}")),
            IdentityError::InvalidSegment {
                part: Part::Name,
                ..
            }
        ));
        let max = "a".repeat(63);
        ok(&format!("spiffe://cx-demo/SSA/analyst/{max}"));
    }

    #[test]
    fn refuses_segment_with_forbidden_characters() {
        for bad in [
            "spiffe://cx-demo/SSA/analyst/ssa%20analyst",
            "spiffe://cx-demo/SSA/analyst/ssa analyst",
            "spiffe://cx-demo/SSA/analyst/ssa-analyst?x=1",
            "spiffe://cx-demo/SSA/analyst/ssa-analyst#frag",
            "spiffe://user@cx-demo/SSA/analyst/ssa-analyst",
            "spiffe://cx-demo:443/SSA/analyst/ssa-analyst",
            "spiffe://cx-demo/SSÄ/analyst/ssa-analyst",
            "spiffe://cx-demo/SSA/analyst/ssa\nanalyst",
        ] {
            assert!(
                matches!(err(bad), IdentityError::InvalidSegment { .. }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_dot_segments() {
        assert!(matches!(
            err("spiffe://cx-demo/../analyst/x"),
            IdentityError::InvalidSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://cx-demo/SSA/analyst/."),
            IdentityError::InvalidSegment { .. }
        ));
    }

    #[test]
    fn new_refuses_invalid_parts() {
        assert!(Identity::new("cx demo", "SSA", Role::Node, "n").is_err());
        assert!(Identity::new("cx-demo", "", Role::Node, "n").is_err());
        assert!(Identity::new("cx-demo", "SSA", Role::Node, "a/b").is_err());
    }

    #[test]
    fn errors_quote_at_most_a_short_excerpt() {
        let long = format!("https://{}", "x".repeat(10_000));
        let msg = err(&long).to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn refuses_bytes_that_are_not_a_certificate() {
        assert!(matches!(
            from_certificate_der(b"not a certificate"),
            Err(IdentityError::MalformedCertificate(_))
        ));
        assert!(matches!(
            from_certificate_der(&[]),
            Err(IdentityError::MalformedCertificate(_))
        ));
    }

    /// Certificates with chosen SANs, hand-encoded in DER so this crate needs no generator.
    mod der {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            let len = content.len();
            if len < 0x80 {
                out.push(len as u8);
            } else if len < 0x100 {
                out.extend([0x81, len as u8]);
            } else {
                out.extend([0x82, (len >> 8) as u8, len as u8]);
            }
            out.extend_from_slice(content);
            out
        }

        fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
            tlv(0x30, &parts.concat())
        }

        fn name(cn: &str) -> Vec<u8> {
            // Name ::= SEQUENCE OF SET OF AttributeTypeAndValue (CN)
            let atv = seq(&[tlv(0x06, &[0x55, 0x04, 0x03]), tlv(0x0c, cn.as_bytes())]);
            seq(&[tlv(0x31, &atv)])
        }

        /// A syntactically valid (unsigned in any meaningful way) v3 certificate whose
        /// subjectAltName holds the given URIs and DNS names.
        pub fn cert(uris: &[&str], dns: &[&str]) -> Vec<u8> {
            let ecdsa_sha256 = seq(&[tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02])]);
            let validity = seq(&[tlv(0x17, b"250101000000Z"), tlv(0x17, b"350101000000Z")]);
            let spki = seq(&[
                seq(&[
                    tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
                    tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
                ]),
                tlv(0x03, &{
                    let mut bits = vec![0x00, 0x04];
                    bits.extend([0x11; 64]);
                    bits
                }),
            ]);
            let mut general_names = Vec::new();
            for uri in uris {
                general_names.push(tlv(0x86, uri.as_bytes()));
            }
            for d in dns {
                general_names.push(tlv(0x82, d.as_bytes()));
            }
            let mut extensions = Vec::new();
            if !general_names.is_empty() {
                let san = seq(&general_names);
                extensions.push(seq(&[tlv(0x06, &[0x55, 0x1d, 0x11]), tlv(0x04, &san)]));
            }
            let mut tbs = vec![
                tlv(0xa0, &tlv(0x02, &[0x02])),
                tlv(0x02, &[0x01]),
                ecdsa_sha256.clone(),
                name("issuer"),
                validity,
                name("subject"),
                spki,
            ];
            if !extensions.is_empty() {
                tbs.push(tlv(0xa3, &seq(&extensions)));
            }
            let tbs = seq(&tbs);
            let signature = tlv(
                0x03,
                &[0x00, 0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            );
            seq(&[tbs, ecdsa_sha256, signature])
        }
    }

    #[test]
    fn reads_the_one_spiffe_uri_san() {
        let cert = der::cert(
            &[
                "https://example.gov/x",
                "spiffe://cx-demo/SSA/node/ssa-node",
            ],
            &["localhost"],
        );
        assert_eq!(
            from_certificate_der(&cert),
            Ok(ok("spiffe://cx-demo/SSA/node/ssa-node"))
        );
    }

    #[test]
    fn refuses_certificate_without_spiffe_uri() {
        let only_dns = der::cert(&[], &["localhost"]);
        assert_eq!(
            from_certificate_der(&only_dns),
            Err(IdentityError::NoSpiffeId)
        );
        let no_san = der::cert(&[], &[]);
        assert_eq!(
            from_certificate_der(&no_san),
            Err(IdentityError::NoSpiffeId)
        );
        let https_only = der::cert(&["https://cx-demo/SSA/node/ssa-node"], &[]);
        assert_eq!(
            from_certificate_der(&https_only),
            Err(IdentityError::NoSpiffeId)
        );
    }

    #[test]
    fn refuses_certificate_with_several_spiffe_uris() {
        let cert = der::cert(
            &[
                "spiffe://cx-demo/SSA/node/ssa-node",
                "spiffe://cx-demo/CMS/node/cms-node",
            ],
            &[],
        );
        assert_eq!(
            from_certificate_der(&cert),
            Err(IdentityError::SeveralSpiffeIds { count: 2 })
        );
    }

    #[test]
    fn refuses_certificate_hiding_a_second_id_behind_uppercase_scheme() {
        let cert = der::cert(
            &[
                "SPIFFE://cx-demo/SSA/steward/ssa-steward",
                "spiffe://cx-demo/SSA/analyst/ssa-analyst",
            ],
            &[],
        );
        assert_eq!(
            from_certificate_der(&cert),
            Err(IdentityError::SeveralSpiffeIds { count: 2 })
        );
    }

    #[test]
    fn refuses_certificate_with_malformed_spiffe_uri() {
        let cert = der::cert(&["spiffe://cx-demo/SSA/node"], &[]);
        assert!(matches!(
            from_certificate_der(&cert),
            Err(IdentityError::WrongSegmentCount { found: 3, .. })
        ));
    }

    #[test]
    fn refuses_trailing_bytes_after_certificate() {
        let mut cert = der::cert(&["spiffe://cx-demo/SSA/node/ssa-node"], &[]);
        cert.push(0);
        assert!(matches!(
            from_certificate_der(&cert),
            Err(IdentityError::MalformedCertificate(_))
        ));
    }
}
