//! Container set-up and probes that need no shell: `cxfed seed` (the one-shot set-up of the
//! docker-compose federation) and `cxfed health` (a node's health check from inside its
//! container).
//!
//! [`seed`] makes the federation's development PKI once, then, for every agency, gives it the
//! three TLS files its node needs and synthetic data:
//!
//! ```text
//! PKI/ca.pem PKI/ca.key PKI/<agency>/*.pem|*.key   everything `cxfed certs dev` writes
//! PKI/crl.pem                                      the CA's revocation list (empty at first)
//! DIR/tls/ca.pem node.pem node.key crl.pem         the node's own files only (key 0600)
//! DIR/data/experience/ operational/                synthetic data, ingested
//! ```
//!
//! Every step is skipped when its result is already there, so a second `docker compose up`
//! changes nothing — and never overwrites a certificate a steward has since rotated. The one
//! exception is the CRL: `PKI/crl.pem` is the CA's list (`cxfed certs revoke --ca-dir PKI`), so
//! a node's `crl.pem` that differs from it is replaced — re-running seed distributes a
//! revocation (then SIGHUP the nodes). With an
//! owner, everything written is handed to that uid:gid (the nodes do not run as root).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cxfed_protocol::wire::Health;
use cxfed_queries::schema::Table;

use crate::config::NodeConfig;

/// One agency's output directory, `AGENCY=DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedTarget {
    /// The agency, e.g. SSA.
    pub agency: String,
    /// Where its `tls/` and `data/` go.
    pub dir: PathBuf,
}

/// What [`seed`] is asked to do.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// Federation name.
    pub federation: String,
    /// Where the whole PKI (CA key included) lives.
    pub pki: PathBuf,
    /// The agencies and their directories, in seed order (agency i gets synth seed i + 1).
    pub targets: Vec<SeedTarget>,
    /// People per agency.
    pub people: usize,
    /// Certificate validity in days.
    pub days: u32,
    /// Hand everything written to this uid:gid.
    pub owner: Option<(u32, u32)>,
}

/// What [`seed`] did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Whether the PKI was made now.
    pub made_pki: bool,
    /// Agencies whose TLS files were copied now.
    pub copied_tls: Vec<String>,
    /// Agencies whose CRL was copied now (new, or changed in the PKI).
    pub copied_crl: Vec<String>,
    /// Agencies whose data was synthesized and ingested now.
    pub seeded_data: Vec<String>,
}

/// Why seeding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// Certificates could not be made.
    #[error("certificates in {path}: {source}")]
    Certs {
        /// The PKI directory.
        path: PathBuf,
        /// Why.
        source: crate::certs::CertError,
    },
    /// A file could not be read, written or handed over.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Synthetic data could not be made or ingested.
    #[error("data for {agency} in {path}: {message}")]
    Data {
        /// The agency.
        agency: String,
        /// The data directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Usage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError + '_ {
    move |source| SeedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses `AGENCY=DIR`.
pub fn parse_target(s: &str) -> Result<SeedTarget, String> {
    match s.split_once('=') {
        Some((agency, dir)) if !agency.is_empty() && !dir.is_empty() => Ok(SeedTarget {
            agency: agency.to_uppercase(),
            dir: PathBuf::from(dir),
        }),
        _ => Err(format!("{s:?}: expected AGENCY=DIR, e.g. SSA=/seed/ssa")),
    }
}

/// Parses `UID:GID` (or `UID`, with the same number as gid).
pub fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?}: expected UID:GID, e.g. 10001:10001");
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// Seeds the federation (see the module documentation). Idempotent.
pub fn seed(opts: &SeedOptions) -> Result<SeedReport, SeedError> {
    if opts.targets.is_empty() {
        return Err(SeedError::Usage("no --agency AGENCY=DIR given".into()));
    }
    let mut report = SeedReport::default();
    let agencies: Vec<String> = opts.targets.iter().map(|t| t.agency.clone()).collect();
    let ca = opts.pki.join(crate::certs::CA_CERT_FILE);
    if !opts.pki.join(crate::certs::CA_KEY_FILE).exists() {
        crate::certs::dev(&opts.federation, &agencies, &opts.pki, opts.days, false).map_err(
            |source| SeedError::Certs {
                path: opts.pki.clone(),
                source,
            },
        )?;
        report.made_pki = true;
    }
    let crl = opts.pki.join(crate::certs::CRL_FILE);
    if !crl.exists() {
        crate::certs::revoke(&opts.pki, &crl, &[], None, opts.days).map_err(|source| {
            SeedError::Certs {
                path: crl.clone(),
                source,
            }
        })?;
    }
    let crl_bytes = fs::read(&crl).map_err(io_err(&crl))?;
    for (i, t) in opts.targets.iter().enumerate() {
        let lower = t.agency.to_ascii_lowercase();
        let from = opts.pki.join(&lower);
        if !from.join("node.pem").exists() {
            return Err(SeedError::Usage(format!(
                "{}: no node certificate for {} (the PKI was made for other agencies; add it with a new CA or issue one)",
                from.display(),
                t.agency
            )));
        }
        let tls = t.dir.join("tls");
        if !tls.join("node.key").exists() {
            fs::create_dir_all(&tls).map_err(io_err(&tls))?;
            copy(&ca, &tls.join("ca.pem"), false)?;
            copy(&from.join("node.pem"), &tls.join("node.pem"), false)?;
            // The key last: its presence says the directory is complete.
            copy(&from.join("node.key"), &tls.join("node.key"), true)?;
            report.copied_tls.push(t.agency.clone());
        }
        let node_crl = tls.join(crate::certs::CRL_FILE);
        if fs::read(&node_crl).ok().as_deref() != Some(crl_bytes.as_slice()) {
            copy(&crl, &node_crl, false)?;
            report.copied_crl.push(t.agency.clone());
        }
        let data = t.dir.join("data");
        if !data.join(Table::Experience.name()).exists() {
            seed_data(&t.agency, &data, opts.people, 1 + i as u64)?;
            report.seeded_data.push(t.agency.clone());
        }
        if let Some((uid, gid)) = opts.owner {
            chown_tree(&t.dir, uid, gid)?;
        }
    }
    if let Some((uid, gid)) = opts.owner {
        chown_tree(&opts.pki, uid, gid)?;
    }
    Ok(report)
}

fn seed_data(agency: &str, data: &Path, people: usize, seed: u64) -> Result<(), SeedError> {
    let fail = |message: String| SeedError::Data {
        agency: agency.to_string(),
        path: data.to_path_buf(),
        message,
    };
    // The CSVs are made inside the data volume (a scratch image has no /tmp) and removed after.
    let synth = data.join(".seed-synth");
    let opts = crate::synth::SynthOptions {
        agency: agency.to_string(),
        people,
        seed,
    };
    crate::synth::write(&opts, &synth).map_err(|e| fail(e.to_string()))?;
    for table in [Table::Operational, Table::Experience] {
        let file = synth.join(format!("{}.csv", table.name()));
        crate::ingest::ingest(data, table, &file, false).map_err(|e| fail(e.to_string()))?;
    }
    fs::remove_dir_all(&synth).map_err(io_err(&synth))
}

fn copy(from: &Path, to: &Path, private: bool) -> Result<(), SeedError> {
    let bytes = fs::read(from).map_err(io_err(from))?;
    let tmp = to.with_extension("seed-tmp");
    {
        use std::io::Write;
        let mut o = fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(if private { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut f = o.open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, to).map_err(io_err(to))
}

#[cfg(unix)]
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), SeedError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    if fs::symlink_metadata(path).map_err(io_err(path))?.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn chown_tree(_path: &Path, _uid: u32, _gid: u32) -> Result<(), SeedError> {
    Err(SeedError::Usage("--owner needs a Unix system".into()))
}

/// Asks the node configured in `config` (its own listen port, on loopback) for `GET /v1/health`
/// with the node's own certificate, and checks that the node that answers is this agency's
/// node of this federation and says `ok`. For container health checks: no shell or curl needed.
pub async fn health(config: &NodeConfig, timeout: Duration) -> Result<Health, String> {
    let port = config.listen.port();
    let host = if config.listen.ip().is_unspecified() || config.listen.ip().is_loopback() {
        "127.0.0.1".to_string()
    } else {
        match config.listen.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        }
    };
    let url = format!("https://{host}:{port}/v1/health");
    let client =
        crate::client::peer_client(&config.tls, &config.federation, &config.agency, timeout)
            .map_err(|e| format!("tls files of {}: {e}", config.agency))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", crate::client::error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    let h: Health = resp
        .json()
        .await
        .map_err(|e| format!("{url}: not a health answer: {e}"))?;
    if h.status != "ok" || h.agency != config.agency || h.federation != config.federation {
        return Err(format!(
            "{url}: answered {} for {} of {}, expected ok for {} of {}",
            h.status, h.agency, h.federation, config.agency, config.federation
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_and_owners_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_target("ssa=/seed/ssa").unwrap(),
            SeedTarget {
                agency: "SSA".into(),
                dir: "/seed/ssa".into()
            }
        );
        assert!(parse_target("SSA").unwrap_err().contains("AGENCY=DIR"));
        assert!(parse_target("=x").is_err());
        assert_eq!(parse_owner("10001:10002").unwrap(), (10001, 10002));
        assert_eq!(parse_owner("7").unwrap(), (7, 7));
        assert!(parse_owner("cxfed").unwrap_err().contains("UID:GID"));
    }

    #[test]
    fn seed_is_idempotent_and_keeps_a_rotated_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SeedOptions {
            federation: "cx-seed".into(),
            pki: dir.path().join("pki"),
            targets: vec![
                parse_target(&format!("SSA={}", dir.path().join("ssa").display())).unwrap(),
                parse_target(&format!("CMS={}", dir.path().join("cms").display())).unwrap(),
            ],
            people: 200,
            days: 2,
            owner: None,
        };
        let first = seed(&opts).unwrap();
        assert!(first.made_pki);
        assert_eq!(first.copied_tls, ["SSA", "CMS"]);
        assert_eq!(first.copied_crl, ["SSA", "CMS"]);
        assert_eq!(first.seeded_data, ["SSA", "CMS"]);
        let tls = dir.path().join("ssa/tls");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(tls.join("node.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            fs::read(tls.join("node.pem")).unwrap(),
            fs::read(dir.path().join("pki/ssa/node.pem")).unwrap()
        );
        assert!(dir.path().join("cms/data/operational").is_dir());
        assert!(!dir.path().join("cms/data/.seed-synth").exists());
        // A steward rotated SSA's certificate: a second seed leaves it and everything else.
        fs::write(tls.join("node.pem"), "rotated").unwrap();
        let again = seed(&opts).unwrap();
        assert_eq!(again, SeedReport::default());
        assert_eq!(fs::read(tls.join("node.pem")).unwrap(), b"rotated");
        // A revocation in the PKI's CRL reaches every node's crl.pem at the next seed.
        crate::certs::revoke(
            &opts.pki,
            &opts.pki.join("crl.pem"),
            &[opts.pki.join("ssa/analyst.pem")],
            None,
            2,
        )
        .unwrap();
        let again = seed(&opts).unwrap();
        assert_eq!(again.copied_crl, ["SSA", "CMS"]);
        assert_eq!(
            fs::read(dir.path().join("cms/tls/crl.pem")).unwrap(),
            fs::read(dir.path().join("pki/crl.pem")).unwrap()
        );
        // An agency the PKI has no certificate for is named.
        let mut more = opts.clone();
        more.targets
            .push(parse_target(&format!("OPM={}", dir.path().join("opm").display())).unwrap());
        let e = seed(&more).unwrap_err().to_string();
        assert!(
            e.contains("OPM") && e.contains("no node certificate"),
            "{e}"
        );
    }
}
