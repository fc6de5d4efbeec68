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
//! - [`validate`]: SQL → [`validate::ApprovedQuery`] or a [`rules::Rejection`].
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
//!
//! # Adding an aggregate
//! The one-trait shape the restructuring asks for (an aggregate = one file plus its
//! registration) is not built yet. Today a new aggregate kind touches these places, in this
//! order; MEDIAN and the percentiles were added this way, with their own parts kept in
//! [`percentile`], which is the example to follow:
//! 1. [`validate`]: a variant of `AggKind` (and its `name`), recognised in `check_aggregate`
//!    (the function name, its arguments, what is refused and with which [`rules::Rule`]; a new
//!    refusal is a new `Rule` variant with its code and slug, listed in `Rule::ALL`).
//! 2. [`rewrite`]: the columns its partial carries (`ApprovedQuery::parts`: some of the count
//!    `n`, sum `s` and sum of squares `q`, or its own, as `percentile::bucket_columns` does),
//!    their node-side expressions (`partial_plan`), what `check_partial` accepts from a peer,
//!    the coordinator's final expression (`final_value`) and its noise interval (`interval`).
//! 3. [`cells`]: in `k-only` mode, the regions of rows it reads (or a refusal: an exact
//!    percentile is one person's value, CXF-Q021).
//! 4. [`privacy`]: in `dp` mode, `dp_partial`'s row expressions, the per-person bounds
//!    ([`bounding::Cap`], and [`bounding::Share`] or [`bounding::Mean`] when a person's rows in
//!    a group are bounded together), its `Stat` (columns and L1 sensitivity, which decides its
//!    share of ε) and its fixed-point `Encoding`.
//! 5. [`explain`]: its merge formula and privacy lines; [`present`]: how its column reads
//!    (rounding, whole range).
//! 6. Tests: the corpora (`queries/tests/corpus/allowed.sql`, `refused.sql`), an exact-merge
//!    test against a pooled oracle with noise off, and interval coverage with noise on.
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
