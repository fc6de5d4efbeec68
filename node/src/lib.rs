//! The cxfed node: one binary that serves an agency's CX data to a federation over mutual TLS,
//! coordinates federated queries, ingests data, and makes development certificates and synthetic
//! data.
//!
//! # Layers
//! Modules import only modules on lower lines (a module's line is one above the highest it
//! imports; `.ci/cycles.py`, run by CI, fails on any import circle). `cli` is the top: nothing
//! imports it.
//!
//! ```text
//!  cli                                              command groups, dispatch
//!  demo                                             the local three-agency federation
//!  server                                           HTTP routes; errors become responses
//!  coordinator                                      fan-out, merge (journeys: coordinator/journey)
//!  node      seed                                   the node's state and answer, no HTTP types
//!  journey   synth                                  a node's journey steps; synthetic data
//!  partial   approvals  linkage  console            run a partial; the analyst's console
//!  engine    auditor    secagg                      where plans run (local or Ballista)
//!  ballista  gateway    report   requests  rotation
//!  client    config
//!  exact_cache  tls     touchpoints
//!  audit     certs      ingest   ledger    row_bounds
//!  storage   policy     output   examples  shutdown  no crate imports
//! ```
//!
//! # Layout
//! - [`config`]: `node.toml`, parsed and checked.
//! - [`certs`]: development CA and identities (`cxfed certs dev`), revocation
//!   (`cxfed certs revoke`).
//! - [`tls`]: rustls configurations (TLS 1.3, ring, CRLs) and peer identities.
//! - [`rotation`]: certificate, key, CA bundle and CRL reloads without downtime.
//! - [`client`]: the mTLS HTTP client used by the CLI and by coordinators; signing, sending and
//!   describing an analyst's query ([`client::send_query`]).
//! - [`synth`]: calibrated synthetic A-11 CX data (`cxfed synth`), and linked populations of a
//!   journey's agencies with synthetic SSNs (`cxfed synth --journeys`, [`synth::journeys`]).
//! - [`ingest`]: CSV/Parquet validation and atomic Parquet writes (`cxfed ingest`).
//! - [`linkage`]: the linkage key agencies share (SSN), validated and stored keyed, never
//!   queryable (`cxfed linkage ingest`).
//! - [`touchpoints`]: GSA Touchpoints response exports in, pseudonymized (`cxfed import touchpoints`).
//! - [`report`]: the A-11 quarterly report as federated queries (`cxfed report a11-quarterly`).
//! - [`storage`]: the data directory layout, schema versions and migration.
//! - [`engine`]: the node's DataFusion session over its Parquet files, and where its partial
//!   plans run (in process, or on a Ballista cluster).
//! - `ballista` (the `ballista` feature): Ballista embedded: the node's cluster session, and
//!   the scheduler and executor of `cxfed scheduler` / `cxfed executor`.
//! - [`approvals`]: validated queries cached by their SQL, so a repeated query is not planned again.
//! - [`partial`]: what a node runs for a coordinator: re-validate, execute, suppress, encode.
//! - [`exact_cache`]: exact partials reused while the data files are unchanged (noise,
//!   suppression and budgets still apply to every query).
//! - [`row_bounds`]: the most rows one person holds per data file, to bound people from row counts.
//! - [`coordinator`]: fan-out to every node, merge, final suppression.
//! - [`secagg`]: secure aggregation: one-time keys, roster checks, masking, noise shares.
//! - [`journey`]: journey queries (the same people at two agencies): this node's steps of the
//!   private intersection-sum and the coordinator's run of them.
//! - [`policy`]: the steward's policy (who may ask, hidden dimensions, k floor, limits).
//! - [`audit`]: the hash-chained, signed query log a node writes.
//! - [`auditor`]: what an auditor does with fetched logs: verify, reconcile.
//! - [`requests`]: checking analysts' signed requests (signature, chain, coordinator, freshness,
//!   replay).
//! - [`ledger`]: the per-analyst privacy-budget ledger.
//! - [`node`]: the node's state and its answer to a partial, free of HTTP.
//! - [`server`]: the axum HTTPS server and its routes; errors become responses there.
//! - [`console`]: the local web console for analysts, stewards and auditors (`cxfed console`).
//! - [`gateway`]: the federation over the PostgreSQL wire protocol, for analysts' own tools
//!   (`cxfed gateway`).
//! - [`output`]: table / JSON / CSV rendering of results.
//! - [`examples`]: the example queries of the demo and the console.
//! - [`demo`]: the self-contained three-agency demo.
//! - [`shutdown`]: Ctrl-C and SIGTERM for long-running commands.
//! - [`cli`]: command-line parsing and dispatch.

pub mod approvals;
pub mod audit;
pub mod auditor;
#[cfg(feature = "ballista")]
pub mod ballista;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod coordinator;
pub mod demo;
pub mod engine;
pub mod exact_cache;
pub mod examples;
pub mod gateway;
pub mod ingest;
pub mod journey;
pub mod ledger;
pub mod linkage;
pub mod node;
pub mod output;
pub mod partial;
pub mod policy;
pub mod report;
pub mod requests;
pub mod rotation;
pub mod row_bounds;
pub mod secagg;
pub mod seed;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod synth;
pub mod tls;
pub mod touchpoints;
