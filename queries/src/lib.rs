//! The query side of cxfed: the CX schema, which SQL is allowed, and how one aggregate query is
//! split into per-node partial aggregates and merged back. Pure: no I/O, no networking.
//!
//! # Flow
//! ```text
//!  SQL ──▶ DataFusion LogicalPlan ──▶ validate ──▶ ApprovedQuery
//!                                                   │
//!                    node: partial_plan() ◀─────────┤  k-only: cells; dp: privacy
//!                                                   │  (COUNT, SUM, SUM of squares, persons)
//!                    coordinator: merge() ◀─────────┘  (sum partials, k-suppress, HAVING/ORDER/LIMIT)
//! ```
//!
//! # Layers
//! The top-level modules form layers: a module imports only from layers below its own (and
//! from its own layer where an arrow says so). `.ci/cycles.py` checks that no two modules import
//! each other, directly or round about; methods one module adds to [`query::ApprovedQuery`] (an
//! `impl` block in that module) are used only from layers above it too.
//! ```text
//!  5  explain ──▶ journey   present        what a query means to a person; journeys
//!  4  validate            merge              SQL → ApprovedQuery; partials → the answer
//!  3  cells     privacy                      a node's partial: k-only ; dp (noise included)
//!  2  percentile ──▶ bounding                one aggregate kind; per-person bounds
//!  1  query ──▶ partial                      ApprovedQuery + AggKind ; the partial's contract
//!  0  schema  rules  context  keyset  dp  noise_share  (noise_share ──▶ dp, keyset ──▶ schema,
//!                                                       context ──▶ schema)
//! ```
//! - Layer 0, the ground: [`schema`] (tables, columns, kinds, vocabularies, declared ranges),
//!   [`rules`] (refusal codes and positions, and [`rules::QueryError`]), [`context`] (a
//!   planning context with the CX schema and no data), [`keyset`] (public key sets: groups
//!   released without partition selection), [`dp`] (exact discrete Laplace noise, calibration,
//!   partition selection) and [`noise_share`] (exact noise shares, so the noise of any h honest
//!   nodes sums to one central discrete Laplace draw).
//! - Layer 1, the types every later step shares: [`partial`] (what a partial carries: column
//!   names and [`partial::Part`] kinds, [`partial::Encoding`], [`partial::PartialMeta`], [`partial::KPartial`], and the
//!   node's own-k [`partial::suppress`]) and [`query`] ([`query::AggKind`] and
//!   [`query::ApprovedQuery`], whose fields are private; only [`validate`] builds one, through
//!   its crate-private constructor).
//! - Layer 2, aggregate kinds with their own parts: [`percentile`] (MEDIAN and percentiles in
//!   `dp` mode: recognised arguments, public grids, histogram parts, their DP sensitivity,
//!   reading the merged histogram, explanation lines), over [`bounding`] (the per-person
//!   contribution bounds of the DP partial in one hash pass, and each statistic's L1 bound,
//!   `bounding::Stat`).
//! - Layer 3, a node's partial in each mode: [`cells`] (`k-only`: the partial plan, the regions
//!   of rows each aggregate reads, their people counts — exact, or bounded from row counts —
//!   and cell suppression) and [`privacy`] (`dp`: the differentially private partial plan, its
//!   bounds and its noise).
//! - Layer 4: [`validate`] (SQL → [`query::ApprovedQuery`] or a [`rules::Rejection`]; above
//!   [`percentile`], which recognises its own arguments) and [`merge`] (the coordinator: checks
//!   each peer's partial, sums them, k-suppresses, final values and their noise intervals).
//! - Layer 5, on top: [`explain`] (the plan, partial plan, merge and privacy rules of a query,
//!   or its refusal), [`present`] (how a person reads each output column: rounding, calendar
//!   unit, whole range) and [`journey`] (journey queries: the same people at two agencies,
//!   joined `USING (person_id)` by a private linkage; validation and the per-side, per-person
//!   SQL each node runs).
//!
//! # Adding an aggregate
//! The one-trait shape the restructuring asks for (an aggregate = one file plus its
//! registration) is not built yet. Today a new aggregate kind touches these places, in this
//! order; MEDIAN and the percentiles were added this way, with their own parts kept in
//! [`percentile`], which is the example to follow (an aggregate module sits in layer 2: it may
//! use [`query`], [`partial`] and [`bounding`], never [`cells`], [`privacy`] or [`merge`],
//! which call into it):
//! 1. [`query`]: a variant of `AggKind` (its `Display` name, and `AggKind::parts`: which
//!    [`partial::Part`]s its partial carries — some of the count, sum and sum of squares — or
//!    none when it carries its own columns, as `percentile::bucket_columns` does). [`validate`]: recognise it in `check_aggregate` (the
//!    function name, its arguments, what is refused and with which [`rules::Rule`]; a new
//!    refusal is a new `Rule` variant with its code and slug, listed in `Rule::ALL`).
//! 2. [`cells`]: in `k-only` mode, its node-side expressions (`part_aggregates`) and the
//!    regions of rows it reads (`cell_regions`; or a refusal: an exact percentile is one
//!    person's value, CXF-Q021).
//! 3. [`privacy`]: in `dp` mode, `dp_partial`'s row expressions, the per-person bounds
//!    ([`bounding::Cap`], and [`bounding::Share`] or [`bounding::Mean`] when a person's rows in
//!    a group are bounded together), its `bounding::Stat` (columns and L1 sensitivity, which
//!    decides its share of ε) and its fixed-point [`partial::Encoding`].
//! 4. [`merge`]: what `check_partial` accepts from a peer, how `normalize` brings its columns
//!    to the canonical schema, the coordinator's final expression (`final_value`) and its
//!    noise interval (`interval`).
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
pub mod merge;
pub mod noise_share;
pub mod partial;
pub mod percentile;
pub mod present;
pub mod privacy;
pub mod query;
pub mod rules;
pub mod schema;
pub mod validate;

#[cfg(test)]
mod testdata;
