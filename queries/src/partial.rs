//! The partial's contract: what a node sends the coordinator for one query — its columns'
//! names and [`Part`] kinds, each aggregate's [`Encoding`], the [`PartialMeta`] — and the
//! own-k [`suppress`] both sides apply. No partial plan is built here: [`KPartial`] is only the
//! shape of the `k-only` plans [`crate::cells`] builds.
//!
//! ```text
//!  one row per group:  __g0 … __g{G-1}              the group keys, of the query's types
//!                      __a{i}_n, __a{i}_s, __a{i}_q  aggregate i's count, sum, sum of squares
//!                                                    (which of them: `AggKind::parts`)
//!                      __a{i}_h{b}                   a percentile's histogram bucket b
//!                                                    (`crate::percentile`)
//!                      __a{i}_p{j}                   k-only: people in region j of aggregate i
//!                                                    (`crate::cells`)
//!                      __persons                     the group's distinct people
//!  schema metadata:    PartialMeta (JSON): dp or not, ε, per-aggregate Encoding, noise scales
//! ```
//!
//! Nodes build partials ([`crate::cells`] in `k-only` mode, [`crate::privacy`] in `dp` mode)
//! and the coordinator checks and merges them ([`crate::merge`]); both sides name columns
//! through this module. Partials are SQL-level sums and counts defined here, never
//! DataFusion's internal accumulator states (which for DISTINCT are lists of raw values).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Expr, LogicalPlan};
use serde::{Deserialize, Serialize};

use crate::rules::QueryError;

/// Name of the distinct-person count every partial group carries.
pub const PERSONS: &str = "__persons";

/// Name of group key `j` in partials.
pub(crate) fn group_name(j: usize) -> String {
    format!("__g{j}")
}

/// One column of an aggregate's share of a partial (the first three), or of the
/// coordinator's canonical form of it ([`crate::merge`] adds the rest); named
/// `__a{i}_{suffix}` by `part_name`. Which parts a partial carries for an aggregate is
/// `AggKind::parts` ([`crate::query`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `n`: the rows the aggregate reads (people, for `COUNT(DISTINCT person_id)`); Int64.
    Count,
    /// `s`: the sum of its argument (after the merge, a percentile's quantile).
    Sum,
    /// `q`: the sum of its argument's squares (after the merge, a percentile's interval
    /// half-width).
    SumSquares,
    /// `v`: canonical only: the noise variance of [`Part::Count`].
    CountNoise,
    /// `w`: canonical only: the noise variance of the centred [`Part::Sum`].
    SumNoise,
    /// `u`: canonical only: the noise variance of the centred [`Part::SumSquares`].
    SumSquaresNoise,
    /// `x`: canonical only: how many nodes withheld their part of the cell; Int64.
    Withheld,
}

impl Part {
    /// The parts of a cell's value: what is summed, withheld or NULLed together.
    pub const VALUES: [Part; 3] = [Part::Count, Part::Sum, Part::SumSquares];
    /// The values and their noise variances.
    pub const VALUES_AND_NOISE: [Part; 6] = [
        Part::Count,
        Part::Sum,
        Part::SumSquares,
        Part::CountNoise,
        Part::SumNoise,
        Part::SumSquaresNoise,
    ];

    /// The letter that ends its column name (on the wire: never changes).
    pub const fn suffix(self) -> char {
        match self {
            Part::Count => 'n',
            Part::Sum => 's',
            Part::SumSquares => 'q',
            Part::CountNoise => 'v',
            Part::SumNoise => 'w',
            Part::SumSquaresNoise => 'u',
            Part::Withheld => 'x',
        }
    }

    /// Whether a partial carries it as a count (Int64) rather than any number.
    pub fn is_count(self) -> bool {
        matches!(self, Part::Count | Part::Withheld)
    }
}

/// Name of part `part` of aggregate `i`: `__a{i}_n`, `__a{i}_s`, ….
pub(crate) fn part_name(i: usize, part: Part) -> String {
    format!("__a{i}_{}", part.suffix())
}

/// The aggregate `func(arg)`, `DISTINCT` or not, with its `FILTER`.
pub(crate) fn agg(
    func: Arc<datafusion::logical_expr::AggregateUDF>,
    arg: Expr,
    distinct: bool,
    filter: Option<Box<Expr>>,
) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        func,
        vec![arg],
        distinct,
        filter,
        vec![],
        None,
    ))
}

/// `SUM(x)`, no filter.
pub(crate) fn sum(x: Expr) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        sum_udaf(),
        vec![x],
        false,
        None,
        vec![],
        None,
    ))
}

/// How a node encoded one aggregate's partial sums: values were (x − center)·scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// The centre subtracted from every clamped value.
    pub center: f64,
    /// The fixed-point factor (1 for integers).
    pub scale: f64,
}

/// What a node says about its partial; travels as JSON in the Arrow schema metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialMeta {
    /// Whether the node added noise (differential-privacy mode).
    pub dp: bool,
    /// Whether the node released every group of the query's public key set (no partition
    /// selection; see [`crate::keyset`]).
    #[serde(default)]
    pub public_keys: bool,
    /// ε the node spent on this query.
    pub epsilon: Option<f64>,
    /// One per aggregate of the query.
    pub encodings: Vec<Encoding>,
    /// Noise scale of each noised column.
    pub scales: BTreeMap<String, f64>,
    /// The noise variance of each column relative to one draw at its scale: 1 for a node's
    /// own noise, 1/h for a noise share shaped for h honest nodes, and their sum for the
    /// secure-aggregated sum of several nodes' partials.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub variance_factor: f64,
}

fn one() -> f64 {
    1.0
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// One node's partial, as received by the coordinator.
#[derive(Debug, Clone)]
pub struct Partial {
    /// Its batches.
    pub batches: Vec<RecordBatch>,
    /// Its metadata.
    pub meta: PartialMeta,
}

/// A node's `k-only` partial plans (built by [`crate::cells`]), with the same output schema: groups, the aggregates'
/// partial sums and counts, one people count per region, and the group's people count.
#[derive(Debug, Clone)]
pub struct KPartial {
    /// Distinct people per region and group (exact).
    pub exact: LogicalPlan,
    /// Rows per region and group in place of people: the input of
    /// [`lower_bounds`](crate::cells::lower_bounds).
    pub counting_rows: LogicalPlan,
    /// The people-count columns (regions, then [`PERSONS`]).
    pub support_columns: Vec<String>,
}

/// Keeps the rows whose [`PERSONS`] count is at least `k`; returns them and how many were
/// dropped. Used by nodes (own k) and by the coordinator (federation k).
pub fn suppress(batches: &[RecordBatch], k: u64) -> Result<(Vec<RecordBatch>, u64), QueryError> {
    let mut kept = Vec::with_capacity(batches.len());
    let mut dropped = 0u64;
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    for b in batches {
        let idx = b
            .schema()
            .index_of(PERSONS)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let persons = b
            .column(idx)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| QueryError::Internal(format!("{PERSONS} is not Int64")))?;
        let mask: BooleanArray = (0..persons.len())
            .map(|r| Some(persons.is_valid(r) && persons.value(r) >= k))
            .collect();
        dropped += mask.false_count() as u64;
        kept.push(filter_record_batch(b, &mask).map_err(|e| QueryError::Internal(e.to_string()))?);
    }
    Ok((kept, dropped))
}
