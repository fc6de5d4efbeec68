//! The differentially private partial plan a node runs in `dp` mode, and the noise it adds
//! before anything leaves it.
//!
//! ```text
//!  rows ─▶ per row: group keys, person, clamp(x, lo, hi) − c (fixed point ×F), indicators
//!       ─▶ GROUP BY keys, person            per-person sums, capped at R rows' worth
//!       ─▶ keep ≤ G groups per person       (random choice, ROW_NUMBER over person)
//!       ─▶ GROUP BY keys                    persons, Σn, Σs, Σs²  (integers)
//!       ─▶ + discrete Laplace noise on every value, calibrated to Δ·m/ε
//!       ─▶ release a group only if its noisy person count ≥ τ(ε, δ, k)
//! ```
//!
//! One person changes at most G groups, and in each at most: the person count by 1, a count by
//! R, a centred sum by R·h, a sum of squares by R·h² (h = half the declared range, ×F), a
//! percentile's histogram by R in all its buckets together ([`crate::percentile`]). The ε
//! of the query is split evenly over the m statistics each group releases (a histogram is
//! one), so the whole release is ε-DP for the counts and sums, and (ε, δ)-DP with partition
//! selection.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use datafusion::functions::math::expr_fn::random;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    BinaryExpr, Case, Cast, Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, Operator,
    TryCast, col, lit, when,
};
use datafusion::scalar::ScalarValue;
use serde::{Deserialize, Serialize};

use crate::bounding::Stat;
use crate::bounding::{BoundingSpec, Cap, Mean};
use crate::dp::{RandomSource, Scale, partition_threshold};
use crate::keyset::{GroupKeys, KeySet};
use crate::partial::{Encoding, PERSONS, Part, PartialMeta, group_name, part_name, sum};
use crate::query::{AggKind, ApprovedQuery};
use crate::rules::{QueryError, Rejection, Rule};
use crate::schema;

/// Fixed-point factor for arguments that are not integers.
pub const FIXED_POINT: f64 = 1_000.0;

/// A node's differential-privacy parameters for one query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpParams {
    /// ε spent by this query on this node.
    pub epsilon: f64,
    /// δ for partition selection.
    pub delta: f64,
    /// Groups one person may contribute to (G).
    pub max_groups_per_person: u64,
    /// Rows one person may contribute to one group (R).
    pub max_rows_per_person: u64,
    /// The node's k: τ is never below it.
    pub k: u64,
}

/// A node's DP partial: the plan to run and how to noise its output.
#[derive(Debug, Clone)]
pub struct DpPartial {
    /// The plan (integer columns, no noise yet): the definition of the partial, shown by
    /// explain. Nodes run the equivalent [`DpPartial::rows`] + [`DpPartial::bounding`].
    pub plan: LogicalPlan,
    /// The row-level part of [`DpPartial::plan`]: group keys, person, and each statistic's
    /// value per row, before any per-person step.
    pub rows: LogicalPlan,
    /// The per-person steps of [`DpPartial::plan`] (sum per person and group, keep ≤ G groups,
    /// cap, sum per group), run by [`crate::bounding::Bounder`] over [`DpPartial::rows`].
    pub bounding: Arc<BoundingSpec>,
    /// Per-column noise scales and per-aggregate encodings, sent with the partial.
    pub meta: PartialMeta,
    /// Scales of every noised column, by name.
    scales: BTreeMap<String, Scale>,
    /// Release threshold on the noisy person count (partition selection; unused when
    /// [`DpPartial::keys`] is set).
    pub threshold: f64,
    /// The public key set every group of which is released (see [`crate::keyset`]); `None`:
    /// partition selection by [`DpPartial::threshold`].
    pub keys: Option<KeySet>,
    /// The statistics each group releases, with their per-person bounds.
    stats: Vec<Stat>,
    /// ε of the query at this node.
    epsilon: f64,
    /// Noise shares shaped for this many honest nodes (secure aggregation), or `None`: this
    /// node's own full noise.
    honest: Option<u64>,
}

fn lit_f64(v: f64) -> Expr {
    lit(ScalarValue::Float64(Some(v)))
}

fn clamp(x: Expr, lo: Expr, hi: Expr) -> datafusion::error::Result<Expr> {
    when(x.clone().lt(lo.clone()), lo)
        .when(x.clone().gt(hi.clone()), hi)
        .otherwise(x)
}

/// Interval bounds of an aggregate argument, from the schema's declared ranges. `None` when an
/// expression's range cannot be bounded (it is then refused in `dp` mode).
pub fn bounds(e: &Expr) -> Option<(f64, f64)> {
    let union = |a: Option<(f64, f64)>, b: Option<(f64, f64)>| match (a, b) {
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
        (x, None) | (None, x) => x,
    };
    match e {
        Expr::Alias(a) => bounds(&a.expr),
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => bounds(expr),
        Expr::Column(c) => schema::dp_bounds(&c.name),
        Expr::Literal(v, _) if v.is_null() => None,
        Expr::Literal(v, _) => {
            let f = match v {
                ScalarValue::Boolean(Some(b)) => f64::from(u8::from(*b)),
                other => other
                    .cast_to(&arrow::datatypes::DataType::Float64)
                    .ok()
                    .and_then(|s| match s {
                        ScalarValue::Float64(Some(f)) if f.is_finite() => Some(f),
                        _ => None,
                    })?,
            };
            Some((f, f))
        }
        Expr::Negative(x) => bounds(x).map(|(lo, hi)| (-hi, -lo)),
        Expr::Case(Case {
            when_then_expr,
            else_expr,
            ..
        }) => {
            // NULL branches add no value; every other branch must be bounded.
            let mut out: Option<(f64, f64)> = None;
            for (_, then) in when_then_expr {
                if matches!(then.as_ref(), Expr::Literal(v, _) if v.is_null()) {
                    continue;
                }
                out = union(out, Some(bounds(then)?));
            }
            match else_expr {
                Some(x) if !matches!(x.as_ref(), Expr::Literal(v, _) if v.is_null()) => {
                    union(out, Some(bounds(x)?))
                }
                _ => out,
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (a, b) = (bounds(left)?, bounds(right)?);
            let r = match op {
                Operator::Plus => (a.0 + b.0, a.1 + b.1),
                Operator::Minus => (a.0 - b.1, a.1 - b.0),
                Operator::Multiply => {
                    let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                    (
                        p.iter().copied().fold(f64::INFINITY, f64::min),
                        p.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    )
                }
                Operator::Divide if b.0 == b.1 && b.0 != 0.0 => {
                    let (x, y) = (a.0 / b.0, a.1 / b.0);
                    (x.min(y), x.max(y))
                }
                _ => return None,
            };
            (r.0.is_finite() && r.1.is_finite()).then_some(r)
        }
        Expr::ScalarFunction(f) => match (f.func.name(), f.args.as_slice()) {
            ("abs", [x]) => bounds(x).map(|(lo, hi)| {
                if lo >= 0.0 {
                    (lo, hi)
                } else if hi <= 0.0 {
                    (-hi, -lo)
                } else {
                    (0.0, hi.max(-lo))
                }
            }),
            ("round" | "floor" | "ceil" | "trunc", [x, ..]) => {
                bounds(x).map(|(lo, hi)| (lo.floor(), hi.ceil()))
            }
            ("coalesce", args) => args
                .iter()
                .try_fold(None, |acc, a| Some(union(acc, Some(bounds(a)?))))?,
            ("greatest" | "least", args) if !args.is_empty() => {
                let all: Option<Vec<(f64, f64)>> = args.iter().map(bounds).collect();
                let all = all?;
                let pick = |f: fn(f64, f64) -> f64, xs: &mut dyn Iterator<Item = f64>| xs.reduce(f);
                if f.func.name() == "greatest" {
                    Some((
                        pick(f64::max, &mut all.iter().map(|b| b.0))?,
                        pick(f64::max, &mut all.iter().map(|b| b.1))?,
                    ))
                } else {
                    Some((
                        pick(f64::min, &mut all.iter().map(|b| b.0))?,
                        pick(f64::min, &mut all.iter().map(|b| b.1))?,
                    ))
                }
            }
            _ => None,
        },
        _ => None,
    }
}

/// Largest per-person bound on a sum of squares, R·h² (and on a sum, R·h), in fixed-point
/// units: with it no partial sum overflows `i64` for fewer than 2^32 people in a group (a row's
/// square is at most 2^31, a group's sum at most 2^32 · 2^31).
pub const MAX_PERSON_BOUND: u64 = 1 << 31;

/// The fixed-point factor F for an argument and its half-range h = ⌈(hi − lo)/2 · F⌉: F = 1 for
/// integer-typed arguments with integral bounds and centre, else the largest of 1000, 100, 10,
/// 1 for which one person's bound (R·h for sums, R·h² for spreads) stays within
/// [`MAX_PERSON_BOUND`]. An error says why no factor fits.
fn fixed_point(
    arg: &Expr,
    schema: &datafusion::common::DFSchema,
    (lo, hi): (f64, f64),
    r: u64,
    spread: bool,
) -> Result<(f64, u64), String> {
    let center = (lo + hi) / 2.0;
    let integral = integer_valued(arg, schema)
        && lo.fract() == 0.0
        && hi.fract() == 0.0
        && center.fract() == 0.0;
    let candidates: &[f64] = if integral {
        &[1.0]
    } else {
        &[FIXED_POINT, 100.0, 10.0, 1.0]
    };
    for &factor in candidates {
        let half = ((hi - lo) / 2.0 * factor).ceil().max(1.0);
        if !half.is_finite() || half > MAX_PERSON_BOUND as f64 {
            continue;
        }
        let half = half as u64;
        let bound = if spread {
            half.checked_mul(half).and_then(|x| x.checked_mul(r))
        } else {
            half.checked_mul(r)
        };
        if bound.is_some_and(|b| b <= MAX_PERSON_BOUND) {
            return Ok((factor, half));
        }
    }
    Err(format!(
        "too wide a range for exact noise (one person's {} would exceed 2^31); narrow it, e.g. by dividing by a constant",
        if spread { "sum of squares" } else { "sum" }
    ))
}

/// Whether `e` only takes integer values (an integer or boolean column or literal, or casts,
/// sums, products, negations, CASE branches and whole-number roundings of such), even when
/// its type is a float (AVG's argument is cast to DOUBLE).
fn integer_valued(e: &Expr, schema: &datafusion::common::DFSchema) -> bool {
    use datafusion::logical_expr::ExprSchemable;
    let int_type = |t: &arrow::datatypes::DataType| {
        t.is_integer() || *t == arrow::datatypes::DataType::Boolean
    };
    match e {
        Expr::Alias(a) => integer_valued(&a.expr, schema),
        Expr::Column(_) => e.get_type(schema).is_ok_and(|t| int_type(&t)),
        Expr::Literal(v, _) => int_type(&v.data_type()),
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => {
            integer_valued(expr, schema)
        }
        Expr::Negative(x) => integer_valued(x, schema),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply)
                && integer_valued(left, schema)
                && integer_valued(right, schema)
        }
        Expr::Case(Case {
            when_then_expr,
            else_expr,
            ..
        }) => {
            when_then_expr
                .iter()
                .all(|(_, t)| integer_valued(t, schema))
                && else_expr.as_ref().is_none_or(|x| integer_valued(x, schema))
        }
        Expr::ScalarFunction(f) => match (f.func.name(), f.args.as_slice()) {
            ("floor" | "ceil" | "round" | "trunc", [_]) => true,
            ("abs" | "greatest" | "least" | "coalesce", args) => {
                args.iter().all(|a| integer_valued(a, schema))
            }
            _ => false,
        },
        _ => false,
    }
}

/// The product of `factors`, or an internal error if it overflows (it cannot with the bounds
/// [`fixed_point`] enforces and the configured limits on G and R).
fn checked(factors: &[u64]) -> Result<u64, QueryError> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| QueryError::Internal(format!("sensitivity {factors:?} overflows")))
}

impl ApprovedQuery {
    /// Declared bounds of aggregate `i`'s argument, when it has them.
    pub(crate) fn argument_bounds(&self, i: usize) -> Option<(f64, f64)> {
        match self.aggregate().aggr_expr.get(i)?.clone().unalias() {
            Expr::AggregateFunction(af) => bounds(af.params.args.first()?),
            _ => None,
        }
    }

    /// Builds the DP partial plan for this query with `params`.
    pub fn dp_partial(&self, params: &DpParams) -> Result<DpPartial, QueryError> {
        let g = params.max_groups_per_person.max(1);
        let r = params.max_rows_per_person.max(1);
        let input = LogicalPlanBuilder::from(Arc::clone(&self.aggregate().input));
        let n_groups = self.aggregate().group_expr.len();
        let mut row_exprs: Vec<Expr> = self
            .aggregate()
            .group_expr
            .iter()
            .enumerate()
            .map(|(j, e)| e.clone().unalias().alias(group_name(j)))
            .collect();
        row_exprs.push(Expr::Column(self.person().clone()).alias("__pid"));
        let mut person_aggs = Vec::new();
        let mut capped = Vec::new();
        let mut caps = Vec::new();
        let mut shares = Vec::new();
        let mut means = Vec::new();
        let mut group_aggs = Vec::new();
        let mut stats = vec![Stat {
            names: vec![PERSONS.into()],
            sensitivity: g,
        }];
        let mut encodings = Vec::new();
        for (i, (e, kind)) in self
            .aggregate()
            .aggr_expr
            .iter()
            .zip(self.aggregate_kinds())
            .enumerate()
        {
            let af = match e.clone().unalias() {
                Expr::AggregateFunction(af) => af,
                other => return Err(QueryError::Internal(format!("not an aggregate: {other}"))),
            };
            if let AggKind::Percentile { .. } = kind {
                let parts = crate::percentile::DpParts {
                    row_exprs: &mut row_exprs,
                    person_aggs: &mut person_aggs,
                    capped: &mut capped,
                    caps: &mut caps,
                    shares: &mut shares,
                    group_aggs: &mut group_aggs,
                    stats: &mut stats,
                    encodings: &mut encodings,
                };
                crate::percentile::dp_parts(self, i, &af, parts, g, r)?;
                continue;
            }
            let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
            let mut cond = arg.clone().is_not_null();
            if let Some(f) = af.params.filter.clone() {
                cond = cond.and(*f);
            }
            let n = part_name(i, Part::Count);
            row_exprs.push(
                when(cond.clone(), lit(1i64))
                    .otherwise(lit(0i64))?
                    .alias(format!("{n}_row")),
            );
            person_aggs.push(sum(col(format!("{n}_row"))).alias(n.clone()));
            let n_cap = if *kind == AggKind::CountPersons { 1 } else { r };
            let n_index = caps.len();
            capped.push(
                when(col(&n).gt(lit(n_cap as i64)), lit(n_cap as i64))
                    .otherwise(col(&n))?
                    .alias(n.clone()),
            );
            caps.push(Cap {
                lo: i64::MIN,
                hi: n_cap as i64,
            });
            group_aggs.push(sum(col(&n)).alias(n.clone()));
            stats.push(Stat {
                names: vec![n.clone()],
                sensitivity: checked(&[g, n_cap])?,
            });
            if matches!(kind, AggKind::Count | AggKind::CountPersons) {
                encodings.push(Encoding {
                    center: 0.0,
                    scale: 1.0,
                });
                continue;
            }
            let (lo, hi) = bounds(&arg).ok_or_else(|| {
                Rejection::new(
                    Rule::UnboundedArgument,
                    format!(
                        "in differential-privacy mode the argument of {} must have declared bounds (a measure, a literal, or CASE/arithmetic over them): {arg}",
                        af.func.name()
                    ),
                )
                .at_word(self.sql(), af.func.name())
            })?;
            let center = (lo + hi) / 2.0;
            let spread = matches!(kind, AggKind::Variance { .. } | AggKind::Stddev { .. });
            let (factor, half) =
                fixed_point(&arg, self.aggregate().input.schema(), (lo, hi), r, spread).map_err(
                    |why| {
                        Rejection::new(
                    Rule::UnboundedArgument,
                    format!(
                        "in differential-privacy mode the argument of {} spans {lo}..{hi}, {why}",
                        af.func.name()
                    ),
                )
                .at_word(self.sql(), af.func.name())
                    },
                )?;
            encodings.push(Encoding {
                center,
                scale: factor,
            });
            let x = Expr::Cast(Cast::new(
                Box::new(arg),
                arrow::datatypes::DataType::Float64,
            ));
            // TRY_CAST: a NaN (never expected from bounded arithmetic) becomes NULL and so adds
            // nothing, rather than failing the query on one row's value.
            let v = Expr::TryCast(TryCast::new(
                Box::new(datafusion::functions::math::expr_fn::round(vec![
                    (clamp(x, lit_f64(lo), lit_f64(hi))? - lit_f64(center)) * lit_f64(factor),
                ])),
                arrow::datatypes::DataType::Int64,
            ));
            let v = when(cond, v).otherwise(lit(0i64))?;
            let s = part_name(i, Part::Sum);
            row_exprs.push(v.clone().alias(format!("{s}_row")));
            person_aggs.push(sum(col(format!("{s}_row"))).alias(s.clone()));
            let bound = (r * half) as i64;
            // A mean's sums: a person with more than R rows adds the mean of their rows R
            // times (`bounding::Mean`; here with truncation, on nodes with unbiased rounding).
            let mean = !matches!(kind, AggKind::Sum);
            let r_i = r as i64;
            let per_r = |c: &str| -> Result<Expr, QueryError> {
                Ok(if mean {
                    when(col(&n).gt(lit(r_i)), col(c) * lit(r_i) / col(&n)).otherwise(col(c))?
                } else {
                    col(c)
                })
            };
            let s_index = caps.len();
            capped.push(clamp(per_r(&s)?, lit(-bound), lit(bound))?.alias(s.clone()));
            caps.push(Cap {
                lo: -bound,
                hi: bound,
            });
            group_aggs.push(sum(col(&s)).alias(s.clone()));
            stats.push(Stat {
                names: vec![s],
                sensitivity: checked(&[g, r, half])?,
            });
            let mut q_index = None;
            if matches!(kind, AggKind::Variance { .. } | AggKind::Stddev { .. }) {
                let q = part_name(i, Part::SumSquares);
                row_exprs.push((v.clone() * v).alias(format!("{q}_row")));
                person_aggs.push(sum(col(format!("{q}_row"))).alias(q.clone()));
                let qbound = (r * half * half) as i64;
                q_index = Some(caps.len());
                capped.push(
                    when(per_r(&q)?.gt(lit(qbound)), lit(qbound))
                        .otherwise(per_r(&q)?)?
                        .alias(q.clone()),
                );
                caps.push(Cap {
                    lo: i64::MIN,
                    hi: qbound,
                });
                group_aggs.push(sum(col(&q)).alias(q.clone()));
                stats.push(Stat {
                    names: vec![q],
                    sensitivity: checked(&[g, r, half, half])?,
                });
            }
            if mean {
                means.push(Mean {
                    count: n_index,
                    sums: std::iter::once(s_index).chain(q_index).collect(),
                    r: r_i,
                });
            }
        }
        // The person count goes last, as in the k-only partial.
        group_aggs.push(
            Expr::AggregateFunction(AggregateFunction::new_udf(
                count_udaf(),
                vec![lit(1i64)],
                false,
                None,
                vec![],
                None,
            ))
            .alias(PERSONS),
        );
        let groups: Vec<Expr> = (0..n_groups).map(|j| col(group_name(j))).collect();
        let mut person_keys = groups.clone();
        person_keys.push(col("__pid"));
        let rank = row_number()
            .partition_by(vec![col("__pid")])
            .order_by(vec![random().sort(true, false)])
            .build()?
            .alias("__rank");
        let mut keep: Vec<Expr> = groups.clone();
        keep.extend(capped);
        let rows = input.project(row_exprs)?.build()?;
        let plan = LogicalPlanBuilder::from(rows.clone())
            .aggregate(person_keys, person_aggs)?
            .window(vec![rank])?
            .filter(col("__rank").lt_eq(lit(g as i64)))?
            .project(keep)?
            .aggregate(groups, group_aggs)?
            .build()?;

        let scales = calibrate(&stats, params.epsilon)?;
        let threshold = partition_threshold(scales[PERSONS].value(), params.delta, params.k, g);
        let meta = PartialMeta {
            dp: true,
            public_keys: false,
            variance_factor: 1.0,
            epsilon: Some(params.epsilon),
            encodings,
            scales: scales.iter().map(|(k, v)| (k.clone(), v.value())).collect(),
        };
        let bounding = Arc::new(BoundingSpec {
            groups: n_groups,
            caps,
            shares,
            means,
            max_groups: g,
            output: Arc::new(plan.schema().as_arrow().clone()),
        });
        Ok(DpPartial {
            plan,
            rows,
            bounding,
            meta,
            scales,
            threshold,
            keys: None,
            stats,
            epsilon: params.epsilon,
            honest: None,
        })
    }
}

/// Noise scales for `stats`: ε split evenly over them (each group releases all of them).
fn calibrate(stats: &[Stat], epsilon: f64) -> Result<BTreeMap<String, Scale>, QueryError> {
    let m = stats.len() as u64;
    let mut scales = BTreeMap::new();
    for s in stats {
        let scale =
            Scale::for_epsilon(checked(&[s.sensitivity, m])?, epsilon).ok_or_else(|| {
                QueryError::Internal(format!("cannot calibrate noise for ε = {epsilon}"))
            })?;
        for name in &s.names {
            scales.insert(name.clone(), scale);
        }
    }
    Ok(scales)
}

impl DpPartial {
    /// Chooses how groups are released: every group of a public key set (no partition
    /// selection), or by the noisy threshold when a key depends on the data.
    ///
    /// With public keys the person count chooses nothing, so it is not released (zeros, no
    /// noise) and ε is split over the other statistics only.
    pub fn with_keys(mut self, keys: GroupKeys) -> Result<Self, QueryError> {
        let GroupKeys::Public(set) = keys else {
            return Ok(self);
        };
        self.stats.retain(|s| s.names.iter().all(|n| n != PERSONS));
        self.scales = calibrate(&self.stats, self.epsilon)?;
        self.meta.scales = self
            .scales
            .iter()
            .map(|(k, v)| (k.clone(), v.value()))
            .collect();
        self.meta.public_keys = true;
        self.keys = Some(set);
        Ok(self)
    }

    /// Makes this node add a noise *share* shaped for `honest` nodes instead of a full draw:
    /// for a partial that only leaves masked, whose sum over nodes is all anyone reads (see
    /// [`crate::noise_share`]). Only with a public key set (a dense, fixed-length partial).
    pub fn with_noise_shares(mut self, honest: u64) -> Result<Self, QueryError> {
        if self.keys.is_none() {
            return Err(QueryError::Internal(
                "noise shares need a public key set".into(),
            ));
        }
        let h = honest.max(1);
        self.honest = Some(h);
        self.meta.variance_factor = 1.0 / h as f64;
        Ok(self)
    }

    /// A digest of everything the noise depends on — scales, encodings, ε, the public key
    /// set — so that nodes adding noise shares can check they all calibrated alike.
    pub fn calibration(&self) -> Result<Vec<u8>, QueryError> {
        // Every key value in order: nodes whose dense vectors mean different groups differ.
        let keys = self.keys.as_ref().map(|k| format!("{k:?}"));
        let mut meta = self.meta.clone();
        meta.variance_factor = 1.0;
        serde_json::to_vec(&(meta, keys)).map_err(|e| QueryError::Internal(e.to_string()))
    }

    /// Adds noise to every statistic of every group. With a public key set, every group of
    /// the set is released in its canonical order (absent ones as zeros before noise, rows
    /// outside it dropped); otherwise only groups whose noisy person count reaches the
    /// threshold. The true values never leave this function.
    pub fn add_noise(
        &self,
        batches: &[RecordBatch],
        rng: &mut dyn RandomSource,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let dense;
        let batches = match &self.keys {
            Some(keys) => {
                dense = [densify(batches, keys, self.bounding.groups)?];
                &dense[..]
            }
            None => batches,
        };
        let threshold = if self.keys.is_some() {
            f64::NEG_INFINITY
        } else {
            self.threshold
        };
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let schema = b.schema();
            let mut columns: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
            let mut keep: Vec<bool> = vec![true; b.num_rows()];
            for (idx, field) in schema.fields().iter().enumerate() {
                let Some(scale) = self.scales.get(field.name()) else {
                    columns.push(Arc::clone(b.column(idx)));
                    continue;
                };
                let values = b
                    .column(idx)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .ok_or_else(|| {
                        QueryError::Internal(format!("{} is not Int64", field.name()))
                    })?;
                let mut noisy = Vec::with_capacity(values.len());
                for r in 0..values.len() {
                    if values.is_null(r) {
                        return Err(QueryError::Internal(format!("{} is null", field.name())));
                    }
                    let noise = match self.honest {
                        Some(h) => crate::noise_share::noise_share(rng, scale.t, scale.s, h.max(1)),
                        None => scale.sample(rng),
                    }
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                    noisy.push(Some(values.value(r).saturating_add(noise)));
                }
                let noisy = Int64Array::from(noisy);
                if field.name() == PERSONS {
                    for (r, k) in keep.iter_mut().enumerate() {
                        *k = noisy.value(r) as f64 >= threshold;
                    }
                }
                columns.push(Arc::new(noisy));
            }
            let noisy = RecordBatch::try_new(Arc::clone(&schema), columns)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            let mask = BooleanArray::from(keep);
            out.push(
                filter_record_batch(&noisy, &mask)
                    .map_err(|e| QueryError::Internal(e.to_string()))?,
            );
        }
        Ok(out)
    }
}

/// One batch holding every group of `keys` in canonical order: the statistics of the groups
/// `batches` hold (the first `groups` columns are the keys), zeros for the others; rows whose
/// key is not in the set are dropped.
fn densify(
    batches: &[RecordBatch],
    keys: &KeySet,
    groups: usize,
) -> Result<RecordBatch, QueryError> {
    let internal = |e: String| QueryError::Internal(e);
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => return Err(internal("no batch to release".into())),
    };
    let stats = schema.fields().len() - groups;
    let mut dense = vec![vec![0i64; keys.len()]; stats];
    for b in batches {
        let canonical: Vec<ArrayRef> = (0..groups)
            .map(|j| keys.canonical_column(j, b.column(j)))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        let values: Vec<&Int64Array> = (groups..b.num_columns())
            .map(|c| {
                b.column(c)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .ok_or_else(|| internal(format!("{} is not Int64", schema.field(c).name())))
            })
            .collect::<Result<_, _>>()?;
        for r in 0..b.num_rows() {
            let key: Vec<ScalarValue> = canonical
                .iter()
                .map(|a| ScalarValue::try_from_array(a, r))
                .collect::<Result<_, _>>()
                .map_err(|e| internal(e.to_string()))?;
            let Some(at) = keys.index_of(&key) else {
                continue;
            };
            for (s, v) in values.iter().enumerate() {
                dense[s][at] = dense[s][at].saturating_add(v.value(r));
            }
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for j in 0..groups {
        columns.push(
            keys.column(j, schema.field(j).data_type())
                .map_err(internal)?,
        );
    }
    for (s, values) in dense.into_iter().enumerate() {
        // The person count is not released under public keys (see `with_keys`).
        let released = if schema.field(groups + s).name() == PERSONS {
            vec![0; values.len()]
        } else {
            values
        };
        columns.push(Arc::new(Int64Array::from(released)));
    }
    RecordBatch::try_new(schema, columns).map_err(|e| internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;
    use crate::validate::approve;

    async fn approved(sql: &str) -> ApprovedQuery {
        let ctx = planning_context().expect("ctx");
        approve(&ctx.state(), sql).await.expect("approve")
    }

    #[tokio::test]
    async fn bounds_follow_the_schema_and_arithmetic() {
        let q = approved("SELECT AVG(trust), AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END), SUM(wait_minutes / 60.0) FROM experience e JOIN operational o ON e.case_id = o.case_id").await;
        let args: Vec<Expr> = q
            .aggregate()
            .aggr_expr
            .iter()
            .map(|e| match e.clone().unalias() {
                Expr::AggregateFunction(af) => af.params.args[0].clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(bounds(&args[0]), Some((1.0, 5.0)));
        assert_eq!(bounds(&args[1]), Some((0.0, 1.0)));
        assert_eq!(bounds(&args[2]), Some((0.0, 4.0)));
    }

    #[tokio::test]
    async fn refuses_unbounded_arguments() {
        let q = approved("SELECT SUM(CASE WHEN trust > 3 THEN wait_minutes * wait_minutes ELSE 0 END) FROM experience e JOIN operational o ON e.case_id = o.case_id").await;
        assert!(
            q.dp_partial(&params()).is_ok(),
            "products of bounded measures are bounded"
        );
        let q = approved("SELECT SUM(date_part('year', response_date)) FROM experience").await;
        match q.dp_partial(&params()) {
            Err(QueryError::Rejected(r)) => assert_eq!(r.rule, Rule::UnboundedArgument),
            other => panic!("{other:?}"),
        }
    }

    /// Runs the DP plan without noise on rows where one person has many extreme answers.
    #[tokio::test]
    async fn clamps_and_bounds_each_persons_contribution() {
        use crate::schema::Table;
        use arrow::array::{ArrayRef, Date32Array, Int8Array, StringArray};
        use datafusion::datasource::MemTable;
        use datafusion::execution::context::SessionContext;
        let rows: Vec<(&str, &str, i8)> = vec![
            ("p1", "phone", 5),
            ("p1", "phone", 5),
            ("p1", "phone", 5),
            ("p1", "email", 5),
            ("p2", "phone", 1),
            ("p3", "phone", 4),
        ];
        let n = rows.len();
        let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from(
                (0..n).map(|i| Some(f(i))).collect::<Vec<_>>(),
            ))
        };
        let score: ArrayRef = Arc::new(Int8Array::from(
            rows.iter().map(|r| Some(r.2)).collect::<Vec<_>>(),
        ));
        let columns: Vec<ArrayRef> = vec![
            text(&|i| format!("r{i}")),
            text(&|i| rows[i].0.to_string()),
            text(&|i| format!("c{i}")),
            text(&|_| "SSA".into()),
            text(&|_| "s".into()),
            text(&|_| "approaching_retirement".into()),
            text(&|_| "apply".into()),
            text(&|i| rows[i].1.to_string()),
            text(&|_| "WY".into()),
            text(&|_| "65_74".into()),
            Arc::new(Date32Array::from(vec![Some(20_000); n])),
            Arc::clone(&score),
            Arc::clone(&score),
            Arc::clone(&score),
            Arc::clone(&score),
            Arc::clone(&score),
            Arc::clone(&score),
            score,
        ];
        let batch = Table::Experience
            .complete_v1_batch(
                &RecordBatch::try_new(Table::Experience.arrow_schema_of_version(1), columns)
                    .expect("batch"),
            )
            .expect("complete");
        let ctx = SessionContext::new();
        crate::context::register_functions(&ctx);
        ctx.register_table(
            "experience",
            Arc::new(
                MemTable::try_new(Table::Experience.arrow_schema(), vec![vec![batch]])
                    .expect("mem"),
            ),
        )
        .expect("register");
        ctx.register_table(
            "operational",
            Arc::new(
                MemTable::try_new(Table::Operational.arrow_schema(), vec![vec![]]).expect("mem"),
            ),
        )
        .expect("register");
        let q = approve(
            &ctx.state(),
            "SELECT channel, COUNT(*), SUM(trust) FROM experience GROUP BY channel",
        )
        .await
        .expect("approve");
        let dp = q.dp_partial(&DpParams { k: 1, ..params() }).expect("dp");
        let out = ctx
            .execute_logical_plan(dp.plan)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let mut seen = std::collections::BTreeMap::new();
        for b in &out {
            let col = |name: &str| b.column_by_name(name).expect(name).clone();
            let ch = col("__g0");
            let ch = ch.as_any().downcast_ref::<StringArray>().expect("text");
            let get = |name: &str, r: usize| {
                col(name)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("int")
                    .value(r)
            };
            for r in 0..b.num_rows() {
                seen.insert(
                    ch.value(r).to_string(),
                    (
                        get(PERSONS, r),
                        get("__a0_n", r),
                        get("__a1_n", r),
                        get("__a1_s", r),
                    ),
                );
            }
        }
        // G = 1: p1 counts in only one of phone/email; R = 1: one row's worth each; sums are
        // centred on 3 and capped at ±2 per person.
        let total_persons: i64 = seen.values().map(|v| v.0).sum();
        assert_eq!(total_persons, 3, "{seen:?}");
        for (persons, n_count, n_sum, s) in seen.values() {
            assert_eq!(n_count, persons);
            assert_eq!(n_sum, persons);
            assert!(s.abs() <= 2 * persons);
        }
    }

    /// G = 2, R = 2: a person in three groups counts in at most two, and in each at most two
    /// rows' worth of count, centred sum and sum of squares.
    #[tokio::test]
    async fn bounds_contributions_with_several_groups_and_rows() {
        use crate::testdata::{all, batch, context};
        // p1: 3 phone, 1 email, 1 web rows, all trust 5; p2: one phone row, trust 1.
        let e = batch(
            crate::schema::Table::Experience,
            &[
                ("person_id", all(&["p1", "p1", "p1", "p1", "p1", "p2"])),
                (
                    "channel",
                    all(&["phone", "phone", "phone", "email", "website", "phone"]),
                ),
                ("trust", all(&["5", "5", "5", "5", "5", "1"])),
            ],
        );
        let ctx = context(vec![e], vec![]);
        let q = approve(
            &ctx.state(),
            "SELECT channel, COUNT(*), SUM(trust), VARIANCE(trust) FROM experience GROUP BY channel",
        )
        .await
        .expect("approve");
        let params = DpParams {
            k: 1,
            max_groups_per_person: 2,
            max_rows_per_person: 2,
            ..params()
        };
        let dp = q.dp_partial(&params).expect("dp");
        // Sensitivities: count G·R = 4; centred sum G·R·h = 8 (h = 2); squares G·R·h² = 16.
        let m = dp.meta.scales.len() as f64;
        assert_eq!(dp.meta.scales["__a0_n"], 4.0 * m);
        assert_eq!(dp.meta.scales["__a1_s"], 8.0 * m);
        assert_eq!(dp.meta.scales["__a2_q"], 16.0 * m);
        for _ in 0..5 {
            let out = ctx
                .execute_logical_plan(dp.plan.clone())
                .await
                .expect("plan")
                .collect()
                .await
                .expect("run");
            let mut p1_groups = 0;
            for b in &out {
                let get = |name: &str, r: usize| {
                    b.column_by_name(name)
                        .expect(name)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("int")
                        .value(r)
                };
                let ch = b.column_by_name("__g0").expect("channel");
                for r in 0..b.num_rows() {
                    let channel = arrow::util::display::array_value_to_string(ch, r).expect("fmt");
                    let persons = get(PERSONS, r);
                    // p1's share of this group (p2 only shops by phone: n 1, s −2, q 4).
                    let p2 = i64::from(channel == "phone");
                    let (n, s, q) = (get("__a0_n", r), get("__a1_s", r), get("__a2_q", r));
                    if persons > p2 {
                        p1_groups += 1;
                        assert!(n - p2 <= 2, "{channel}: count {n}");
                        assert!(s + 2 * p2 <= 4, "{channel}: sum {s}");
                        assert!(q - 4 * p2 <= 8, "{channel}: squares {q}");
                    }
                }
            }
            assert!((1..=2).contains(&p1_groups), "p1 in {p1_groups} groups");
        }
    }

    /// With a public key set every group is released in canonical order, absent ones from
    /// zeros, and none is dropped by the threshold however small.
    #[tokio::test]
    async fn public_keys_release_every_group_in_canonical_order() {
        use crate::keyset::PublicKeys;
        use crate::testdata::{all, batch, context};
        let e = batch(
            crate::schema::Table::Experience,
            &[
                ("person_id", all(&["p1", "p2", "p3"])),
                ("channel", all(&["website", "phone", "website"])),
                ("trust", all(&["5", "1", "4"])),
            ],
        );
        let ctx = context(vec![e], vec![]);
        let q = approve(
            &ctx.state(),
            "SELECT channel, COUNT(*), SUM(trust) FROM experience GROUP BY channel",
        )
        .await
        .expect("approve");
        let keys = q
            .group_keys_under(&PublicKeys::schema_only(), 100)
            .expect("public");
        let dp = q
            .dp_partial(&DpParams { k: 10, ..params() })
            .expect("dp")
            .with_keys(keys)
            .expect("keys");
        assert!(dp.meta.public_keys);
        // ε is split over COUNT(*)'s count and SUM's count and sum (m = 3, not 4): the
        // person count is not released.
        assert!(!dp.meta.scales.contains_key(PERSONS));
        assert_eq!(dp.meta.scales["__a0_n"], 3.0);
        let exact = ctx
            .execute_logical_plan(dp.plan.clone())
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let dense = densify(&exact, dp.keys.as_ref().expect("keys"), 1).expect("dense");
        assert_eq!(dense.num_rows(), crate::schema::CHANNELS.len());
        let channel = |r: usize| {
            arrow::util::display::array_value_to_string(dense.column(0), r).expect("fmt")
        };
        let zeros = dense
            .column_by_name(PERSONS)
            .expect("persons")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int")
            .clone();
        assert!(zeros.iter().all(|v| v == Some(0)), "persons not released");
        let persons = dense
            .column_by_name("__a0_n")
            .expect("count")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int")
            .clone();
        for (r, name) in crate::schema::CHANNELS.iter().enumerate() {
            assert_eq!(channel(r), *name);
            let want = match *name {
                "website" => 2,
                "phone" => 1,
                _ => 0,
            };
            assert_eq!(persons.value(r), want, "{name}");
        }
        // Noised: all rows stay, though every count is far below τ.
        let mut rng = crate::dp::SplitMix64(7);
        let noisy = dp.add_noise(&exact, &mut rng).expect("noise");
        let rows: usize = noisy.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, crate::schema::CHANNELS.len());
        // Partition selection drops them all at k = 10.
        let selected = q
            .dp_partial(&DpParams { k: 10, ..params() })
            .expect("dp")
            .add_noise(&exact, &mut rng)
            .expect("noise");
        assert!(selected.iter().map(|b| b.num_rows()).sum::<usize>() < 3);
    }

    #[tokio::test]
    async fn refuses_ranges_too_wide_for_exact_noise() {
        let q = approved("SELECT STDDEV(wait_minutes * 1000000) FROM operational").await;
        match q.dp_partial(&params()) {
            Err(QueryError::Rejected(r)) => {
                assert_eq!(r.rule, Rule::UnboundedArgument);
                assert!(r.reason.contains("2^31"), "{}", r.reason);
            }
            other => panic!("{other:?}"),
        }
        // A float argument over a wide range gets a coarser fixed point instead of a refusal.
        let q = approved("SELECT STDDEV(wait_minutes * 1.0) FROM operational").await;
        let dp = q.dp_partial(&params()).expect("fits with F = 100");
        assert_eq!(dp.meta.encodings[0].scale, 100.0);
    }

    fn params() -> DpParams {
        DpParams {
            epsilon: 1.0,
            delta: 1e-6,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            k: 10,
        }
    }

    #[tokio::test]
    async fn scales_follow_sensitivity_and_epsilon() {
        let q =
            approved("SELECT channel, COUNT(*), AVG(trust) FROM experience GROUP BY channel").await;
        let dp = q.dp_partial(&params()).expect("dp");
        // m = persons + count n + avg n + avg s = 4 statistics; avg s: h = 2 (1..5 centred on 3).
        assert_eq!(dp.meta.scales[PERSONS], 4.0);
        assert_eq!(dp.meta.scales["__a1_s"], 8.0);
        assert_eq!(
            dp.meta.encodings[1],
            Encoding {
                center: 3.0,
                scale: 1.0
            }
        );
        let dp2 = q
            .dp_partial(&DpParams {
                epsilon: 0.5,
                ..params()
            })
            .expect("dp");
        assert_eq!(dp2.meta.scales["__a1_s"], 16.0);
        assert!(dp.threshold > 10.0);
    }
}
