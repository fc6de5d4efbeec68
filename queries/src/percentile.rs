//! Percentiles — `MEDIAN(x)`, `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY x)` and
//! `APPROX_PERCENTILE_CONT(x, p)` — answered in `dp` mode from noisy histograms over a public
//! bucket grid, one aggregate kind ([`AggKind::Percentile`]) in one module.
//!
//! ```text
//!  node:        per row: clamp(x, lo, hi) → one indicator per bucket of the measure's grid
//!                                            (schema::percentile_grid)  __a{i}_h0 … __a{i}_h{B−1}
//!               per (person, group): bucket counts; if they add up to more than R, R of
//!                                    the person's rows drawn at random (bounding::Share)
//!                                    — L1 ≤ R
//!               ≤ G groups per person → L1 sensitivity of the whole histogram G·R
//!               + discrete Laplace on every bucket at scale G·R·m/ε: the histogram is ONE of
//!                 the m statistics of the group (its buckets are disjoint)
//!  coordinator: Σ buckets over nodes → the noisy CDF (running sums) made monotone and ≥ 0
//!               by isotonic regression ([`consistent`]) → quantile at rank p·N, linear
//!               inside its bucket, read at whole units on a whole-unit grid
//!               ([`to_whole_unit`]) → 95% interval: the quantiles at ranks p·N ± 1.96·σ_rank
//! ```
//!
//! **Interval.** With per-bucket noise variance σ² (summed over the nodes) and the estimate at
//! fractional bucket position j (j whole buckets below it), the noisy CDF there minus p times
//! the noisy total is off by (1 − p)·Σ_{b<j} η_b − p·Σ_{b≥j} η_b, of variance
//! σ_rank² = σ²·((1 − p)²·j + p²·(B − j)). The interval is [Q(p·N − 1.96 σ_rank),
//! Q(p·N + 1.96 σ_rank)] read off the same noisy CDF, and is reported (like every cxfed
//! interval) as one half-width: the wider of its two sides. It covers the noiseless grid
//! quantile (about 95% before the whole-unit reading, which only widens it); the grid's own
//! resolution (values spread evenly inside a bucket) is a declared property of the answer,
//! not noise.
//!
//! **k-only** mode refuses percentiles (`CXF-Q021`): an exact percentile is one person's raw
//! value, which no k rule on counts can hide.

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Cast, Expr, col, lit, when};
use datafusion::scalar::ScalarValue;
use std::sync::Arc;

use crate::bounding::{Cap, Share, Stat};
use crate::partial::{Encoding, Part, PartialMeta, part_name, sum};
use crate::query::{AggKind, ApprovedQuery};
use crate::rules::{QueryError, Rejection, Rule};
use crate::schema;

/// The SQL names of the percentile aggregates (DataFusion's).
pub const FUNCTIONS: &[&str] = &["median", "percentile_cont", "approx_percentile_cont"];

/// The public grid of one percentile's measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// The measure.
    pub measure: String,
    /// Bucket edges e₀ < … < e_B (B buckets).
    pub edges: Vec<f64>,
    /// The measure's declared bounds: values are clamped to them, and so are the answers.
    pub bounds: (f64, f64),
}

impl Grid {
    /// Number of buckets.
    pub fn buckets(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }
}

/// Name of bucket `b` of aggregate `i` in partials.
pub fn bucket_name(i: usize, b: usize) -> String {
    format!("__a{i}_h{b}")
}

/// The value of a literal as a number, through the casts the analyzer adds.
fn literal(e: &Expr) -> Option<f64> {
    match e {
        Expr::Alias(a) => literal(&a.expr),
        Expr::Cast(c) => literal(&c.expr),
        Expr::TryCast(c) => literal(&c.expr),
        Expr::Literal(v, _) => match v.cast_to(&DataType::Float64).ok()? {
            ScalarValue::Float64(Some(x)) if x.is_finite() => Some(x),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `af` is a percentile and, if so, which: `None` for any other aggregate. Refuses
/// (CXF-Q011, at the function's name) a percentile that is not a literal in [0, 1], a
/// centroid count, and a WITHIN GROUP ordering by something else than the argument; and
/// (CXF-Q019) an argument without a public grid, in every mode. `ORDER BY
/// x DESC` asks for the (1 − p) quantile, as in DataFusion and PostgreSQL.
pub(crate) fn classify(sql: &str, af: &AggregateFunction) -> Result<Option<AggKind>, Rejection> {
    let name = af.func.name();
    if !FUNCTIONS.contains(&name) {
        return Ok(None);
    }
    let refuse = |why: String| Rejection::new(Rule::AggregateNotAllowed, why).at_word(sql, name);
    let args = &af.params.args;
    let p = match (name, args.len()) {
        ("median", 1) => 0.5,
        ("median", n) => return Err(refuse(format!("MEDIAN takes one argument, not {n}"))),
        (_, 2) => match literal(&args[1]) {
            Some(p) if (0.0..=1.0).contains(&p) => p,
            _ => {
                return Err(refuse(format!(
                    "the percentile of {name} must be a literal between 0 and 1, not {}",
                    args[1]
                )));
            }
        },
        (_, 3) => {
            return Err(refuse(format!(
                "{name} with a centroid count is not supported: cxfed answers percentiles from a public bucket grid, not a t-digest"
            )));
        }
        (_, n) => {
            return Err(refuse(format!(
                "{name} takes a value and a percentile, not {n} arguments"
            )));
        }
    };
    let p = match af.params.order_by.as_slice() {
        [] => p,
        [sort] if args.first().is_some_and(|a| strip(a) == strip(&sort.expr)) => {
            if sort.asc {
                p
            } else {
                1.0 - p
            }
        }
        _ => {
            return Err(refuse(format!(
                "{name} orders by its own argument only (WITHIN GROUP (ORDER BY x))"
            )));
        }
    };
    // A percentile is answered from its measure's grid in any mode, or not at all.
    if let Some(arg) = args.first()
        && let Err(why) = grid_of(arg)
    {
        return Err(Rejection::new(
            Rule::UnboundedArgument,
            format!("a percentile ({name}) is read from a public bucket grid: {why}"),
        )
        .at_word(sql, name));
    }
    Ok(Some(AggKind::Percentile { p }))
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        other => other,
    }
}

/// The grid of a percentile's argument: a measure (possibly cast) that the schema declares a
/// grid for ([`schema::percentile_grid`]); otherwise why not.
pub fn grid_of(arg: &Expr) -> Result<Grid, String> {
    let Expr::Column(c) = strip(arg) else {
        return Err(format!(
            "`{arg}` is an expression; a percentile reads a measure itself (wait_minutes, processing_days or a 1–5 score), whose public bucket grid the schema declares"
        ));
    };
    match (schema::percentile_grid(&c.name), schema::dp_bounds(&c.name)) {
        (Some(edges), Some(bounds)) if edges.len() >= 2 => Ok(Grid {
            measure: c.name.clone(),
            edges,
            bounds,
        }),
        _ => Err(format!(
            "`{}` has no public bucket grid in the schema (measures with one: wait_minutes, processing_days and the 1–5 scores)",
            c.name
        )),
    }
}

impl ApprovedQuery {
    /// The grid of aggregate `i` when it is a percentile of a measure that has one.
    pub fn percentile_grid(&self, i: usize) -> Option<Grid> {
        if !matches!(
            self.aggregate_kinds().get(i),
            Some(AggKind::Percentile { .. })
        ) {
            return None;
        }
        match self.aggregate().aggr_expr.get(i)?.clone().unalias() {
            Expr::AggregateFunction(af) => grid_of(af.params.args.first()?).ok(),
            _ => None,
        }
    }

    /// The aggregate whose histogram percentile `i` is read from: the first percentile of the
    /// query with the same measure and FILTER (`i` itself when none comes before it). MEDIAN
    /// and p90 of one measure share one histogram, and so one share of ε.
    pub fn histogram_of(&self, i: usize) -> Option<usize> {
        self.percentile_grid(i)?;
        let key = |j: usize| match (
            self.aggregate_kinds().get(j),
            self.aggregate()
                .aggr_expr
                .get(j)
                .map(|e| e.clone().unalias()),
        ) {
            (Some(AggKind::Percentile { .. }), Some(Expr::AggregateFunction(af))) => Some((
                af.params.args.first().map(|a| strip(a).clone()),
                af.params.filter.clone(),
            )),
            _ => None,
        };
        let mine = key(i)?;
        (0..=i).find(|&j| key(j).as_ref() == Some(&mine))
    }

    /// The bucket columns a partial carries for aggregate `i` (none when it reads another
    /// aggregate's histogram, or is no percentile).
    pub(crate) fn bucket_columns(&self, i: usize) -> Vec<String> {
        match (self.histogram_of(i), self.percentile_grid(i)) {
            (Some(j), Some(grid)) if j == i => {
                (0..grid.buckets()).map(|b| bucket_name(i, b)).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl ApprovedQuery {
    /// The `k-only` rule for percentiles (CXF-Q021, at the function's name): none is answered.
    /// An exact percentile is the raw value of some person (the median of 21 waits *is* the
    /// 11th person's wait), and a k rule on counts does not hide a value that is not a count.
    pub(crate) fn refuse_exact_percentiles(&self) -> Result<(), QueryError> {
        for (e, kind) in self
            .aggregate()
            .aggr_expr
            .iter()
            .zip(self.aggregate_kinds())
        {
            if let (AggKind::Percentile { .. }, Expr::AggregateFunction(af)) =
                (kind, e.clone().unalias())
            {
                let name = af.func.name();
                return Err(Rejection::new(
                    Rule::ExactPercentile,
                    format!(
                        "{name} is not answered in k-only mode: an exact percentile is one person's raw value, which no k rule hides; a differential-privacy federation answers it from a noisy histogram"
                    ),
                )
                .at_word(self.sql(), name)
                .into());
            }
        }
        Ok(())
    }
}

/// The pieces of the DP partial that [`crate::privacy`] assembles, in their order.
pub(crate) struct DpParts<'a> {
    /// Row-level values (`…_row`).
    pub row_exprs: &'a mut Vec<Expr>,
    /// Sums per (person, group).
    pub person_aggs: &'a mut Vec<Expr>,
    /// Capped per-person values.
    pub capped: &'a mut Vec<Expr>,
    /// Per-column caps of the bounding pass.
    pub caps: &'a mut Vec<Cap>,
    /// Joint caps of the bounding pass.
    pub shares: &'a mut Vec<Share>,
    /// Sums per group.
    pub group_aggs: &'a mut Vec<Expr>,
    /// The noised statistics.
    pub stats: &'a mut Vec<Stat>,
    /// Per-aggregate encodings.
    pub encodings: &'a mut Vec<Encoding>,
}

/// Adds percentile aggregate `i` (function `af`) to the DP partial: one count per bucket of
/// its grid, each person's buckets in a group jointly capped at R rows, the whole histogram
/// one statistic of L1 sensitivity G·R. Refuses (CXF-Q019, at the function's name) an
/// argument without a grid.
pub(crate) fn dp_parts(
    q: &ApprovedQuery,
    i: usize,
    af: &AggregateFunction,
    parts: DpParts<'_>,
    g: u64,
    r: u64,
) -> Result<(), QueryError> {
    let name = af.func.name();
    let arg = af
        .params
        .args
        .first()
        .cloned()
        .ok_or_else(|| QueryError::Internal(format!("{name} without an argument")))?;
    let grid = grid_of(&arg).map_err(|why| {
        Rejection::new(
            Rule::UnboundedArgument,
            format!("in differential-privacy mode a percentile ({name}) needs a public bucket grid: {why}"),
        )
        .at_word(q.sql(), name)
    })?;
    // Another percentile of the same measure and FILTER already releases this histogram.
    if q.histogram_of(i).is_some_and(|j| j != i) {
        parts.encodings.push(Encoding {
            center: 0.0,
            scale: 1.0,
        });
        return Ok(());
    }
    let mut cond = arg.clone().is_not_null();
    if let Some(f) = af.params.filter.clone() {
        cond = cond.and(*f);
    }
    let (lo, hi) = grid.bounds;
    let f = |v: f64| lit(ScalarValue::Float64(Some(v)));
    let x = Expr::Cast(Cast::new(Box::new(arg), DataType::Float64));
    let x = when(x.clone().lt(f(lo)), f(lo))
        .when(x.clone().gt(f(hi)), f(hi))
        .otherwise(x)?;
    let buckets = grid.buckets();
    let r_i = i64::try_from(r).map_err(|_| QueryError::Internal("R too large".into()))?;
    let first = parts.caps.len();
    let mut names = Vec::with_capacity(buckets);
    for b in 0..buckets {
        let mut inside = cond.clone();
        if b > 0 {
            inside = inside.and(x.clone().gt_eq(f(grid.edges[b])));
        }
        if b + 1 < buckets {
            inside = inside.and(x.clone().lt(f(grid.edges[b + 1])));
        }
        let h = bucket_name(i, b);
        parts.row_exprs.push(
            when(inside, lit(1i64))
                .otherwise(lit(0i64))?
                .alias(format!("{h}_row")),
        );
        parts
            .person_aggs
            .push(sum(col(format!("{h}_row"))).alias(h.clone()));
        parts.group_aggs.push(sum(col(&h)).alias(h.clone()));
        parts.caps.push(Cap { lo: 0, hi: r_i });
        names.push(h);
    }
    // The plan's form of the joint cap, ⌊h·R/Σh⌋ (same L1 bound; the bounding pass that
    // nodes run instead keeps R of the person's rows drawn at random, `Share`).
    let total = names
        .iter()
        .map(col)
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| lit(0i64));
    for h in &names {
        parts.capped.push(
            when(
                total.clone().gt(lit(r_i)),
                col(h) * lit(r_i) / total.clone(),
            )
            .otherwise(col(h))?
            .alias(h.clone()),
        );
    }
    parts.shares.push(Share {
        first,
        len: buckets,
        total: r_i,
    });
    parts.stats.push(Stat {
        names,
        sensitivity: g
            .checked_mul(r)
            .ok_or_else(|| QueryError::Internal("sensitivity overflows".into()))?,
    });
    parts.encodings.push(Encoding {
        center: 0.0,
        scale: 1.0,
    });
    Ok(())
}

/// The canonical (coordinator-side) bucket columns of aggregate `i`.
pub(crate) fn canonical_fields(q: &ApprovedQuery, i: usize) -> Vec<Field> {
    q.bucket_columns(i)
        .into_iter()
        .map(|b| Field::new(b, DataType::Int64, true))
        .collect()
}

/// Normalizes one node's percentile aggregate `i` into the canonical columns, in their order:
/// n = Σ buckets, s and q (filled after the merge: the quantile and its interval half-width),
/// v = the noise variance of *one* bucket, w = u = 0, x = 0 (a DP node never withholds a
/// cell), then the buckets.
pub(crate) fn normalize(
    q: &ApprovedQuery,
    batch: &RecordBatch,
    i: usize,
    grid: &Grid,
    meta: &PartialMeta,
    columns: &mut Vec<ArrayRef>,
) -> Result<(), QueryError> {
    let rows = batch.num_rows();
    let src = q.histogram_of(i).unwrap_or(i);
    let mut buckets = Vec::with_capacity(grid.buckets());
    for b in 0..grid.buckets() {
        let name = bucket_name(src, b);
        let a = batch
            .column_by_name(&name)
            .and_then(|a| a.as_any().downcast_ref::<Int64Array>().cloned())
            .ok_or_else(|| QueryError::Internal(format!("{name} missing or not Int64")))?;
        buckets.push(a);
    }
    let n: Int64Array = (0..rows)
        .map(|r| {
            buckets.iter().try_fold(0i64, |acc, a| {
                if a.is_valid(r) {
                    acc.checked_add(a.value(r))
                } else {
                    None
                }
            })
        })
        .collect();
    let var = crate::dp::variance(
        meta.scales
            .get(&bucket_name(src, 0))
            .copied()
            .unwrap_or(0.0),
    );
    let zeros = || Arc::new(Float64Array::from(vec![0.0; rows])) as ArrayRef;
    columns.push(Arc::new(n));
    columns.push(zeros());
    columns.push(zeros());
    columns.push(Arc::new(Float64Array::from(vec![var; rows])));
    columns.push(zeros());
    columns.push(zeros());
    columns.push(Arc::new(Int64Array::from(vec![0i64; rows])));
    if src == i {
        columns.extend(buckets.into_iter().map(|a| Arc::new(a) as ArrayRef));
    }
    Ok(())
}

/// A released percentile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The quantile, in the measure's units.
    pub value: f64,
    /// Low end of its 95% interval.
    pub lo: f64,
    /// High end of its 95% interval.
    pub hi: f64,
}

/// The smallest x at which the piecewise-linear CDF of `counts` (clamped at 0) over `edges`
/// reaches `t`; `None` when the counts add up to nothing.
pub fn invert(counts: &[f64], edges: &[f64], t: f64) -> Option<f64> {
    let mut cum = 0.0;
    let mut last = None;
    for (b, c) in counts.iter().map(|c| c.max(0.0)).enumerate() {
        let (lo, hi) = (*edges.get(b)?, *edges.get(b + 1)?);
        if c > 0.0 {
            if cum + c >= t {
                let frac = ((t - cum) / c).clamp(0.0, 1.0);
                return Some(lo + frac * (hi - lo));
            }
            last = Some(hi);
        }
        cum += c;
    }
    last
}

/// Noisy bucket counts made consistent: the noisy CDF (their running sums, from 0 at the
/// lowest edge) is fitted by the closest non-decreasing sequence in least squares (pool
/// adjacent violators, the first point pinned at 0), and its steps, each ≥ 0, are the counts.
/// Unlike clamping each bucket at 0 on its own, this adds no phantom people to the long run of
/// empty buckets in a tail (each would keep its positive noise), which pushes upper quantiles
/// out. Pure post-processing: no privacy cost.
pub fn consistent(counts: &[f64]) -> Vec<f64> {
    // (value, weight, points) blocks of the fit.
    let mut blocks: Vec<(f64, f64, usize)> = Vec::with_capacity(counts.len() + 1);
    let mut cum = 0.0;
    let points = std::iter::once((0.0, 1e12)).chain(counts.iter().map(|c| {
        cum += c;
        (cum, 1.0)
    }));
    for (y, w) in points {
        blocks.push((y, w, 1));
        while blocks.len() >= 2 {
            let (b, a) = (blocks[blocks.len() - 1], blocks[blocks.len() - 2]);
            if a.0 <= b.0 {
                break;
            }
            blocks.truncate(blocks.len() - 2);
            let w = a.1 + b.1;
            blocks.push(((a.0 * a.1 + b.0 * b.1) / w, w, a.2 + b.2));
        }
    }
    let fitted: Vec<f64> = blocks
        .iter()
        .flat_map(|(v, _, n)| std::iter::repeat_n(v.max(0.0), *n))
        .collect();
    fitted.windows(2).map(|w| (w[1] - w[0]).max(0.0)).collect()
}

/// Whether a grid is of a whole-unit measure: every edge halfway between two integers, so a
/// bucket holds whole values (0, 1, 6–7 …).
pub fn whole_units(edges: &[f64]) -> bool {
    edges.iter().all(|e| (e + 0.5).fract() == 0.0)
}

/// The whole value a continuous reading `x` of a whole-unit grid falls on: the bucket's values
/// spread evenly over its whole units, the smallest v whose CDF F(v + ½) reaches the rank —
/// so a median inside a run of zeros is 0, not 0.06 (a rounding error's worth below an edge
/// is taken as the edge).
pub fn to_whole_unit(x: f64) -> f64 {
    // `+ 0.0`: −0 (from a reading just below ½) becomes 0.
    (x - 0.5 - 1e-9).ceil() + 0.0
}

/// The p-quantile of noisy bucket `counts` over `edges` and its 95% interval, given the noise
/// variance of one bucket (see the module docs); clamped to `bounds`, and read at whole units
/// on a whole-unit grid ([`to_whole_unit`]) — which can only widen the interval's coverage.
pub fn estimate(
    counts: &[f64],
    edges: &[f64],
    p: f64,
    bucket_variance: f64,
    bounds: (f64, f64),
) -> Option<Estimate> {
    let e = estimate_continuous(counts, edges, p, bucket_variance, bounds)?;
    if !whole_units(edges) {
        return Some(e);
    }
    let whole = |x: f64| to_whole_unit(x).clamp(bounds.0, bounds.1);
    Some(Estimate {
        value: whole(e.value),
        lo: whole(e.lo),
        hi: whole(e.hi),
    })
}

/// [`estimate`] before reading at whole units: the continuous grid quantile.
pub fn estimate_continuous(
    counts: &[f64],
    edges: &[f64],
    p: f64,
    bucket_variance: f64,
    bounds: (f64, f64),
) -> Option<Estimate> {
    let clamped = consistent(counts);
    let total: f64 = clamped.iter().sum();
    if total.is_nan() || total <= 0.0 || edges.len() != counts.len() + 1 {
        return None;
    }
    let t = p * total;
    let value = invert(&clamped, edges, t)?;
    // Fractional bucket position of the estimate.
    let b = edges[1..]
        .iter()
        .position(|e| value < *e)
        .unwrap_or(counts.len() - 1);
    let width = edges[b + 1] - edges[b];
    let pos = b as f64
        + if width > 0.0 {
            (value - edges[b]) / width
        } else {
            0.0
        };
    let buckets = counts.len() as f64;
    let var_rank =
        bucket_variance.max(0.0) * ((1.0 - p).powi(2) * pos + p * p * (buckets - pos).max(0.0));
    let half = crate::dp::Z95 * var_rank.sqrt();
    let lo = invert(&clamped, edges, (t - half).clamp(0.0, total))?;
    let hi = invert(&clamped, edges, (t + half).clamp(0.0, total))?;
    let clamp = |x: f64| x.clamp(bounds.0, bounds.1);
    Some(Estimate {
        value: clamp(value),
        lo: clamp(lo.min(value)),
        hi: clamp(hi.max(value)),
    })
}

/// After the merge: writes each percentile's quantile into its `s` column and the half-width
/// of its 95% interval (the wider side; NULL when exact, and 0 when the whole interval sits
/// at a bound of the measure) into `q`, from the summed buckets and
/// their summed noise variance `v`. An integer-typed percentile (DataFusion types MEDIAN of an
/// integer column as that integer type) is rounded to the nearest integer.
pub(crate) fn read_quantiles(
    q: &ApprovedQuery,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, QueryError> {
    let internal = |e: String| QueryError::Internal(e);
    let n_groups = q.aggregate().group_expr.len();
    let percentiles: Vec<(usize, f64, Grid, bool)> = (0..q.aggregate_kinds().len())
        .filter_map(|i| match q.aggregate_kinds()[i] {
            AggKind::Percentile { p } => {
                let integer = q
                    .aggregate()
                    .schema
                    .fields()
                    .get(n_groups + i)
                    .is_some_and(|f| f.data_type().is_integer());
                Some((i, p, q.percentile_grid(i)?, integer))
            }
            _ => None,
        })
        .collect();
    if percentiles.is_empty() {
        return Ok(batches);
    }
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let schema = b.schema();
        let mut columns = b.columns().to_vec();
        let get_int = |name: &str| {
            b.column_by_name(name)
                .and_then(|a| a.as_any().downcast_ref::<Int64Array>().cloned())
                .ok_or_else(|| internal(format!("{name} missing after the merge")))
        };
        for (i, p, grid, integer) in &percentiles {
            let n = get_int(&part_name(*i, Part::Count))?;
            let var = b
                .column_by_name(&part_name(*i, Part::CountNoise))
                .and_then(|a| a.as_any().downcast_ref::<Float64Array>().cloned())
                .ok_or_else(|| internal(format!("{} missing", part_name(*i, Part::CountNoise))))?;
            let src = q.histogram_of(*i).unwrap_or(*i);
            let buckets: Vec<Int64Array> = (0..grid.buckets())
                .map(|k| get_int(&bucket_name(src, k)))
                .collect::<Result<_, _>>()?;
            let mut values = Vec::with_capacity(b.num_rows());
            let mut halves = Vec::with_capacity(b.num_rows());
            for r in 0..b.num_rows() {
                let counts: Option<Vec<f64>> = buckets
                    .iter()
                    .map(|a| a.is_valid(r).then(|| a.value(r) as f64))
                    .collect();
                let v = if var.is_valid(r) { var.value(r) } else { 0.0 };
                let est = match counts {
                    Some(c) if n.is_valid(r) => estimate(&c, &grid.edges, *p, v, grid.bounds),
                    _ => None,
                };
                let value = est.map(|e| if *integer { e.value.round() } else { e.value });
                values.push(value);
                // Noised: an interval, even of width 0 (all of it at a bound); exact: none.
                halves.push(
                    est.filter(|_| v > 0.0)
                        .map(|e| (e.hi - e.value).max(e.value - e.lo)),
                );
            }
            let idx = |part: Part| {
                schema
                    .index_of(&part_name(*i, part))
                    .map_err(|e| internal(e.to_string()))
            };
            columns[idx(Part::Sum)?] = Arc::new(Float64Array::from(values));
            columns[idx(Part::SumSquares)?] = Arc::new(Float64Array::from(halves));
        }
        out.push(RecordBatch::try_new(schema, columns).map_err(|e| internal(e.to_string()))?);
    }
    Ok(out)
}

/// The merge formula explain shows for percentile `i`.
pub fn merge_formula(i: usize, p: f64, grid: Option<&Grid>) -> String {
    let b = grid.map_or(0, Grid::buckets);
    format!(
        "the {p} quantile of the CDF of Σ __a{i}_h0..h{} made monotone and ≥ 0 (isotonic regression), linear inside its bucket; 95% interval: the quantiles at ranks p·N ± 1.96·σ_rank",
        b.saturating_sub(1)
    )
}

/// The (aggregate, bucket) a partial column name `__a{i}_h{b}` names, if it is a bucket.
pub fn bucket_of(name: &str) -> Option<(usize, usize)> {
    let (i, b) = name.strip_prefix("__a")?.split_once("_h")?;
    Some((i.parse().ok()?, b.parse().ok()?))
}

/// The privacy lines explain shows for percentile `i` with per-bucket noise `scale`, among
/// `m` statistics per group.
pub fn explain_lines(i: usize, name: &str, grid: &Grid, scale: Option<f64>, m: usize) -> String {
    let edges: Vec<String> = grid.edges.iter().map(|e| format!("{e}")).collect();
    let share = if m == 1 {
        "the only statistic of a group (all of ε)".to_string()
    } else {
        format!("one of the {m} statistics of a group (ε/{m})")
    };
    format!(
        "{name}: noisy counts __a{i}_h0..h{} over the public grid of {} [{}] (values clamped to {}..{}); each person's buckets in a group capped jointly at R rows, so the histogram is {share}, L1 sensitivity G·R, discrete Laplace scale {} per bucket",
        grid.buckets().saturating_sub(1),
        grid.measure,
        edges.join(", "),
        grid.bounds.0,
        grid.bounds.1,
        scale.map_or_else(|| "?".into(), |s| format!("{s}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::{Scale, SplitMix64};

    /// The oracle: the smallest x at which the pooled values' grid CDF reaches p·N, found by
    /// bisection on F(x) = #{v < e_b} + (x − e_b)/(e_{b+1} − e_b) · #{v in bucket b}, from the
    /// raw values (not from bucket counts).
    fn oracle(values: &[f64], edges: &[f64], bounds: (f64, f64), p: f64) -> f64 {
        let v: Vec<f64> = values.iter().map(|x| x.clamp(bounds.0, bounds.1)).collect();
        let last = edges.len() - 2;
        let in_bucket =
            |x: f64, b: usize| (b == 0 || x >= edges[b]) && (b == last || x < edges[b + 1]);
        let cdf = |x: f64| -> f64 {
            let mut f = 0.0;
            for b in 0..=last {
                let inside = v.iter().filter(|y| in_bucket(**y, b)).count() as f64;
                if x >= edges[b + 1] {
                    f += inside;
                } else if x > edges[b] {
                    f += inside * (x - edges[b]) / (edges[b + 1] - edges[b]);
                }
            }
            f
        };
        let t = p * v.len() as f64;
        let (mut a, mut b) = (edges[0], edges[last + 1]);
        for _ in 0..100 {
            let m = (a + b) / 2.0;
            if cdf(m) >= t - 1e-12 { b = m } else { a = m }
        }
        let b = if whole_units(edges) {
            to_whole_unit(b)
        } else {
            b
        };
        b.clamp(bounds.0, bounds.1)
    }

    fn counts(values: &[f64], grid: &Grid) -> Vec<f64> {
        let last = grid.buckets() - 1;
        let mut c = vec![0.0; grid.buckets()];
        for x in values {
            let x = x.clamp(grid.bounds.0, grid.bounds.1);
            let b = grid.edges[1..]
                .iter()
                .position(|e| x < *e)
                .unwrap_or(last)
                .min(last);
            c[b] += 1.0;
        }
        c
    }

    fn waits(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| {
                // Exponential-ish waits, mean ~20 minutes, some past the bound.
                let u = (rng.next_u64().unwrap_or(1) >> 11) as f64 / (1u64 << 53) as f64;
                (-20.0 * (1.0 - u).ln()).floor()
            })
            .collect()
    }

    use crate::dp::RandomSource;

    #[test]
    fn exact_quantiles_equal_the_pooled_oracle_on_the_grid() {
        let wait = grid_of(&col("wait_minutes")).expect("grid");
        let trust = grid_of(&col("trust")).expect("grid");
        assert_eq!(trust.edges, vec![0.5, 1.5, 2.5, 3.5, 4.5, 5.5]);
        let scores: Vec<f64> = (0..997).map(|i| ((i * 7) % 5 + 1) as f64).collect();
        for (grid, values) in [(&wait, waits(3_000, 7)), (&trust, scores)] {
            let c = counts(&values, grid);
            for p in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0] {
                let e = estimate(&c, &grid.edges, p, 0.0, grid.bounds).expect("estimate");
                let want = oracle(&values, &grid.edges, grid.bounds, p);
                assert!(
                    (e.value - want).abs() < 1e-6,
                    "{} p{p}: {} vs {want}",
                    grid.measure,
                    e.value
                );
                assert_eq!((e.lo, e.hi), (e.value, e.value), "no noise, no interval");
            }
        }
        // Nothing counted: no answer.
        assert_eq!(
            estimate(&[0.0, -3.0], &[0.0, 1.0, 2.0], 0.5, 1.0, (0.0, 2.0)),
            None
        );
    }

    /// Over many seeded noisy draws (3 nodes, ε = 1 shared by 3 statistics, one person one
    /// row), the 95% interval of the continuous grid quantile covers the noiseless one about 95%
    /// of the time; the released whole-minute reading, and its one half-width, at least that.
    type Estimator = fn(&[f64], &[f64], f64, f64, (f64, f64)) -> Option<Estimate>;

    #[test]
    fn intervals_cover_the_noiseless_quantile_about_95_percent() {
        let grid = grid_of(&col("wait_minutes")).expect("grid");
        let scale = Scale::for_epsilon(3, 1.0).expect("scale");
        let var = 3.0 * crate::dp::variance(scale.value());
        let mut rng = SplitMix64(2026);
        let inside = |e: &Estimate, truth: f64| e.lo - 1e-9 <= truth && truth <= e.hi + 1e-9;
        for (n, p) in [
            (300, 0.5),
            (300, 0.9),
            (2_000, 0.5),
            (2_000, 0.9),
            (100, 0.5),
        ] {
            let draws = 2_000;
            let (mut continuous, mut released, mut half_width) = (0, 0, 0);
            for d in 0..draws {
                let values = waits(n, 1_000 + d);
                let c = counts(&values, &grid);
                let exact = |f: Estimator| {
                    f(&c, &grid.edges, p, 0.0, grid.bounds)
                        .expect("truth")
                        .value
                };
                let (truth_c, truth) = (exact(estimate_continuous), exact(estimate));
                let noisy: Vec<f64> = c
                    .iter()
                    .map(|x| {
                        let e: i64 = (0..3).map(|_| scale.sample(&mut rng).expect("rng")).sum();
                        x + e as f64
                    })
                    .collect();
                // No answer (the noisy CDF fits to nobody) counts as not covered.
                let (Some(ec), Some(e)) = (
                    estimate_continuous(&noisy, &grid.edges, p, var, grid.bounds),
                    estimate(&noisy, &grid.edges, p, var, grid.bounds),
                ) else {
                    continue;
                };
                continuous += usize::from(inside(&ec, truth_c));
                released += usize::from(inside(&e, truth));
                // As cxfed releases it: one half-width (the wider side) around the value.
                let h = (e.hi - e.value).max(e.value - e.lo);
                half_width += usize::from((truth - e.value).abs() <= h + 1e-9);
            }
            let rate = |k: usize| k as f64 / draws as f64;
            let (c, r, h) = (rate(continuous), rate(released), rate(half_width));
            eprintln!(
                "n {n} p {p}: continuous [lo, hi] covers {c:.3}; released whole minutes [lo, hi] {r:.3}, ± half-width {h:.3}"
            );
            assert!(
                (0.92..=0.98).contains(&c),
                "n {n} p {p}: continuous covers {c}"
            );
            assert!(
                r >= 0.94 && h >= r,
                "n {n} p {p}: released covers {r}, ± {h}"
            );
        }
    }

    /// One node's DP partial for `sql` over `rows`, noise off, by the path nodes run (row
    /// values + [`crate::bounding::Bounder`]), and the DP plan's own output (the same when no
    /// person has more than R rows in a group: then nothing is sampled).
    async fn node_partial(
        sql: &str,
        rows: RecordBatch,
        params: &crate::privacy::DpParams,
    ) -> (crate::partial::Partial, Vec<RecordBatch>) {
        use futures::StreamExt;
        let ctx = crate::testdata::context(vec![], vec![rows]);
        let q = crate::validate::approve(&ctx.state(), sql)
            .await
            .expect("approve");
        let dp = q.dp_partial(params).expect("dp partial");
        let reference = ctx
            .execute_logical_plan(dp.plan.clone())
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let mut stream = ctx
            .execute_logical_plan(dp.rows.clone())
            .await
            .expect("rows")
            .execute_stream()
            .await
            .expect("stream");
        let mut b = crate::bounding::Bounder::new(Arc::clone(&dp.bounding));
        while let Some(batch) = stream.next().await {
            b.push(&batch.expect("batch")).expect("push");
        }
        let bounded = b.finish(&mut SplitMix64(3)).expect("finish");
        let text = |bs: &[RecordBatch]| {
            let mut out: Vec<String> = Vec::new();
            for b in bs {
                for r in 0..b.num_rows() {
                    let cells: Vec<String> = b
                        .columns()
                        .iter()
                        .map(|c| arrow::util::display::array_value_to_string(c, r).expect("cell"))
                        .collect();
                    out.push(cells.join("|"));
                }
            }
            out.sort();
            out
        };
        if params.max_rows_per_person >= 100 || !sql.contains("heavy") {
            assert_eq!(
                text(&reference),
                text(std::slice::from_ref(&bounded)),
                "plan = bounding"
            );
        }
        let mut meta = dp.meta.clone();
        // Noise off: nothing added, so no variance either.
        meta.scales.values_mut().for_each(|v| *v = 0.0);
        (
            crate::partial::Partial {
                batches: vec![bounded],
                meta,
            },
            reference,
        )
    }

    /// Shard `s`: 400 people, one case each, over three channels; waits spread over 0..300
    /// (past the bound of 240), one in 13 missing.
    fn shard(s: usize) -> (RecordBatch, Vec<(String, Option<f64>)>) {
        use crate::testdata::{all, batch};
        let n = 400;
        let channels = ["phone", "website", "in_person"];
        let people: Vec<String> = (0..n).map(|j| format!("p{s}-{j}")).collect();
        let cases: Vec<String> = (0..n).map(|j| format!("c{s}-{j}")).collect();
        let chan: Vec<&str> = (0..n).map(|j| channels[(j * 7 + s) % 3]).collect();
        let waits: Vec<Option<String>> = (0..n)
            .map(|j| (j % 13 != 5).then(|| ((j * j * 31 + s * 17) % 97 * (1 + j % 4)).to_string()))
            .collect();
        let people_ref: Vec<&str> = people.iter().map(String::as_str).collect();
        let cases_ref: Vec<&str> = cases.iter().map(String::as_str).collect();
        let b = batch(
            crate::schema::Table::Operational,
            &[
                ("person_id", all(&people_ref)),
                ("case_id", all(&cases_ref)),
                ("channel", all(&chan)),
                ("wait_minutes", waits.iter().map(|w| w.as_deref()).collect()),
            ],
        );
        let truth = (0..n)
            .map(|j| {
                (
                    chan[j].to_string(),
                    waits[j].as_deref().and_then(|w| w.parse::<f64>().ok()),
                )
            })
            .collect();
        (b, truth)
    }

    #[tokio::test]
    async fn three_nodes_without_noise_merge_to_the_pooled_oracle() {
        use arrow::array::StringArray;
        let sql = "SELECT channel, MEDIAN(wait_minutes) AS m, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY CAST(wait_minutes AS DOUBLE)) AS p90, APPROX_PERCENTILE_CONT(CAST(wait_minutes AS DOUBLE), 0.25) AS p25, COUNT(*) AS n FROM operational GROUP BY channel ORDER BY channel";
        let params = crate::privacy::DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            k: 1,
        };
        let mut partials = Vec::new();
        let mut pooled: Vec<(String, Option<f64>)> = Vec::new();
        for s in 0..3 {
            let (rows, truth) = shard(s);
            partials.push(node_partial(sql, rows, &params).await.0);
            pooled.extend(truth);
        }
        let ctx = crate::context::planning_context().expect("ctx");
        let q = crate::validate::approve(&ctx.state(), sql)
            .await
            .expect("approve");
        let merged = q.merge_partials(&ctx, partials, 1).await.expect("merge");
        let grid = grid_of(&col("wait_minutes")).expect("grid");
        let mut seen = 0;
        for b in &merged.batches {
            let channel = b
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("text");
            let float = |j: usize| {
                let a = arrow::compute::cast(b.column(j), &DataType::Float64).expect("cast");
                a.as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("double")
                    .clone()
            };
            let integer = b.schema().field(1).data_type().is_integer();
            let (m, p90, p25) = (float(1), float(2), float(3));
            for r in 0..b.num_rows() {
                let values: Vec<f64> = pooled
                    .iter()
                    .filter(|(c, _)| c == channel.value(r))
                    .filter_map(|(_, w)| *w)
                    .collect();
                let want = |p| oracle(&values, &grid.edges, grid.bounds, p);
                let median = if integer {
                    want(0.5).round()
                } else {
                    want(0.5)
                };
                assert!(
                    (m.value(r) - median).abs() < 1e-6,
                    "{} median",
                    channel.value(r)
                );
                assert!(
                    (p90.value(r) - want(0.9)).abs() < 1e-6,
                    "{} p90",
                    channel.value(r)
                );
                assert!(
                    (p25.value(r) - want(0.25)).abs() < 1e-6,
                    "{} p25",
                    channel.value(r)
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 3);
        assert!(
            merged.ci95.iter().flatten().all(Option::is_none),
            "no noise, no intervals: {:?}",
            merged.ci95
        );
    }

    /// A person with many rows in a group adds at most R to its histogram, in the plan and in
    /// the bounding pass alike (`node_partial` checks they agree).
    #[tokio::test]
    async fn a_heavy_person_adds_at_most_r_to_the_histogram() {
        use crate::testdata::{all, batch};
        let mut people = vec!["heavy"; 9];
        people.extend(["a", "b"]);
        let cases: Vec<String> = (0..people.len()).map(|i| format!("c{i}")).collect();
        let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
        let waits = [
            "1", "1", "1", "50", "50", "50", "200", "200", "200", "3", "4",
        ];
        let rows = batch(
            crate::schema::Table::Operational,
            &[
                ("person_id", all(&people)),
                ("case_id", all(&cases)),
                ("channel", all(&["phone"; 11])),
                ("wait_minutes", all(&waits)),
            ],
        );
        let params = crate::privacy::DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 2,
            k: 1,
        };
        // (The SQL names no one; "heavy" only tells `node_partial` that the plan's ⌊h·R/Σh⌋
        // and the bounding pass's sample differ here.)
        let sql = "SELECT channel, MEDIAN(wait_minutes) AS heavy FROM operational GROUP BY channel";
        let buckets = grid_of(&col("wait_minutes")).expect("grid").buckets();
        let total = |b: &RecordBatch| -> Vec<i64> {
            (0..buckets)
                .map(|k| {
                    b.column_by_name(&bucket_name(0, k))
                        .expect("bucket")
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("int")
                        .value(0)
                })
                .collect()
        };
        for _ in 0..5 {
            let (partial, plan) = node_partial(sql, rows.clone(), &params).await;
            // Bounding pass: 2 of heavy's 9 rows, wherever they fall, plus a's and b's.
            let h = total(&partial.batches[0]);
            assert_eq!(h.iter().sum::<i64>(), 4, "{h:?}");
            // Buckets "1", "3", "4", 50–59, 180–209: heavy's two land in 1, 50–59 or 180–209.
            assert_eq!(h[1] + h[15] + h[21], 2, "{h:?}");
            // The plan: 3 rows per bucket → ⌊3·2/9⌋ = 0 each; a and b: 1 each.
            assert_eq!(total(&plan[0]).iter().sum::<i64>(), 2);
        }
    }

    #[tokio::test]
    async fn k_only_refuses_every_percentile_and_dp_refuses_no_grid() {
        let ctx = crate::context::planning_context().expect("ctx");
        let sql = "SELECT channel,\n  MEDIAN(wait_minutes) FROM operational GROUP BY channel";
        let q = crate::validate::approve(&ctx.state(), sql)
            .await
            .expect("approve");
        match q.partial_plan() {
            Err(QueryError::Rejected(r)) => {
                assert_eq!(r.rule, Rule::ExactPercentile);
                assert_eq!(r.rule.code(), "CXF-Q021");
                assert_eq!(r.position.map(|p| (p.line, p.column)), Some((2, 3)));
            }
            other => panic!("{other:?}"),
        }
        for (sql, at) in [
            ("SELECT MEDIAN(wait_minutes * 2) FROM operational", 8),
            (
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY fiscal_quarter) FROM operational",
                8,
            ),
        ] {
            match crate::validate::approve(&ctx.state(), sql).await {
                Err(QueryError::Rejected(r)) => {
                    assert_eq!(r.rule, Rule::UnboundedArgument, "{sql}: {r}");
                    assert!(r.reason.contains("grid"), "{}", r.reason);
                    assert_eq!(r.position.map(|p| p.column), Some(at), "{sql}");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn explain_shows_the_grid_and_the_epsilon_split() {
        let ctx = crate::context::planning_context().expect("ctx");
        let params = crate::privacy::DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            k: 10,
        };
        let keys = crate::keyset::PublicKeys::schema_only();
        let explain = |sql: &'static str| {
            let state = ctx.state();
            let dp = crate::explain::DpContext {
                params: &params,
                public_keys: &keys,
                max_groups: 10_000,
                secure_aggregation: true,
            };
            async move {
                crate::explain::explain_with(&state, sql, 10, 10, Some(dp))
                    .await
                    .expect("explain")
                    .to_string()
            }
        };
        // Channels are public (no person count released): the count and one histogram, which
        // the median and the p90 of waits share; each bucket at scale G·R·2/ε = 2.
        let e = explain("SELECT channel, COUNT(*) AS n, MEDIAN(wait_minutes) AS m, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes) AS p90 FROM operational GROUP BY channel").await;
        assert!(e.contains("one of the 2 statistics"), "{e}");
        assert!(e.contains("-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 7.5"), "{e}");
        assert!(e.contains("scale 2 per bucket"), "{e}");
        assert!(
            e.contains("read off the histogram of median(operational.wait_minutes)"),
            "{e}"
        );
        assert!(!e.contains("Σ __a2_h0"), "{e}");
        assert!(!e.contains("__a2_h0"), "{e}");
        // Another FILTER is another histogram: three statistics.
        let e = explain("SELECT channel, COUNT(*) AS n, MEDIAN(wait_minutes) AS m, MEDIAN(wait_minutes) FILTER (WHERE outcome = 'approved') AS ma FROM operational GROUP BY channel").await;
        assert!(e.contains("one of the 3 statistics"), "{e}");
        assert!(e.contains("__a2_h0..h23: 3 each"), "{e}");
    }

    /// A peer's partial whose buckets are missing, renamed or not integers is refused by the
    /// merge with an error, never a panic or a number.
    #[tokio::test]
    async fn malformed_bucket_columns_are_refused_by_the_merge() {
        let sql = "SELECT channel, MEDIAN(wait_minutes) FROM operational GROUP BY channel";
        let params = crate::privacy::DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            k: 1,
        };
        let (good, _) = node_partial(sql, shard(0).0, &params).await;
        let ctx = crate::context::planning_context().expect("ctx");
        let q = crate::validate::approve(&ctx.state(), sql)
            .await
            .expect("approve");
        let b = &good.batches[0];
        let h3 = b.schema().index_of(&bucket_name(0, 3)).expect("bucket");
        let as_float = |b: &RecordBatch| {
            let mut fields: Vec<Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields[h3] = Field::new(bucket_name(0, 3), DataType::Float64, false);
            let mut columns = b.columns().to_vec();
            columns[h3] = arrow::compute::cast(&columns[h3], &DataType::Float64).expect("cast");
            RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
                .expect("batch")
        };
        let renamed = |b: &RecordBatch| {
            let mut fields: Vec<Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields[h3] = Field::new("__a0_h99", DataType::Int64, false);
            RecordBatch::try_new(
                Arc::new(arrow::datatypes::Schema::new(fields)),
                b.columns().to_vec(),
            )
            .expect("batch")
        };
        let dropped = |b: &RecordBatch| {
            let mut b = b.clone();
            b.remove_column(h3);
            b
        };
        for bad in [as_float(b), renamed(b), dropped(b)] {
            let partial = crate::partial::Partial {
                batches: vec![bad],
                meta: good.meta.clone(),
            };
            let r = q.merge_partials(&ctx, vec![good.clone(), partial], 1).await;
            assert!(matches!(r, Err(QueryError::Internal(_))), "{r:?}");
        }
    }

    #[test]
    fn whole_unit_readings_are_never_negative_zero() {
        assert_eq!(to_whole_unit(0.2).to_string(), "0");
        assert_eq!(to_whole_unit(0.5).to_string(), "0");
        assert_eq!(to_whole_unit(0.51), 1.0);
        assert_eq!(to_whole_unit(15.5 + 1e-12), 15.0);
    }

    #[test]
    fn arguments_without_a_grid_are_named() {
        let e = grid_of(&(col("wait_minutes") + lit(1))).expect_err("expression");
        assert!(e.contains("expression"), "{e}");
        let e = grid_of(&col("channel")).expect_err("dimension");
        assert!(e.contains("no public bucket grid"), "{e}");
    }

    #[test]
    fn the_joint_cap_keeps_a_persons_histogram_within_r() {
        let share = Share {
            first: 0,
            len: 3,
            total: 2,
        };
        let mut rng = SplitMix64(9);
        let mut seen = [0i64; 3];
        for _ in 0..3_000 {
            let mut v = [5, 3, 2];
            share.apply(&mut v, &mut rng).expect("apply");
            assert_eq!(v.iter().sum::<i64>(), 2, "{v:?}");
            assert!(
                v.iter()
                    .zip([5, 3, 2])
                    .all(|(k, had)| (0..=had).contains(k)),
                "{v:?}"
            );
            seen.iter_mut().zip(v).for_each(|(s, k)| *s += k);
        }
        // A uniform sample of the 10 rows: 2 · 5/10, 2 · 3/10, 2 · 2/10 per draw.
        for (s, want) in seen.iter().zip([3_000.0, 1_800.0, 1_200.0]) {
            assert!((*s as f64 - want).abs() < 0.08 * want, "{seen:?}");
        }
        let mut v = [1, 1, 0];
        share.apply(&mut v, &mut rng).expect("apply");
        assert_eq!(v, [1, 1, 0]);
    }
}
