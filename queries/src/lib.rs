//! The query side of cxfed: the CX schema, which SQL is allowed, and how one aggregate query is
//! split into per-node partial aggregates and merged back. Pure: no I/O, no networking.
//!
//! # Layout
//! ```text
//!  SQL ──▶ DataFusion LogicalPlan ──▶ validate ──▶ ApprovedQuery
//!                                                   │
//!                    node: partial_plan() ◀─────────┤  (COUNT, SUM, SUM of squares, persons)
//!                    coordinator: merge() ◀─────────┘  (sum partials, k-suppress, HAVING/ORDER/LIMIT)
//! ```
//! - [`schema`]: tables, columns, kinds, vocabularies.
//! - [`rules`]: refusal codes and positions.
//! - [`validate`]: SQL → [`ApprovedQuery`] or a [`Rejection`].
//! - [`rewrite`]: the partial plan and the merge plan.
//! - [`cells`]: `k-only` per-cell k: the regions of rows each aggregate reads, their people
//!   counts (exact, or bounded from row counts), and cell suppression.
//! - [`privacy`]: the differentially private partial plan and its noise.
//! - [`context`]: a planning context with the CX schema and no data.
//! - [`bounding`]: the per-person contribution bounds of the DP partial, in one hash pass.
//! - [`dp`]: exact discrete Laplace noise, calibration, partition selection.
//! - [`keyset`]: public key sets: groups released without partition selection.
//! - [`noise_share`]: exact noise shares, so the noise of any h honest nodes sums to one central
//!   discrete Laplace draw.
//! - [`percentile`]: MEDIAN and percentiles in `dp` mode: noisy histograms over public grids.
//! - [`explain`]: the plan, partial plan, merge and privacy rules of a query, or its refusal.
//! - [`present`]: how a person reads each output column (rounding, calendar unit, whole range).
//! - [`journey`]: journey queries: the same people at two agencies, joined `USING (person_id)`
//!   by a private linkage; validation and the per-side, per-person SQL each node runs.
#![forbid(unsafe_code)]

pub mod bounding;
pub mod cells;
pub mod context;
pub mod dp;
pub mod explain;
pub mod journey;
pub mod keyset;
pub mod noise_share;
pub mod percentile;
pub mod present;
pub mod privacy;
pub mod rewrite;
pub mod rules;
pub mod schema;
pub mod validate;

#[cfg(test)]
mod testdata;
