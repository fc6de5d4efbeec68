//! The `cxfed` command line: parsing (clap) and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use cxfed_protocol::wire::{ErrorBody, QueryRequest};
use cxfed_queries::schema::Table;

use crate::client::{AnalystClient, describe, error_chain, send_query};
use crate::output::Format;
use crate::shutdown::shutdown_signal;
use crate::tls::TlsFiles;

/// cxfed: federated, privacy-preserving customer-experience analytics across agencies.
#[derive(Debug, Parser)]
#[command(name = "cxfed", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Write calibrated synthetic A-11 CX data for one agency (experience.csv, operational.csv),
    /// or with --journeys for the three agencies of a journey, linked by synthetic SSNs.
    Synth {
        /// Agency abbreviation, e.g. SSA.
        #[arg(
            long,
            required_unless_present = "journeys",
            conflicts_with = "journeys"
        )]
        agency: Option<String>,
        /// Linked populations for a journey's agencies instead: OUT/<AGENCY>/{experience,
        /// operational,linkage}.csv for SSA, CMS, OPM (retirement) or FEMA, SBA, HUD (disaster).
        #[arg(long, value_enum)]
        journeys: Option<crate::synth::journeys::Journey>,
        /// With --journeys: the share of an agency's people on the journey who also go to the
        /// next agency (0-1).
        #[arg(long)]
        overlap: Option<f64>,
        /// Number of people (per agency).
        #[arg(long, default_value_t = 20_000)]
        people: usize,
        /// Random seed (same seed, same bytes).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate a CSV or Parquet file and add it to a node's data directory, atomically.
    Ingest {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// experience or operational.
        #[arg(long, value_parser = parse_table)]
        table: Table,
        /// The file (.csv or .parquet).
        file: PathBuf,
    },
    /// Import survey responses from another system (validated, atomic).
    #[command(subcommand)]
    Import(ImportCommand),
    /// The linkage key agencies share (the SSN): supplied by the steward, stored keyed under the
    /// federation's linkage key, never queryable.
    #[command(subcommand)]
    Linkage(LinkageCommand),
    /// Upgrade a data directory written by an older cxfed to the current schema (a node does
    /// this itself when it starts).
    Migrate {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Reports computed as federated queries.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Run a node.
    Serve {
        /// The node's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a Ballista scheduler with cxfed's functions, for nodes whose `[engine]` is
    /// `kind = "ballista"` (plain gRPC: keep it on the agency's own network).
    #[cfg(feature = "ballista")]
    Scheduler {
        /// Address to listen on (what nodes and executors name as df://HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
        /// Mutual TLS with a node certificate of the agency (else plain gRPC).
        #[command(flatten)]
        tls: ClusterTlsArgs,
    },
    /// Run a Ballista executor with cxfed's functions: polls the scheduler for tasks and reads
    /// the node's Parquet files at the paths the node has them.
    #[cfg(feature = "ballista")]
    Executor {
        /// The scheduler, df://HOST:PORT.
        #[arg(long, value_parser = crate::config::SchedulerAddr::parse)]
        scheduler: crate::config::SchedulerAddr,
        /// Address of this executor's Flight service (results and shuffle data).
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: std::net::SocketAddr,
        /// Host the node and other executors reach this one at (default: the bind address).
        #[arg(long)]
        advertise_host: Option<String>,
        /// Directory for shuffle files (default: a temporary directory, removed on exit).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Tasks run at once (0: one per core).
        #[arg(long, default_value_t = 0)]
        concurrent_tasks: usize,
        /// Mutual TLS with a node certificate of the agency (else plain gRPC).
        #[command(flatten)]
        tls: ClusterTlsArgs,
    },
    /// Check that the node configured in CONFIG is serving: `GET /v1/health` on its own port
    /// with its own certificate (for container health checks; exit 0 only when healthy).
    Health {
        /// The node's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// One-shot set-up of a container federation (no shell needed): a development PKI once,
    /// each agency's node TLS files and synthetic data; skips whatever is already there.
    Seed {
        /// Federation name (SPIFFE trust domain).
        #[arg(long)]
        federation: String,
        /// Directory of the whole PKI, CA key included (keep it out of the nodes).
        #[arg(long)]
        pki: PathBuf,
        /// AGENCY=DIR (repeatable): DIR/tls gets ca.pem, node.pem, node.key; DIR/data the data.
        #[arg(long = "agency", required = true, value_parser = crate::seed::parse_target)]
        targets: Vec<crate::seed::SeedTarget>,
        /// People per agency.
        #[arg(long, default_value_t = 20_000)]
        people: usize,
        /// Certificate validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Hand everything written to UID:GID (the nodes' user).
        #[arg(long, value_parser = crate::seed::parse_owner)]
        owner: Option<(u32, u32)>,
    },
    /// Send a query to a node as an analyst and print the merged answer.
    Query {
        /// The node to ask, e.g. https://127.0.0.1:7001.
        #[arg(long)]
        node: String,
        /// Your certificate files.
        #[command(flatten)]
        tls: TlsArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Accept an answer from only the nodes that responded.
        #[arg(long)]
        allow_partial: bool,
        /// ε to spend on each node (differential-privacy mode; default: each node's maximum):
        /// from 0.001 (the smallest ε exact noise can be calibrated for); a node spends at most
        /// its epsilon_per_query. Anything else is refused before the query is sent.
        #[arg(long, allow_negative_numbers = true)]
        epsilon: Option<f64>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// The SQL.
        sql: String,
    },
    /// Show a node's privacy-budget use per analyst (steward certificate).
    Budget {
        /// The node, e.g. https://127.0.0.1:7001.
        #[arg(long)]
        node: String,
        /// Your certificate files.
        #[command(flatten)]
        tls: TlsArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Explain a query offline: the validated plan, the partial plan every node runs, the merge
    /// and the privacy rules — or the refusal with its rule code and SQL position.
    Explain {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExplainFormat::Text)]
        format: ExplainFormat,
        /// The k to describe (nodes apply their own).
        #[arg(long, default_value_t = crate::config::DEFAULT_K)]
        k: u64,
        /// Explain for `k-only` nodes instead of the default differential-privacy settings.
        #[arg(long)]
        k_only: bool,
        /// The SQL.
        sql: String,
    },
    /// Audit logs: fetch them from nodes, verify them, reconcile them across nodes.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A web console for your role (analyst, steward or auditor) on loopback: it holds your
    /// certificate and talks to nodes over mTLS, so the browser needs none. Open the URL it prints.
    Console {
        /// A node, e.g. https://127.0.0.1:7001; the first coordinates queries (repeat for an
        /// auditor's view of several nodes).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Your certificate files.
        #[command(flatten)]
        tls: TlsArgs,
        /// Where to listen (loopback only, unless --listen-public).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Allow a non-loopback --listen address (anyone who can reach it and has the URL acts
        /// as you).
        #[arg(long)]
        listen_public: bool,
        /// An agency's audit public key for the auditor page, AGENCY=FILE (repeatable), e.g.
        /// SSA=data/ssa/audit-signing.pub.
        #[arg(long = "audit-key", value_parser = parse_audit_key)]
        audit_keys: Vec<(String, PathBuf)>,
    },
    /// A PostgreSQL-protocol server on loopback for your own tools (psql, Python, R, BI):
    /// every query is signed as you and sent to the federation like `cxfed query`; catalog
    /// queries are answered locally. Log in with the password it prints.
    Gateway {
        /// A node, e.g. https://127.0.0.1:7001; the first coordinates queries, the next are
        /// tried in order when it cannot be reached.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Your (analyst) certificate files.
        #[command(flatten)]
        tls: TlsArgs,
        /// Where to listen (loopback only, unless --listen-public).
        #[arg(long, default_value = "127.0.0.1:5433")]
        listen: std::net::SocketAddr,
        /// Allow a non-loopback --listen address (anyone who can reach it and has the password
        /// queries as you).
        #[arg(long)]
        listen_public: bool,
        /// Also write the password to this file as a `.pgpass` line (mode 0600), for
        /// PGPASSFILE.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// ε each query spends on each node (default: each node's maximum).
        #[arg(long)]
        epsilon: Option<f64>,
        /// Accept answers from only the nodes that responded.
        #[arg(long)]
        allow_partial: bool,
        /// Leave out the `<name>_ci95` column beside each aggregate.
        #[arg(long)]
        no_ci95_columns: bool,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// A local three-agency federation on synthetic data: certificates, data, nodes, queries.
    Demo {
        /// Keep everything in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the federation running after the queries, and print how to query it.
        #[arg(long)]
        serve: bool,
        /// People per agency.
        #[arg(long, default_value_t = 20_000)]
        people: usize,
        /// Every node's `[privacy] assume_honest_nodes` (default: all of a query's roster).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=63))]
        assume_honest_nodes: Option<u64>,
        /// Run public-key queries without secure aggregation (every node adds its full noise).
        #[arg(long)]
        no_secure_aggregation: bool,
    },
}

/// `cxfed import ...`.
#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// A GSA Touchpoints "CX Data Collection" response export (FY2024+ A-11 form). External ids
    /// are pseudonymized with the node's secret key; free-text comments are never stored;
    /// responses this node already holds (a re-imported or cumulative export) are skipped.
    Touchpoints {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Agency code, e.g. SSA.
        #[arg(long)]
        agency: String,
        /// The service the survey was about.
        #[arg(long)]
        service: String,
        /// Channel code (website, phone, in_person, ...).
        #[arg(long)]
        channel: String,
        /// Priority Life Experience code.
        #[arg(long)]
        life_experience: String,
        /// Journey stage code.
        #[arg(long)]
        journey_stage: String,
        /// How question_1 was asked.
        #[arg(long, value_enum, default_value_t = crate::touchpoints::Question1::Thumbs)]
        question_1: crate::touchpoints::Question1,
        /// Response date for every row when the export has no created_at column.
        #[arg(long)]
        response_date: Option<String>,
        /// The export (CSV).
        file: PathBuf,
    },
}

/// The overlap of `cxfed synth --journeys` when none is given.
pub const DEFAULT_OVERLAP: f64 = 0.3;

/// `cxfed linkage ...`.
#[derive(Debug, Subcommand)]
pub enum LinkageCommand {
    /// Make the federation's linkage key (32 random bytes in hex, mode 0600; never overwrites).
    /// Made once; every steward installs the same file as `<data_dir>/linkage.key`.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate a `person_id,ssn` CSV (SSN as 123456789 or 123-45-6789) and add each person's
    /// keyed SSN to the node's linkage store, atomically; errors name FILE:LINE:COLUMN and never
    /// show an SSN.
    Ingest {
        /// The node's data directory (holding the federation's linkage.key).
        #[arg(long)]
        data_dir: PathBuf,
        /// The CSV file.
        file: PathBuf,
    },
}

/// `cxfed report ...`.
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// The A-11 Section 280 quarterly CX data in GSA's published HISP layout (CSV), for one
    /// federal fiscal quarter (FY N starts October 1 of N-1), as an analyst.
    #[command(name = "a11-quarterly")]
    A11Quarterly {
        /// Fiscal year, e.g. 2026.
        #[arg(long)]
        fiscal_year: i32,
        /// Fiscal quarter, 1-4 (Q1 = October-December).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
        quarter: u8,
        /// The node to ask, e.g. https://127.0.0.1:7001.
        #[arg(long)]
        node: String,
        /// Your certificate files (analyst).
        #[command(flatten)]
        tls: TlsArgs,
        /// ε each of the report's nine queries (one per question, one for the population)
        /// spends per node (default: each node's maximum; from 0.001, and at most each node's
        /// epsilon_per_query). Anything else is refused before any query is sent.
        #[arg(long, allow_negative_numbers = true)]
        epsilon: Option<f64>,
        /// Write the CSV here (atomically) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `cxfed audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Fetch nodes' audit logs (auditor certificate). Each ends with a fresh signed checkpoint;
    /// its head (`SEQ:HASH`) is printed and written next to the log as `<file>.head`.
    Fetch {
        /// A node, e.g. https://127.0.0.1:7001 (repeat for several).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Your certificate files.
        #[command(flatten)]
        tls: TlsArgs,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// The head seen at the last fetch (one node): refuse a log that no longer holds it,
        /// or, with `--since SEQ`, whose first entry does not follow it.
        #[arg(long)]
        prev: Option<crate::auditor::Head>,
        /// Output file (one node), or directory (several nodes, or an existing directory):
        /// one `<agency>.jsonl` per node.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify one log: every hash, the chain, every checkpoint signature, a signed end, no
    /// replayed or stale request executed. Exit 0 only for a clean log, printing its head
    /// `SEQ:HASH`; otherwise names the first bad sequence number.
    Verify {
        /// The log file (fetched, or a node's audit.jsonl).
        file: PathBuf,
        /// The node's audit public key: its `audit-signing.pub` file, or `ed25519:<hex>`.
        #[arg(long)]
        key: String,
        /// The log was fetched with `--since N`.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// The head printed when the log was last verified: the log must still hold that entry
        /// (with `--since SEQ`, start right after it), or it was cut back or rewritten.
        #[arg(long)]
        prev: Option<crate::auditor::Head>,
        /// Federation CA: also re-check every logged analyst signature.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Reconcile several nodes' logs (every `*.jsonl` in DIR): verify each log whose node's key
    /// is given, then check that every query a coordinator fanned out is in the log of each node
    /// it reached, with matching digests, signatures and decisions, and that every partial a
    /// node answered is in its coordinator's fan-out. Exit 0 only when everything matches.
    Reconcile {
        /// Directory of fetched logs.
        dir: PathBuf,
        /// A node's audit public key, AGENCY=FILE (repeatable), e.g. SSA=ssa-audit-signing.pub.
        #[arg(long = "key", value_parser = parse_audit_key)]
        keys: Vec<(String, PathBuf)>,
    },
}

/// Output formats of `cxfed explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainFormat {
    /// For people.
    Text,
    /// One JSON object.
    Json,
}

/// `cxfed certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a federation CA and node/analyst/steward/auditor certificates for each agency.
    Dev {
        /// Federation name (SPIFFE trust domain).
        #[arg(long)]
        federation: String,
        /// Comma-separated agencies, e.g. SSA,CMS,OPM.
        #[arg(long, value_delimiter = ',')]
        agencies: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Replace a certificate and its key with a new pair for the same identity and server
    /// names, issued by the CA in CA_DIR (a rotation; with a new CA there, a CA roll-over).
    /// Then SIGHUP the node that uses them.
    Renew {
        /// The CA directory (ca.pem and ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate to replace (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Its key (PEM), replaced too.
        #[arg(long)]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// Revoke certificates: add them to the CA's revocation list (CA_DIR/crl.pem), re-signed.
    /// Nodes listing that CRL in `[tls] crl` refuse them at the handshake from their next
    /// reload (SIGHUP). With no certificate, re-issues the CRL (fresh nextUpdate; also how an
    /// empty CRL is made).
    Revoke {
        /// The CA directory (ca.pem and ca.key, as `certs dev` writes it).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The CRL to update (default CA_DIR/crl.pem).
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Why (RFC 5280 reason code).
        #[arg(long, value_enum)]
        reason: Option<RevokeReason>,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = crate::certs::DEFAULT_CRL_DAYS)]
        days: u32,
        /// The certificates (PEM) to revoke.
        certs: Vec<PathBuf>,
    },
}

/// Why a certificate is revoked (RFC 5280 reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RevokeReason {
    /// The private key is (or may be) known to someone else.
    KeyCompromise,
    /// The holder changed agency or role.
    AffiliationChanged,
    /// Replaced by a new certificate.
    Superseded,
    /// The holder no longer needs it.
    CessationOfOperation,
    /// The holder's access was withdrawn.
    PrivilegeWithdrawn,
}

impl From<RevokeReason> for rcgen::RevocationReason {
    fn from(r: RevokeReason) -> Self {
        match r {
            RevokeReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevokeReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevokeReason::Superseded => rcgen::RevocationReason::Superseded,
            RevokeReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevokeReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// A Ballista cluster member's TLS files: all three or none.
#[cfg(feature = "ballista")]
#[derive(Debug, Clone, Args)]
pub struct ClusterTlsArgs {
    /// Federation CA certificate (PEM).
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// A node certificate of the agency (PEM), e.g. the node's own.
    #[arg(long, requires = "ca")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "ca")]
    pub key: Option<PathBuf>,
}

#[cfg(feature = "ballista")]
impl ClusterTlsArgs {
    fn load(self) -> Result<Option<crate::ballista::ClusterTls>, String> {
        match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                crate::ballista::ClusterTls::load(&TlsFiles::new(ca, cert, key))
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(None),
        }
    }
}

/// The caller's certificate files.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Federation CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// Your certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Your private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// A certificate revocation list (PEM) to check node certificates against; repeatable.
    #[arg(long)]
    pub crl: Vec<PathBuf>,
}

impl From<TlsArgs> for TlsFiles {
    fn from(a: TlsArgs) -> Self {
        TlsFiles {
            ca: a.ca,
            cert: a.cert,
            key: a.key,
            crl: a.crl,
        }
    }
}

fn parse_audit_key(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((agency, path)) if !agency.is_empty() && !path.is_empty() => {
            Ok((agency.to_uppercase(), PathBuf::from(path)))
        }
        _ => Err(format!(
            "{s:?}: expected AGENCY=FILE, e.g. SSA=audit-signing.pub"
        )),
    }
}

fn parse_table(s: &str) -> Result<Table, String> {
    Table::from_name(s)
        .ok_or_else(|| format!("{s:?} is not a table; use experience or operational"))
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<(), String> {
    match command {
        Command::Certs(CertsCommand::Dev {
            federation,
            agencies,
            out,
            days,
            force,
        }) => {
            crate::certs::dev(&federation, &agencies, &out, days, force)
                .map_err(|e| e.to_string())?;
            println!(
                "wrote federation {federation} CA and certificates for {} to {}",
                agencies.join(", "),
                out.display()
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Renew {
            ca_dir,
            cert,
            key,
            days,
        }) => {
            let r = crate::certs::renew(&ca_dir, &cert, &key, days).map_err(|e| e.to_string())?;
            println!(
                "renewed {} in {} (serial {} -> {}, valid until {}); send SIGHUP to the node that uses it",
                r.identity,
                cert.display(),
                r.old_serial,
                r.new_serial,
                r.not_after
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Revoke {
            ca_dir,
            crl,
            reason,
            days,
            certs,
        }) => {
            let crl = crl.unwrap_or_else(|| ca_dir.join(crate::certs::CRL_FILE));
            let w = crate::certs::revoke(&ca_dir, &crl, &certs, reason.map(Into::into), days)
                .map_err(|e| e.to_string())?;
            for c in &w.certs {
                let who = c
                    .identity
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "(no identity)".into());
                if c.already {
                    println!("{who} serial {} was already revoked", c.serial);
                } else {
                    println!("revoked {who} serial {}", c.serial);
                }
            }
            println!(
                "wrote {} (CRL number {}, {} certificate(s) revoked, next update {}); send SIGHUP to every node whose [tls] crl lists it",
                w.path.display(),
                w.number,
                w.revoked,
                w.next_update
            );
            Ok(())
        }
        Command::Synth {
            agency: None,
            journeys: Some(journey),
            overlap,
            people,
            seed,
            out,
        } => {
            let opts = crate::synth::journeys::JourneyOptions {
                journey,
                people,
                overlap: overlap.unwrap_or(DEFAULT_OVERLAP),
                seed,
            };
            let agencies = crate::synth::journeys::write(&opts, &out).map_err(|e| e.to_string())?;
            for a in agencies {
                println!(
                    "{}: {} people ({} from the agency before) → {} cases in {}, {} survey \
                     responses in {}, linkage keys in {}",
                    a.agency,
                    a.files.people,
                    a.from_previous,
                    a.files.operational_rows,
                    a.files.operational_path.display(),
                    a.files.experience_rows,
                    a.files.experience_path.display(),
                    a.linkage_path.display()
                );
            }
            Ok(())
        }
        Command::Synth {
            agency,
            overlap,
            people,
            seed,
            out,
            ..
        } => {
            if overlap.is_some() {
                return Err("--overlap needs --journeys".into());
            }
            let agency = agency.ok_or("--agency or --journeys is required")?;
            let opts = crate::synth::SynthOptions {
                agency,
                people,
                seed,
            };
            let agency = opts.agency.clone();
            let summary = crate::synth::write(&opts, &out).map_err(|e| e.to_string())?;
            println!(
                "{agency}: {} people → {} cases in {}, {} survey responses in {}",
                summary.people,
                summary.operational_rows,
                summary.operational_path.display(),
                summary.experience_rows,
                summary.experience_path.display()
            );
            Ok(())
        }
        Command::Ingest {
            data_dir,
            table,
            file,
        } => {
            let report = tokio::task::spawn_blocking(move || {
                crate::ingest::ingest(&data_dir, table, &file, true)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            println!(
                "added {} rows to {} as {}",
                report.rows,
                report.table.name(),
                report.path.display()
            );
            Ok(())
        }
        Command::Health { config, timeout } => {
            let config = crate::config::NodeConfig::load(&config).map_err(|e| e.to_string())?;
            let h = crate::seed::health(&config, Duration::from_secs(timeout)).await?;
            println!(
                "{} node of {}: {} (cxfed {})",
                h.agency, h.federation, h.status, h.version
            );
            Ok(())
        }
        Command::Seed {
            federation,
            pki,
            targets,
            people,
            days,
            owner,
        } => {
            let opts = crate::seed::SeedOptions {
                federation,
                pki,
                targets,
                people,
                days,
                owner,
            };
            let r = tokio::task::spawn_blocking(move || crate::seed::seed(&opts))
                .await
                .map_err(|e| format!("seed task failed: {e}"))?
                .map_err(|e| e.to_string())?;
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            println!(
                "seed: pki {}; tls copied for {}; crl copied for {}; data seeded for {}",
                if r.made_pki { "made" } else { "kept" },
                list(&r.copied_tls),
                list(&r.copied_crl),
                list(&r.seeded_data)
            );
            Ok(())
        }
        #[cfg(feature = "ballista")]
        Command::Scheduler { bind, tls } => {
            let tls = tls.load()?;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .map_err(|e| format!("listen on {bind}: {e}"))?;
            println!("cxfed Ballista scheduler on df://{bind}; Ctrl-C to stop");
            crate::ballista::run_scheduler(listener, tls, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "ballista")]
        Command::Executor {
            scheduler,
            bind,
            advertise_host,
            work_dir,
            concurrent_tasks,
            tls,
        } => {
            let tls = tls.load()?;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .map_err(|e| format!("listen on {bind}: {e}"))?;
            println!("cxfed Ballista executor on {bind}, polling {scheduler}; Ctrl-C to stop");
            let opts = crate::ballista::ExecutorOptions {
                scheduler,
                advertise_host,
                work_dir,
                concurrent_tasks,
                tls,
            };
            crate::ballista::run_executor(listener, opts, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Serve { config } => {
            let config = crate::config::NodeConfig::load(&config).map_err(|e| e.to_string())?;
            crate::server::run(config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Query {
            node,
            tls,
            format,
            allow_partial,
            epsilon,
            timeout,
            sql,
        } => {
            let client = AnalystClient::new(&tls.into(), Duration::from_secs(timeout))
                .map_err(|e| e.to_string())?;
            let req = QueryRequest::new(sql)
                .require_all(!allow_partial)
                .epsilon(epsilon);
            let resp = send_query(&client, &node, &req)
                .await
                .map_err(|e| e.to_string())?;
            print!("{}", crate::output::render(&resp, format));
            if !resp.complete {
                eprintln!("warning: partial federation answer: not every node contributed");
            }
            Ok(())
        }
        Command::Budget { node, tls, json } => {
            let client = crate::client::http_client(&tls.into(), Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            let url = format!("{}/v1/budget", node.trim_end_matches('/'));
            let resp = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                    Ok(b) => describe(&b),
                    Err(_) => format!("{url}: HTTP {status}"),
                });
            }
            let b: cxfed_protocol::wire::BudgetResponse =
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&b).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", crate::output::render_budget(&b));
            }
            Ok(())
        }
        Command::Explain {
            format,
            k,
            k_only,
            sql,
        } => {
            let ctx = cxfed_queries::context::planning_context().map_err(|e| e.to_string())?;
            let defaults = crate::policy::DpSettings::DEFAULT;
            let params = (!k_only).then(|| defaults.params(k, None));
            let dp = params
                .as_ref()
                .map(|params| cxfed_queries::explain::DpContext {
                    params,
                    public_keys: &defaults.public_keys,
                    max_groups: crate::policy::DEFAULT_MAX_GROUPS,
                    secure_aggregation: defaults.secure_aggregation,
                });
            let e = cxfed_queries::explain::explain_with(&ctx.state(), &sql, k, k, dp)
                .await
                .map_err(|e| e.to_string())?;
            match format {
                ExplainFormat::Text => print!("{e}"),
                ExplainFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&e).map_err(|e| e.to_string())?
                ),
            }
            match e {
                cxfed_queries::explain::Explanation::Accepted { .. } => Ok(()),
                cxfed_queries::explain::Explanation::Refused { code, .. } => {
                    Err(format!("query refused ({code})"))
                }
            }
        }
        Command::Audit(cmd) => audit(cmd).await,
        Command::Import(ImportCommand::Touchpoints {
            data_dir,
            agency,
            service,
            channel,
            life_experience,
            journey_stage,
            question_1,
            response_date,
            file,
        }) => {
            let opts = crate::touchpoints::ImportOptions {
                agency,
                service,
                channel,
                life_experience,
                journey_stage,
                question_1,
                response_date,
            };
            let r =
                crate::touchpoints::import(&data_dir, &file, &opts).map_err(|e| e.to_string())?;
            match &r.ingest {
                Some(i) => print!(
                    "added {} Touchpoints responses to experience as {}",
                    i.rows,
                    i.path.display()
                ),
                None => print!("added no Touchpoints responses"),
            }
            println!(
                "; {} already stored on this node and {} repeated in the file skipped; {} \
                 free-text comment(s) not stored",
                r.already_stored, r.repeated, r.comments_dropped
            );
            Ok(())
        }
        Command::Linkage(LinkageCommand::Keygen { out }) => {
            let id = crate::linkage::keygen(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "wrote linkage key {id} to {} (mode 0600); install the same file as linkage.key \
                 in every node's data directory, and keep it as secret as the SSNs",
                out.display()
            );
            Ok(())
        }
        Command::Linkage(LinkageCommand::Ingest { data_dir, file }) => {
            let r = crate::linkage::ingest(&data_dir, &file).map_err(|e| e.to_string())?;
            println!(
                "added {} keyed linkage value(s) to {}; {} already stored and {} repeated in the \
                 file skipped; {} person(s) linked on this node",
                r.added,
                r.path.display(),
                r.already_stored,
                r.repeated,
                r.persons
            );
            Ok(())
        }
        Command::Migrate { data_dir } => {
            let m = crate::ingest::migrate(&data_dir).map_err(|e| e.to_string())?;
            println!(
                "{}: schema version {} -> {}; {} file(s), {} row(s) rewritten",
                data_dir.display(),
                m.from,
                cxfed_queries::schema::SCHEMA_VERSION,
                m.files,
                m.rows
            );
            Ok(())
        }
        Command::Report(ReportCommand::A11Quarterly {
            fiscal_year,
            quarter,
            node,
            tls,
            epsilon,
            out,
        }) => {
            let client = AnalystClient::new(&tls.into(), Duration::from_secs(300))
                .map_err(|e| e.to_string())?;
            let csv = crate::report::a11_quarterly(&client, &node, fiscal_year, quarter, epsilon)
                .await
                .map_err(|e| e.to_string())?;
            match out {
                Some(path) => {
                    crate::storage::write_atomic(&path, csv.as_bytes(), false)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!(
                        "wrote {} rows to {}",
                        csv.lines().count().saturating_sub(1),
                        path.display()
                    );
                }
                None => print!("{csv}"),
            }
            Ok(())
        }
        Command::Console {
            nodes,
            tls,
            listen,
            listen_public,
            audit_keys,
        } => {
            let console = crate::console::start(crate::console::ConsoleOptions {
                nodes,
                tls: tls.into(),
                listen,
                listen_public,
                audit_keys,
            })
            .await
            .map_err(|e| e.to_string())?;
            println!(
                "cxfed console ({}) at {}\nopen it in your browser; Ctrl-C to stop",
                console.role.as_str(),
                console.url
            );
            shutdown_signal().await;
            console.shutdown().await;
            Ok(())
        }
        Command::Gateway {
            nodes,
            tls,
            listen,
            listen_public,
            password_file,
            epsilon,
            allow_partial,
            no_ci95_columns,
            timeout,
        } => {
            let gw = crate::gateway::start(crate::gateway::GatewayOptions {
                nodes,
                tls: tls.into(),
                listen,
                listen_public,
                password_file: password_file.clone(),
                epsilon,
                allow_partial,
                ci95_columns: !no_ci95_columns,
                timeout: Duration::from_secs(timeout),
            })
            .await
            .map_err(|e| e.to_string())?;
            println!("cxfed gateway for {} at {}", gw.identity, gw.url());
            match &password_file {
                Some(p) => println!("password in {} (PGPASSFILE={})", p.display(), p.display()),
                None => println!("password: {}", gw.password.expose()),
            }
            println!("Ctrl-C to stop");
            shutdown_signal().await;
            gw.shutdown().await;
            Ok(())
        }
        Command::Demo {
            dir,
            serve,
            people,
            assume_honest_nodes,
            no_secure_aggregation,
        } => crate::demo::run(crate::demo::DemoOptions {
            dir,
            serve,
            people,
            assume_honest_nodes,
            secure_aggregation: !no_secure_aggregation,
        })
        .await
        .map_err(|e| e.to_string()),
    }
}

async fn audit(cmd: AuditCommand) -> Result<(), String> {
    match cmd {
        AuditCommand::Fetch {
            nodes,
            tls,
            since,
            prev,
            out,
        } => {
            if prev.is_some() && nodes.len() > 1 {
                return Err("--prev names one log's head: fetch one node at a time".into());
            }
            let tls: crate::tls::TlsFiles = tls.into();
            let federation = crate::client::own_identity(&tls.cert)
                .map_err(|e| e.to_string())?
                .federation()
                .to_string();
            let client = crate::client::http_client(&tls, Duration::from_secs(300))
                .map_err(|e| e.to_string())?;
            let into_dir = nodes.len() > 1 || out.is_dir();
            if into_dir {
                std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            }
            for node in &nodes {
                let url = format!("{}/v1/audit?since={since}", node.trim_end_matches('/'));
                let crate::client::FetchedLog { served_by, bytes } =
                    crate::client::fetch_audit(&client, node, since, &federation).await?;
                let last = bytes
                    .split(|b| *b == b'\n')
                    .rfind(|l| !l.is_empty())
                    .and_then(|l| crate::audit::parse_line(l).ok())
                    .ok_or_else(|| format!("{url}: the node sent no log lines"))?;
                // A log is the node's that served it, whatever its lines say.
                if last.node != served_by.agency() {
                    return Err(format!(
                        "{url}: TAMPERED — served by {served_by}, but its last entry names {}",
                        last.node
                    ));
                }
                if let Some(p) = &prev {
                    crate::auditor::check_prev(&bytes, since, p)
                        .map_err(|e| format!("{url}: TAMPERED — entry {e}"))?;
                }
                let path = if into_dir {
                    out.join(format!("{}.jsonl", last.node.to_lowercase()))
                } else {
                    out.clone()
                };
                crate::storage::write_atomic(&path, &bytes, false)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let head = crate::auditor::Head {
                    seq: last.seq,
                    hash: last.hash.clone(),
                };
                let head_path = head_file(&path);
                crate::storage::write_atomic(&head_path, format!("{head}\n").as_bytes(), false)
                    .map_err(|e| format!("{}: {e}", head_path.display()))?;
                println!(
                    "fetched {} seq {}..={} to {} (head {head})",
                    last.node,
                    since + 1,
                    last.seq,
                    path.display()
                );
            }
            Ok(())
        }
        AuditCommand::Verify {
            file,
            key,
            since,
            prev,
            ca,
        } => {
            let key_text = if key.starts_with("ed25519:") {
                key.clone()
            } else {
                std::fs::read_to_string(&key).map_err(|e| format!("{key}: {e}"))?
            };
            let key =
                crate::audit::PublicKey::parse(&key_text).map_err(|e| format!("{key}: {e}"))?;
            let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let checker = match &ca {
                Some(ca) => crate::auditor::checker_for(&bytes, ca)?,
                None => None,
            };
            let options = crate::auditor::Options {
                since,
                prev: prev.as_ref(),
                checker: checker.as_ref(),
            };
            match crate::auditor::verify_with(&bytes, &key, &options) {
                Ok(v) => {
                    println!(
                        "{}: clean — node {}, seq {}..={}, {} signed checkpoints, last at {}{}{}\nhead {}",
                        file.display(),
                        v.node,
                        v.first_seq,
                        v.last_seq,
                        v.checkpoints,
                        v.head_time,
                        if ca.is_some() {
                            format!(", {} analyst signatures re-checked", v.signatures_checked)
                        } else {
                            String::new()
                        },
                        match &prev {
                            Some(p) => format!(", still holds the previous head {p}"),
                            None => String::new(),
                        },
                        v.head()
                    );
                    Ok(())
                }
                Err(p) => Err(format!(
                    "{}: TAMPERED — first bad entry {p}",
                    file.display()
                )),
            }
        }
        AuditCommand::Reconcile { dir, keys } => {
            let mut by_agency = std::collections::BTreeMap::new();
            for (agency, path) in keys {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let key = crate::audit::PublicKey::parse(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                by_agency.insert(agency, key);
            }
            let r = crate::auditor::reconcile_dir_with(&dir, &by_agency)?;
            for log in &r.logs {
                let status = match &log.status {
                    crate::auditor::LogStatus::Verified(v) => format!(
                        "verified (chain and {} checkpoint signatures, seq {}..={}, head {})",
                        v.checkpoints,
                        v.first_seq,
                        v.last_seq,
                        v.head()
                    ),
                    crate::auditor::LogStatus::Unverified => format!(
                        "NOT verified (line hashes only; give --key {}=FILE)",
                        log.node
                    ),
                    crate::auditor::LogStatus::Tampered(p) => format!("TAMPERED — {p}"),
                };
                println!("{} {}: {status}", log.node, log.file.display());
            }
            println!(
                "{} nodes ({}), {} coordinated queries, {} node answers matched",
                r.nodes.len(),
                r.nodes.join(", "),
                r.queries,
                r.matched
            );
            for m in &r.mismatches {
                println!("MISMATCH {m}");
            }
            if r.mismatches.is_empty() {
                Ok(())
            } else {
                Err(format!("{} mismatch(es)", r.mismatches.len()))
            }
        }
    }
}

/// Where `audit fetch` writes the head of the log it wrote to `log`: `<log>.head`.
pub fn head_file(log: &std::path::Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}
