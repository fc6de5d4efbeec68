//! `node.toml`: what a data steward configures. Parsed once, checked fully, paths resolved
//! against the file's own directory.
//!
//! ```toml
//! federation = "cx-demo"          # SPIFFE trust domain of the federation
//! agency = "SSA"                  # this node's agency (must match its certificate)
//! listen = "127.0.0.1:7001"       # HTTPS address
//! data_dir = "data/ssa"           # Parquet tables live under here
//!
//! [tls]                           # PEM files
//! ca = "certs/ca.pem"
//! cert = "certs/ssa/node.pem"
//! key = "certs/ssa/node.key"
//! crl = "certs/crl.pem"           # optional: one CRL or a list (revoked certificates refused)
//!
//! [[peers]]                       # every other node of the federation
//! agency = "CMS"
//! url = "https://127.0.0.1:7002"
//!
//! [privacy]
//! k = 10                          # minimum distinct persons per released group
//! mode = "dp"                     # "dp" (default) or "k-only"
//! epsilon_per_query = 1.0         # ε one query spends here at most
//! delta = 1e-6                    # δ of DP partition selection
//! budget_epsilon = 10.0           # ε per analyst per period
//! budget_period_days = 30
//! max_groups_per_person = 1       # contribution bounds (G, R)
//! max_rows_per_person = 1
//! assume_honest_nodes = "all"     # secure aggregation: honest nodes assumed in a roster
//! secure_aggregation = true       # as coordinator, mask public-key queries (see README)
//!
//! [privacy.public_keys]           # dimensions whose values are public: every group of a
//! agency = ["SSA"]                # query grouped only by public keys is released, noisy,
//! fiscal_year = "2022..2026"      # with no partition selection (vocabularies already are)
//!
//! [query]
//! timeout_secs = 30               # per-node time limit during fan-out
//! cache_mb = 64                   # exact partials reused while the data files are unchanged
//!                                 # (0: off; see crate::exact_cache)
//! journey_timeout_secs = 600      # per journey step at another node (their curve work grows
//!                                 # with the people: ~100 s for A's step at 1M x 1M)
//!
//! [policy]                        # the steward's policy, see crate::policy
//! hidden_dimensions = ["state"]
//!
//! [audit]
//! checkpoint_every = 100          # entries between signed audit checkpoints
//!
//! [engine]                        # where this node's partial plans run
//! kind = "local"                  # "local" (default: in this process) or "ballista"
//! # scheduler = "df://10.0.0.5:50050"  # kind = "ballista": the agency's Ballista scheduler
//! # tls = true                    # mutual TLS to the cluster with this node's [tls] files
//! ```
//!
//! `kind = "ballista"` needs a cxfed built with the `ballista` feature; validation, policy,
//! noise and the ledger stay in the node whatever the engine (see [`crate::engine`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use cxfed_queries::keyset::PublicKeys;

use crate::policy::{DpSettings, Policy, PolicyConfig};
use crate::tls::TlsFiles;

/// Default time limit, in seconds, of one journey step at another node.
pub const DEFAULT_JOURNEY_TIMEOUT_SECS: u64 = 600;

/// Default minimum number of distinct persons per released group.
pub const DEFAULT_K: u64 = 10;

/// A parsed and checked node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Federation (SPIFFE trust domain).
    pub federation: String,
    /// This node's agency.
    pub agency: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// TLS files.
    pub tls: TlsFiles,
    /// The other nodes.
    pub peers: Vec<Peer>,
    /// This node's `[privacy] k` as written (the policy's `k` is what is enforced).
    pub k: u64,
    /// Per-node time limit during fan-out.
    pub timeout: Duration,
    /// MiB of exact partials kept while the data files are unchanged (0: none).
    pub cache_mb: u64,
    /// Time limit of each journey step a coordinator asks of another node.
    pub journey_timeout: Duration,
    /// The steward's policy.
    pub policy: Policy,
    /// The file this configuration was read from, for reloading.
    pub source: Option<PathBuf>,
    /// Audit log entries between signed checkpoints.
    pub audit_checkpoint_every: u64,
    /// Where the node's partial plans run (`[engine]`).
    pub engine: EngineConfig,
}

/// `[engine]`: where a node's validated partial plans run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EngineConfig {
    /// In the node's own process (the default).
    #[default]
    Local,
    /// On the agency's Apache Ballista cluster, through its scheduler (the `ballista` feature).
    Ballista {
        /// The scheduler.
        scheduler: SchedulerAddr,
        /// Mutual TLS to the scheduler and executors with this node's `[tls]` files (they
        /// must present node certificates of this agency, from the same CA).
        tls: bool,
    },
}

/// A Ballista scheduler's address, written `df://host:port` (port 50050 if left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerAddr {
    host: String,
    port: u16,
}

/// The port a Ballista scheduler listens on when an address names none.
pub const DEFAULT_SCHEDULER_PORT: u16 = 50050;

impl SchedulerAddr {
    /// Parses `df://host[:port]` (a host name, an IPv4 address or a bracketed IPv6 address).
    pub fn parse(text: &str) -> Result<SchedulerAddr, String> {
        let bad = |why: &str| {
            Err(format!(
                "{text:?} is not a scheduler address like \"df://10.0.0.5:50050\" ({why})"
            ))
        };
        let Some(rest) = text.strip_prefix("df://") else {
            return bad("it must start with df://");
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (!h.starts_with('[') || h.ends_with(']')) => {
                match p.parse::<u16>() {
                    Ok(0) | Err(_) => return bad("the port must be a number from 1 to 65535"),
                    Ok(port) => (h, port),
                }
            }
            _ => (rest, DEFAULT_SCHEDULER_PORT),
        };
        let name_ok = |h: &str| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        let ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => name_ok(host),
        };
        if !ok {
            return bad("no host, or a host with characters a host name cannot hold");
        }
        Ok(SchedulerAddr {
            host: host.to_string(),
            port,
        })
    }

    /// The host (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gRPC URL Ballista's client and executors connect to (`http://host:port`, or
    /// `https://` with TLS).
    pub fn grpc_url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for SchedulerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "df://{}:{}", self.host, self.port)
    }
}

/// Another node of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its agency (its certificate must say the same).
    pub agency: String,
    /// Its base URL, `https://host:port`.
    pub url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    federation: String,
    agency: String,
    listen: String,
    data_dir: PathBuf,
    tls: TlsFiles,
    #[serde(default)]
    peers: Vec<Peer>,
    #[serde(default)]
    privacy: RawPrivacy,
    #[serde(default)]
    query: RawQuery,
    #[serde(default)]
    policy: PolicyConfig,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    engine: RawEngine,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    kind: Option<String>,
    scheduler: Option<String>,
    tls: Option<bool>,
}

/// `[engine]`, checked; errors name the key.
fn engine_config(raw: &RawEngine) -> Result<EngineConfig, (String, String)> {
    let bad = |f: &str, m: String| Err((format!("engine.{f}"), m));
    match raw.kind.as_deref().unwrap_or("local") {
        "local" if raw.tls.is_some() => bad(
            "tls",
            "is only for kind = \"ballista\" (this engine is \"local\")".into(),
        ),
        "local" => match raw.scheduler {
            Some(_) => bad(
                "scheduler",
                "is only for kind = \"ballista\" (this engine is \"local\")".into(),
            ),
            None => Ok(EngineConfig::Local),
        },
        "ballista" if !cfg!(feature = "ballista") => bad(
            "kind",
            "\"ballista\" needs a cxfed built with the `ballista` feature \
             (cargo build --release --features ballista); this binary was built without it"
                .into(),
        ),
        "ballista" => match &raw.scheduler {
            None => bad(
                "scheduler",
                "kind = \"ballista\" needs the scheduler's address, e.g. \"df://10.0.0.5:50050\""
                    .into(),
            ),
            Some(s) => match SchedulerAddr::parse(s) {
                Ok(scheduler) => Ok(EngineConfig::Ballista {
                    scheduler,
                    tls: raw.tls.unwrap_or(false),
                }),
                Err(m) => bad("scheduler", m),
            },
        },
        other => bad(
            "kind",
            format!("{other:?} is not an engine; use \"local\" or \"ballista\""),
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    checkpoint_every: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    k: Option<u64>,
    mode: Option<String>,
    epsilon_per_query: Option<f64>,
    delta: Option<f64>,
    budget_epsilon: Option<f64>,
    budget_period_days: Option<u64>,
    max_groups_per_person: Option<u64>,
    max_rows_per_person: Option<u64>,
    #[serde(default)]
    public_keys: std::collections::BTreeMap<String, toml::Value>,
    assume_honest_nodes: Option<toml::Value>,
    secure_aggregation: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    timeout_secs: Option<u64>,
    cache_mb: Option<u64>,
    journey_timeout_secs: Option<u64>,
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or missing keys.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// TOML's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `peers[1].url`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn dp_settings(p: &RawPrivacy) -> Result<Option<DpSettings>, (String, String)> {
    let d = DpSettings::DEFAULT;
    let bad = |f: &str, m: &str| Err((format!("privacy.{f}"), m.to_string()));
    match p.mode.as_deref().unwrap_or("dp") {
        "k-only" => return Ok(None),
        "dp" => {}
        other => {
            return bad(
                "mode",
                &format!("{other:?} is not a mode; use \"dp\" or \"k-only\""),
            );
        }
    }
    let s = DpSettings {
        epsilon_per_query: p.epsilon_per_query.unwrap_or(d.epsilon_per_query),
        delta: p.delta.unwrap_or(d.delta),
        budget_epsilon: p.budget_epsilon.unwrap_or(d.budget_epsilon),
        budget_period: p
            .budget_period_days
            .map(|days| Duration::from_secs(days * 86_400))
            .unwrap_or(d.budget_period),
        max_groups_per_person: p.max_groups_per_person.unwrap_or(d.max_groups_per_person),
        max_rows_per_person: p.max_rows_per_person.unwrap_or(d.max_rows_per_person),
        public_keys: public_keys(&p.public_keys)?,
        assume_honest_nodes: match &p.assume_honest_nodes {
            None => None,
            Some(toml::Value::String(s)) if s == "all" => None,
            Some(toml::Value::Integer(h)) if (1..=63).contains(h) => Some(*h as u64),
            Some(_) => {
                return bad(
                    "assume_honest_nodes",
                    "must be \"all\" or a number from 1 to 63",
                );
            }
        },
        secure_aggregation: p.secure_aggregation.unwrap_or(true),
    };
    if !(s.epsilon_per_query >= 0.001 && s.epsilon_per_query <= 10.0) {
        return bad("epsilon_per_query", "must be between 0.001 and 10");
    }
    if !(s.delta > 0.0 && s.delta <= 1e-3) {
        return bad("delta", "must be in (0, 0.001]");
    }
    if !(s.budget_epsilon >= s.epsilon_per_query && s.budget_epsilon <= 1_000.0) {
        return bad(
            "budget_epsilon",
            "must be at least epsilon_per_query and at most 1000",
        );
    }
    if !(1..=366 * 86_400).contains(&s.budget_period.as_secs()) {
        return bad("budget_period_days", "must be between 1 and 366");
    }
    if !(1..=100).contains(&s.max_groups_per_person) {
        return bad("max_groups_per_person", "must be between 1 and 100");
    }
    if !(1..=100).contains(&s.max_rows_per_person) {
        return bad("max_rows_per_person", "must be between 1 and 100");
    }
    Ok(Some(s))
}

/// `[privacy.public_keys]`: per dimension, a list of text values (`service = ["…"]`,
/// `agency = ["SSA"]`) or an integer range (`fiscal_year = "2022..2026"`).
fn public_keys(
    raw: &std::collections::BTreeMap<String, toml::Value>,
) -> Result<PublicKeys, (String, String)> {
    let mut keys = PublicKeys::schema_only();
    for (column, value) in raw {
        let field = format!("privacy.public_keys.{column}");
        let declared = match value {
            toml::Value::Array(items) => {
                let texts: Option<Vec<String>> = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect();
                match texts {
                    Some(t) => keys.declare_text(column, &t),
                    None => Err("must list text values, e.g. [\"SSA\", \"CMS\"]".into()),
                }
            }
            toml::Value::String(range) => match range.split_once("..") {
                Some((lo, hi)) => match (lo.trim().parse(), hi.trim().parse()) {
                    (Ok(lo), Ok(hi)) => keys.declare_range(column, lo, hi),
                    _ => Err(format!("{range:?} is not an integer range \"lo..hi\"")),
                },
                None => Err(format!(
                    "{range:?} is not an integer range \"lo..hi\" (a list of text values is written [\"…\"])"
                )),
            },
            _ => Err("must be a list of text values or an integer range \"lo..hi\"".into()),
        };
        declared.map_err(|m| (field, m))?;
    }
    Ok(keys)
}

impl NodeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        cxfed_protocol::Identity::new(
            &raw.federation,
            &raw.agency,
            cxfed_protocol::Role::Node,
            "node",
        )
        .map_err(|e| invalid("federation/agency", e.to_string()))?;
        let listen: SocketAddr = raw.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:7001 ({e})",
                    raw.listen
                ),
            )
        })?;
        let k = raw.privacy.k.unwrap_or(DEFAULT_K);
        if k == 0 {
            return Err(invalid("privacy.k", "k must be at least 1".into()));
        }
        let timeout_secs = raw.query.timeout_secs.unwrap_or(30);
        if !(1..=3600).contains(&timeout_secs) {
            return Err(invalid(
                "query.timeout_secs",
                "must be between 1 and 3600".into(),
            ));
        }
        let cache_mb = raw
            .query
            .cache_mb
            .unwrap_or(crate::exact_cache::DEFAULT_CACHE_MB);
        if cache_mb > 65_536 {
            return Err(invalid(
                "query.cache_mb",
                "must be between 0 (off) and 65536".into(),
            ));
        }
        let journey_timeout_secs = raw
            .query
            .journey_timeout_secs
            .unwrap_or(DEFAULT_JOURNEY_TIMEOUT_SECS);
        if !(1..=86_400).contains(&journey_timeout_secs) {
            return Err(invalid(
                "query.journey_timeout_secs",
                "must be between 1 and 86400".into(),
            ));
        }
        let checkpoint_every = raw
            .audit
            .checkpoint_every
            .unwrap_or(crate::audit::DEFAULT_CHECKPOINT_EVERY);
        if !(1..=1_000_000).contains(&checkpoint_every) {
            return Err(invalid(
                "audit.checkpoint_every",
                "must be between 1 and 1000000".into(),
            ));
        }
        let mut seen = vec![raw.agency.clone()];
        for (i, p) in raw.peers.iter().enumerate() {
            if seen.contains(&p.agency) {
                return Err(invalid(
                    &format!("peers[{i}].agency"),
                    format!("{} appears twice (or is this node's own agency)", p.agency),
                ));
            }
            seen.push(p.agency.clone());
            let ok = p
                .url
                .strip_prefix("https://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
            if !ok {
                return Err(invalid(
                    &format!("peers[{i}].url"),
                    format!("{:?} must be an https:// URL", p.url),
                ));
            }
        }
        let peer_agencies: Vec<&str> = raw.peers.iter().map(|p| p.agency.as_str()).collect();
        let mut policy = Policy::resolve(&raw.policy, &raw.agency, &peer_agencies, k)
            .map_err(|(field, message)| invalid(&field, message))?;
        policy.dp =
            dp_settings(&raw.privacy).map_err(|(field, message)| invalid(&field, message))?;
        let engine =
            engine_config(&raw.engine).map_err(|(field, message)| invalid(&field, message))?;
        Ok(NodeConfig {
            policy,
            source: None,
            federation: raw.federation,
            agency: raw.agency,
            listen,
            data_dir: resolve(&raw.data_dir),
            tls: TlsFiles {
                ca: resolve(&raw.tls.ca),
                cert: resolve(&raw.tls.cert),
                key: resolve(&raw.tls.key),
                crl: raw.tls.crl.iter().map(|c| resolve(c)).collect(),
            },
            peers: raw.peers,
            k,
            timeout: Duration::from_secs(timeout_secs),
            cache_mb,
            journey_timeout: Duration::from_secs(journey_timeout_secs),
            audit_checkpoint_every: checkpoint_every,
            engine,
        })
    }

    /// Renders a configuration file (used by the demo and documentation). A steward's
    /// `[privacy.public_keys]` declarations are not rendered (the demo declares none).
    pub fn render(&self) -> String {
        let mut s = format!(
            "federation = {:?}\nagency = {:?}\nlisten = {:?}\ndata_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{}\n[privacy]\nk = {}\n{}\n[query]\ntimeout_secs = {}\ncache_mb = {}\njourney_timeout_secs = {}\n",
            self.federation,
            self.agency,
            self.listen.to_string(),
            self.data_dir.display().to_string(),
            self.tls.ca.display().to_string(),
            self.tls.cert.display().to_string(),
            self.tls.key.display().to_string(),
            if self.tls.crl.is_empty() {
                String::new()
            } else {
                format!(
                    "crl = {:?}\n",
                    self.tls
                        .crl
                        .iter()
                        .map(|c| c.display().to_string())
                        .collect::<Vec<_>>()
                )
            },
            self.k,
            match &self.policy.dp {
                None => "mode = \"k-only\"\n".to_string(),
                Some(d) => format!(
                    "mode = \"dp\"\nepsilon_per_query = {:?}\ndelta = {:?}\nbudget_epsilon = {:?}\nbudget_period_days = {}\nmax_groups_per_person = {}\nmax_rows_per_person = {}\nassume_honest_nodes = {}\nsecure_aggregation = {}\n",
                    d.epsilon_per_query,
                    d.delta,
                    d.budget_epsilon,
                    d.budget_period.as_secs() / 86_400,
                    d.max_groups_per_person,
                    d.max_rows_per_person,
                    d.assume_honest_nodes
                        .map_or_else(|| "\"all\"".to_string(), |h| h.to_string()),
                    d.secure_aggregation
                ),
            },
            self.timeout.as_secs(),
            self.cache_mb,
            self.journey_timeout.as_secs(),
        );
        let p = &self.policy;
        s.push_str(&format!(
            "\n[policy]\nallowed_agencies = {:?}\nhidden_dimensions = {:?}\nmin_k = {}\nmax_groups = {}\nrate_limit_per_minute = {}\nmax_in_flight_per_analyst = {}\nquery_timeout_secs = {}\nmemory_limit_mb = {}\n",
            p.allowed_agencies,
            p.hidden_dimensions,
            p.k,
            p.max_groups,
            p.rate_limit_per_minute,
            p.max_in_flight_per_analyst,
            p.query_timeout.as_secs(),
            p.memory_limit_bytes / (1024 * 1024),
        ));
        s.push_str(&format!(
            "\n[audit]\ncheckpoint_every = {}\n",
            self.audit_checkpoint_every
        ));
        if let EngineConfig::Ballista { scheduler, tls } = &self.engine {
            s.push_str(&format!(
                "\n[engine]\nkind = \"ballista\"\nscheduler = \"{scheduler}\"\ntls = {tls}\n"
            ));
        }
        for p in &self.peers {
            s.push_str(&format!(
                "\n[[peers]]\nagency = {:?}\nurl = {:?}\n",
                p.agency, p.url
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
federation = "cx-demo"
agency = "SSA"
listen = "127.0.0.1:7001"
data_dir = "data"
[tls]
ca = "ca.pem"
cert = "ssa/node.pem"
key = "/abs/node.key"
[[peers]]
agency = "CMS"
url = "https://127.0.0.1:7002"
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let c = NodeConfig::parse(GOOD, Path::new("/etc/cxfed/node.toml")).expect("valid");
        assert_eq!(c.k, DEFAULT_K);
        assert_eq!(c.data_dir, PathBuf::from("/etc/cxfed/data"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/node.key"));
        assert_eq!(c.peers.len(), 1);
        let again = NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
        assert_eq!(again, c);
        assert!(c.tls.crl.is_empty());
    }

    #[test]
    fn dp_settings_round_trip_through_render() {
        // The demo writes its nodes' files with `render` and reads them back: a setting render
        // left out silently went back to its default (the demo's --no-secure-aggregation and
        // --assume-honest-nodes had no effect).
        let mut c = NodeConfig::parse(GOOD, Path::new("/etc/cxfed/node.toml")).expect("valid");
        for (honest, secure) in [(Some(2), false), (None, true), (Some(1), true)] {
            c.policy.dp = Some(crate::policy::DpSettings {
                assume_honest_nodes: honest,
                secure_aggregation: secure,
                ..crate::policy::DpSettings::DEFAULT
            });
            let again =
                NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
            let d = again.policy.dp.expect("dp mode");
            assert_eq!(d.assume_honest_nodes, honest);
            assert_eq!(d.secure_aggregation, secure);
        }
    }

    #[test]
    fn query_section_limits_are_checked_and_round_trip() {
        let with = |lines: &str| format!("{GOOD}\n[query]\n{lines}\n");
        let c = NodeConfig::parse(
            &with("cache_mb = 0\njourney_timeout_secs = 900"),
            Path::new("/etc/cxfed/node.toml"),
        )
        .expect("valid");
        assert_eq!((c.cache_mb, c.journey_timeout.as_secs()), (0, 900));
        let again = NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
        assert_eq!(again, c);
        let d = NodeConfig::parse(GOOD, Path::new("node.toml")).expect("valid");
        assert_eq!(d.cache_mb, crate::exact_cache::DEFAULT_CACHE_MB);
        assert_eq!(d.journey_timeout.as_secs(), DEFAULT_JOURNEY_TIMEOUT_SECS);
        for (line, field) in [
            ("journey_timeout_secs = 0", "query.journey_timeout_secs"),
            (
                "journey_timeout_secs = 100000",
                "query.journey_timeout_secs",
            ),
            ("cache_mb = 70000", "query.cache_mb"),
        ] {
            let err = NodeConfig::parse(&with(line), Path::new("node.toml"))
                .expect_err("refused")
                .to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn crl_is_one_path_or_a_list() {
        let one = GOOD.replace("key = \"/abs/node.key\"", "key = \"k\"\ncrl = \"crl.pem\"");
        let c = NodeConfig::parse(&one, Path::new("/etc/cxfed/node.toml")).expect("valid");
        assert_eq!(c.tls.crl, vec![PathBuf::from("/etc/cxfed/crl.pem")]);
        let many = GOOD.replace(
            "key = \"/abs/node.key\"",
            "key = \"k\"\ncrl = [\"a.pem\", \"/b.pem\"]",
        );
        let c = NodeConfig::parse(&many, Path::new("/etc/cxfed/node.toml")).expect("valid");
        assert_eq!(
            c.tls.crl,
            vec![PathBuf::from("/etc/cxfed/a.pem"), PathBuf::from("/b.pem")]
        );
        let again = NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
        assert_eq!(again.tls.crl, c.tls.crl);
        let bad = GOOD.replace("key = \"/abs/node.key\"", "key = \"k\"\ncrl = 3");
        let err = NodeConfig::parse(&bad, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("crl") || err.contains("line"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let text = GOOD.replace("listen =", "lisen =");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("node.toml") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn refuses_plain_http_peer() {
        let text = GOOD.replace("https://127.0.0.1:7002", "http://127.0.0.1:7002");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("peers[0].url"), "{err}");
    }

    #[test]
    fn policy_errors_name_the_key() {
        let text = format!("{GOOD}\n[policy]\nhidden_dimensions = [\"nosuch\"]\n");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("policy.hidden_dimensions[0]"), "{err}");
        let text = format!("{GOOD}\n[policy]\nmin_k = 30\nrate_limit_per_minute = 5\n");
        let c = NodeConfig::parse(&text, Path::new("node.toml")).expect("valid");
        assert_eq!(
            (c.k, c.policy.k, c.policy.rate_limit_per_minute),
            (10, 30, 5)
        );
    }

    #[test]
    fn privacy_mode_defaults_to_dp_and_checks_values() {
        let c = NodeConfig::parse(GOOD, Path::new("node.toml")).expect("valid");
        assert_eq!(c.policy.dp, Some(DpSettings::DEFAULT));
        let text = format!("{GOOD}\n[privacy]\nmode = \"k-only\"\n");
        assert_eq!(
            NodeConfig::parse(&text, Path::new("node.toml"))
                .expect("valid")
                .policy
                .dp,
            None
        );
        let text = format!("{GOOD}\n[privacy]\nepsilon_per_query = 0\n");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("privacy.epsilon_per_query"), "{err}");
        let text = format!("{GOOD}\n[privacy]\nmode = \"fuzzy\"\n");
        assert!(NodeConfig::parse(&text, Path::new("node.toml")).is_err());
    }

    #[test]
    fn public_keys_are_declared_per_dimension_and_checked() {
        let text = format!(
            "{GOOD}\n[privacy.public_keys]\nagency = [\"SSA\", \"CMS\"]\nfiscal_year = \"2023..2026\"\n"
        );
        let c = NodeConfig::parse(&text, Path::new("node.toml")).expect("valid");
        let declared: Vec<(String, usize)> = c
            .policy
            .dp
            .expect("dp")
            .public_keys
            .declared()
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        assert_eq!(
            declared,
            [("agency".to_string(), 2), ("fiscal_year".to_string(), 4)]
        );
        for (bad, says) in [
            (
                "agency = [\"ssa\"]",
                "\"ssa\" is not a possible value of agency",
            ),
            ("trust = [\"1\"]", "trust is not a dimension"),
            ("person_id = [\"p1\"]", "person_id is not a dimension"),
            ("nope = [\"x\"]", "nope is not a column"),
            ("fiscal_year = \"2026..2023\"", "not a range within"),
            ("fiscal_year = \"recent\"", "not an integer range"),
            (
                "fiscal_year = 2024",
                "must be a list of text values or an integer range",
            ),
            ("service = [1, 2]", "must list text values"),
            ("service = []", "lists no value"),
        ] {
            let text = format!("{GOOD}\n[privacy.public_keys]\n{bad}\n");
            let err = NodeConfig::parse(&text, Path::new("node.toml"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("privacy.public_keys.") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn engine_defaults_to_local_and_checks_its_keys() {
        let c = NodeConfig::parse(GOOD, Path::new("node.toml")).expect("valid");
        assert_eq!(c.engine, EngineConfig::Local);
        let text = format!("{GOOD}\n[engine]\nkind = \"local\"\n");
        let c = NodeConfig::parse(&text, Path::new("node.toml")).expect("valid");
        assert_eq!(c.engine, EngineConfig::Local);
        assert!(!c.render().contains("[engine]"), "local renders as before");
        for (bad, key, says) in [
            ("kind = \"spark\"", "engine.kind", "not an engine"),
            ("kind = 3", "kind", "line"),
            (
                "kind = \"local\"\nscheduler = \"df://h:1\"",
                "engine.scheduler",
                "only for kind",
            ),
            ("kind = \"local\"\nthreads = 2", "threads", "unknown field"),
            (
                "kind = \"local\"\ntls = true",
                "engine.tls",
                "only for kind",
            ),
        ] {
            let text = format!("{GOOD}\n[engine]\n{bad}\n");
            let err = NodeConfig::parse(&text, Path::new("node.toml"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "ballista"))]
    #[test]
    fn ballista_engine_is_refused_by_a_binary_built_without_it() {
        let text = format!("{GOOD}\n[engine]\nkind = \"ballista\"\nscheduler = \"df://h:1\"\n");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("no ballista feature")
            .to_string();
        assert!(
            err.contains("engine.kind") && err.contains("built without it"),
            "{err}"
        );
    }

    #[cfg(feature = "ballista")]
    #[test]
    fn ballista_engine_needs_a_scheduler_address_and_round_trips() {
        let text =
            format!("{GOOD}\n[engine]\nkind = \"ballista\"\nscheduler = \"df://10.0.0.5:50060\"\n");
        let c = NodeConfig::parse(&text, Path::new("node.toml")).expect("valid");
        let EngineConfig::Ballista { scheduler, tls } = &c.engine else {
            panic!("{:?}", c.engine)
        };
        assert_eq!(scheduler.grpc_url(*tls), "http://10.0.0.5:50060");
        let with_tls = text.replace("50060\"", "50060\"\ntls = true");
        let c = NodeConfig::parse(&with_tls, Path::new("node.toml")).expect("valid");
        assert!(matches!(c.engine, EngineConfig::Ballista { tls: true, .. }));
        let again = NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
        assert_eq!(again.engine, c.engine);
        let again = NodeConfig::parse(&c.render(), Path::new("/x/node.toml")).expect("round trip");
        assert_eq!(again.engine, c.engine);
        for (bad, says) in [
            ("kind = \"ballista\"", "needs the scheduler"),
            (
                "kind = \"ballista\"\nscheduler = \"http://h:1\"",
                "must start with df://",
            ),
            ("kind = \"ballista\"\nscheduler = \"df://h:0\"", "port"),
            ("kind = \"ballista\"\nscheduler = \"df://h:x\"", "port"),
            ("kind = \"ballista\"\nscheduler = \"df://\"", "no host"),
            ("kind = \"ballista\"\nscheduler = \"df://a b:1\"", "no host"),
        ] {
            let text = format!("{GOOD}\n[engine]\n{bad}\n");
            let err = NodeConfig::parse(&text, Path::new("node.toml"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("engine.") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn scheduler_addresses() {
        let a = SchedulerAddr::parse("df://sched.ssa.gov").expect("valid");
        assert_eq!(
            (a.host(), a.port()),
            ("sched.ssa.gov", DEFAULT_SCHEDULER_PORT)
        );
        let a = SchedulerAddr::parse("df://[::1]:7").expect("valid");
        assert_eq!((a.host(), a.port()), ("[::1]", 7));
        assert_eq!(a.to_string(), "df://[::1]:7");
        assert!(SchedulerAddr::parse("df://[::1").is_err());
        assert!(SchedulerAddr::parse("127.0.0.1:50050").is_err());
    }

    #[test]
    fn refuses_k_zero() {
        let text = format!("{GOOD}\n[privacy]\nk = 0\n");
        let err = NodeConfig::parse(&text, Path::new("node.toml"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("privacy.k"), "{err}");
    }
}
