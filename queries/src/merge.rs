//! The coordinator's merge: every node's checked partials summed into the federation's
//! answer.
//!
//! ```text
//!  node:         SELECT g AS __g0.., COUNT/SUM/SUM-of-squares AS __aI_{n,s,q},
//!                       COUNT(DISTINCT person_id) AS __persons
//!                FROM <the query's FROM/JOIN/WHERE> GROUP BY g
//!                → drop groups with __persons < node k            (suppress)
//!  coordinator:  check each partial against the query          (check_partial)
//!                SUM every partial column per group              (merge)
//!                → drop groups with Σ __persons < federation k
//!                → NULL a cell some node withheld while returning its group  (incomplete)
//!                → note, per group, which nodes returned it                  (contributors)
//!                → final values (AVG = s/n, VAR = (q - s²/n)/(n-1) ...)
//!                → the query's own HAVING, SELECT, ORDER BY, LIMIT
//! ```
//!
//! The columns a partial carries are the contract of [`crate::partial`]; a node builds them in
//! [`crate::cells`] (`k-only`) or [`crate::privacy`] (`dp`). This module is above both: it
//! reads their region columns and percentile buckets, never the other way round.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;
use datafusion::functions::math::expr_fn::sqrt;
use datafusion::functions_aggregate::bit_and_or_xor::bit_or_udaf;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::{
    Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, cast, col, lit, when,
};
use datafusion::scalar::ScalarValue;

use crate::partial::{PERSONS, Part, Partial, PartialMeta, agg, group_name, part_name, suppress};
use crate::query::{AggKind, ApprovedQuery};
use crate::rules::QueryError;

impl ApprovedQuery {
    /// Checks a peer's partial (untrusted): group columns of the query's types, exactly the
    /// partial columns its aggregates need (integers or floats), and sane metadata.
    pub fn check_partial(
        &self,
        batch_schema: &SchemaRef,
        meta: &PartialMeta,
    ) -> Result<(), String> {
        let expected = self.group_fields();
        let n_groups = self.aggregate().group_expr.len();
        let mut names: Vec<String> = (0..n_groups).map(group_name).collect();
        // Whether each column after the groups is a count (Int64) or any number: the parts
        // say so themselves; a histogram's buckets are numbers, people counts are counts.
        let mut counts: Vec<bool> = Vec::new();
        for i in 0..self.aggregate_kinds().len() {
            for p in self.aggregate_kinds()[i].parts() {
                names.push(part_name(i, *p));
                counts.push(p.is_count());
            }
            let buckets = self.bucket_columns(i);
            counts.extend(buckets.iter().map(|_| false));
            names.extend(buckets);
        }
        // k-only partials carry the people in each region of each aggregate; DP partials don't.
        if !meta.dp {
            let regions: Vec<String> = self
                .region_names()
                .map_err(|e| e.to_string())?
                .into_iter()
                .flatten()
                .collect();
            counts.extend(regions.iter().map(|_| true));
            names.extend(regions);
        }
        names.push(PERSONS.to_string());
        counts.push(true);
        let fields = batch_schema.fields();
        if fields.len() != names.len() || fields.iter().zip(&names).any(|(f, n)| f.name() != n) {
            return Err(format!(
                "partial has columns {:?}, expected {names:?}",
                fields.iter().map(|f| f.name()).collect::<Vec<_>>()
            ));
        }
        for (j, f) in fields.iter().take(n_groups).enumerate() {
            if f.data_type() != expected[j].data_type() {
                return Err(format!(
                    "group column {} has type {}, expected {}",
                    f.name(),
                    f.data_type(),
                    expected[j].data_type()
                ));
            }
        }
        for (f, &is_count) in fields.iter().skip(n_groups).zip(&counts) {
            let ok = if is_count {
                *f.data_type() == DataType::Int64
            } else {
                f.data_type().is_numeric()
            };
            if !ok {
                return Err(format!(
                    "partial column {} has type {}",
                    f.name(),
                    f.data_type()
                ));
            }
        }
        if meta.encodings.len() != self.aggregate_kinds().len()
            || meta
                .encodings
                .iter()
                .any(|e| !e.center.is_finite() || !e.scale.is_finite() || e.scale < 1.0)
            || meta.scales.values().any(|b| !b.is_finite() || *b < 0.0)
            || !(meta.variance_factor.is_finite() && meta.variance_factor > 0.0)
        {
            return Err("partial metadata is malformed".into());
        }
        Ok(())
    }

    /// The schema every partial is normalized to before merging: values back in the units of
    /// the data, noise variances alongside.
    fn canonical_schema(&self) -> Result<SchemaRef, QueryError> {
        let mut fields: Vec<Field> = self
            .group_fields()
            .into_iter()
            .map(|f| f.with_nullable(true))
            .collect();
        for i in 0..self.aggregate_kinds().len() {
            fields.push(Field::new(part_name(i, Part::Count), DataType::Int64, true));
            for p in &Part::VALUES_AND_NOISE[1..] {
                fields.push(Field::new(part_name(i, *p), DataType::Float64, true));
            }
            fields.push(Field::new(
                part_name(i, Part::Withheld),
                DataType::Int64,
                true,
            ));
            fields.extend(crate::percentile::canonical_fields(self, i));
        }
        for name in self.region_names()?.into_iter().flatten() {
            fields.push(Field::new(name, DataType::Int64, true));
        }
        fields.push(Field::new(PERSONS, DataType::Int64, true));
        fields.push(Field::new(PERSONS_VARIANCE, DataType::Float64, true));
        fields.push(Field::new(NODES, DataType::Int64, true));
        Ok(Arc::new(Schema::new(fields)))
    }

    /// Rewrites one node's checked partial into the canonical schema: s = s'/F + c·n,
    /// q = q'/F² + 2c·s'/F + c²·n, and the noise variances of n (`v`) and of the *centred*
    /// sums s'/F (`w`) and q'/F² (`u`) — independent draws, unlike s and q, whose noises share
    /// the count's through the centre. Each row also says that node `node` returned the group
    /// ([`NODES`], bit `node`) and, per aggregate, whether the node withheld its part of the
    /// cell ([`Part::Withheld`]: 1 when its count is NULL).
    fn normalize(
        &self,
        batch: &RecordBatch,
        meta: &PartialMeta,
        canonical: &SchemaRef,
        node: usize,
    ) -> Result<RecordBatch, QueryError> {
        let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
        let rows = batch.num_rows();
        let n_groups = self.aggregate().group_expr.len();
        let float = |name: &str| -> Result<Option<Float64Array>, QueryError> {
            match batch.column_by_name(name) {
                None => Ok(None),
                Some(a) => {
                    let a = arrow::compute::cast(a, &DataType::Float64).map_err(internal)?;
                    Ok(a.as_any().downcast_ref::<Float64Array>().cloned())
                }
            }
        };
        let int = |name: &str| -> Result<Int64Array, QueryError> {
            batch
                .column_by_name(name)
                .and_then(|a| a.as_any().downcast_ref::<Int64Array>().cloned())
                .ok_or_else(|| QueryError::Internal(format!("{name} missing or not Int64")))
        };
        let var_of = |name: &str| {
            crate::dp::variance(meta.scales.get(name).copied().unwrap_or(0.0))
                * meta.variance_factor
        };
        let mut columns: Vec<ArrayRef> =
            (0..n_groups).map(|j| Arc::clone(batch.column(j))).collect();
        for (i, enc) in meta.encodings.iter().enumerate() {
            if let Some(grid) = self.percentile_grid(i) {
                crate::percentile::normalize(self, batch, i, &grid, meta, &mut columns)?;
                continue;
            }
            let (c, f) = (enc.center, enc.scale);
            let n = int(&part_name(i, Part::Count))?;
            let s_raw = float(&part_name(i, Part::Sum))?;
            let q_raw = float(&part_name(i, Part::SumSquares))?;
            let get = |a: &Option<Float64Array>, r: usize| {
                a.as_ref()
                    .map(|a| if a.is_valid(r) { a.value(r) } else { 0.0 })
                    .unwrap_or(0.0)
            };
            let nv = |r: usize| {
                if n.is_valid(r) {
                    n.value(r) as f64
                } else {
                    0.0
                }
            };
            // A NULL count is a cell the node withheld: its sums are NULL too.
            let s: Float64Array = (0..rows)
                .map(|r| n.is_valid(r).then(|| get(&s_raw, r) / f + c * nv(r)))
                .collect();
            let q: Float64Array = (0..rows)
                .map(|r| {
                    n.is_valid(r).then(|| {
                        get(&q_raw, r) / (f * f) + 2.0 * c * get(&s_raw, r) / f + c * c * nv(r)
                    })
                })
                .collect();
            let vn = var_of(&part_name(i, Part::Count));
            let vs = var_of(&part_name(i, Part::Sum)) / (f * f);
            let vq = var_of(&part_name(i, Part::SumSquares)) / f.powi(4);
            let withheld: Int64Array = (0..rows).map(|r| Some(i64::from(n.is_null(r)))).collect();
            columns.push(Arc::new(n));
            columns.push(Arc::new(s));
            columns.push(Arc::new(q));
            columns.push(Arc::new(Float64Array::from(vec![vn; rows])));
            columns.push(Arc::new(Float64Array::from(vec![vs; rows])));
            columns.push(Arc::new(Float64Array::from(vec![vq; rows])));
            columns.push(Arc::new(withheld));
        }
        for name in self.region_names()?.into_iter().flatten() {
            columns.push(if meta.dp {
                arrow::array::new_null_array(&DataType::Int64, rows)
            } else {
                Arc::new(int(&name)?)
            });
        }
        columns.push(Arc::new(int(PERSONS)?));
        columns.push(Arc::new(Float64Array::from(vec![var_of(PERSONS); rows])));
        let bit = u32::try_from(node)
            .ok()
            .and_then(|b| 1i64.checked_shl(b))
            .filter(|_| node < MAX_NODES)
            .ok_or_else(|| {
                QueryError::Internal(format!("more than {MAX_NODES} partials to merge"))
            })?;
        columns.push(Arc::new(Int64Array::from(vec![bit; rows])));
        RecordBatch::try_new(Arc::clone(canonical), columns).map_err(internal)
    }

    /// Merges `k-only` partial batches (see [`ApprovedQuery::merge_partials`]).
    pub async fn merge(
        &self,
        ctx: &SessionContext,
        partials: Vec<RecordBatch>,
        k: u64,
    ) -> Result<Merged, QueryError> {
        let meta = self.k_only_meta();
        self.merge_partials(
            ctx,
            vec![Partial {
                batches: partials,
                meta,
            }],
            k,
        )
        .await
    }

    /// Merges every node's partials, withholds groups whose summed person count is below `k`,
    /// and applies the query's own projection, HAVING, ORDER BY and LIMIT. Each released
    /// aggregate carries a 95% noise interval when nodes added noise.
    ///
    /// A released number is the federation's number (see [`Merged::incomplete_cells`] and
    /// [`Merged::contributors`]): a cell one node withheld while returning its group is NULL,
    /// never the other nodes' parts alone; a group some node did not return is released with
    /// the list of the nodes that did.
    pub async fn merge_partials(
        &self,
        ctx: &SessionContext,
        partials: Vec<Partial>,
        k: u64,
    ) -> Result<Merged, QueryError> {
        let canonical = self.canonical_schema()?;
        let mut batches = Vec::new();
        let mut dp = false;
        // Every node released the whole public key set: no group is chosen by the data, so
        // none is withheld here either (a noisy count below k is still a DP release).
        let public = !partials.is_empty() && partials.iter().all(|p| p.meta.public_keys);
        for (node, p) in partials.iter().enumerate() {
            dp |= p.meta.dp;
            for b in &p.batches {
                self.check_partial(&b.schema(), &p.meta)
                    .map_err(QueryError::Internal)?;
                batches.push(self.normalize(b, &p.meta, &canonical, node)?);
            }
        }
        // 1. Sum the partial columns per group.
        let mem = MemTable::try_new(Arc::clone(&canonical), vec![batches])?;
        let n_groups = self.aggregate().group_expr.len();
        let group_cols: Vec<Expr> = (0..n_groups).map(|j| col(group_name(j))).collect();
        let sums: Vec<Expr> = canonical.fields()[n_groups..]
            .iter()
            .map(|f| {
                // Which nodes returned the group: an OR of their bits (a node repeating a
                // group cannot make it look returned by another).
                let func = if f.name() == NODES {
                    bit_or_udaf()
                } else {
                    sum_udaf()
                };
                agg(func, col(f.name()), false, None).alias(f.name())
            })
            .collect();
        let plan = LogicalPlanBuilder::scan("partials", provider_as_source(Arc::new(mem)), None)?
            .aggregate(group_cols, sums)?
            .build()?;
        let merged_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let merged = ctx.execute_logical_plan(plan).await?.collect().await?;

        // 2. Federation k, for groups and (k-only: no node noised its numbers) for cells.
        let (kept, suppressed_groups) = if public {
            (merged, 0)
        } else {
            suppress(&merged, k)?
        };
        let (kept, suppressed_cells) = if dp {
            (kept, 0)
        } else {
            crate::cells::suppress_cells(&kept, &self.cells(&Part::VALUES_AND_NOISE)?, k)?
        };
        // 2b. A cell a node withheld while returning its group has no federation number.
        let (kept, incomplete_cells) = withhold_incomplete(&kept, self.aggregate_kinds().len())?;
        // 2c. Percentiles: the quantile and its interval from the summed noisy buckets.
        let kept = crate::percentile::read_quantiles(self, kept)?;
        let min_released_persons = kept
            .iter()
            .filter_map(|b| {
                b.column_by_name(PERSONS)?
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .cloned()
            })
            .filter_map(|a| arrow::compute::min(&a))
            .min()
            .map(|m| u64::try_from(m).unwrap_or(0));

        // 3. Final values under the original aggregate's names (and their noise intervals),
        //    then the query's upper plan, carrying the intervals along.
        let mem = MemTable::try_new(merged_schema, vec![kept])?;
        let scan =
            LogicalPlanBuilder::scan("merged", provider_as_source(Arc::new(mem)), None)?.build()?;
        // Spreads' intermediate columns first, beside every merged column.
        let mut staged: Vec<Expr> = scan
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        for (i, kind) in self.aggregate_kinds().iter().enumerate() {
            let center = self
                .argument_bounds(i)
                .map_or(0.0, |(lo, hi)| (lo + hi) / 2.0);
            let bounds = if dp { self.argument_bounds(i) } else { None };
            staged.extend(staged_columns(*kind, i, bounds, center)?);
        }
        let scan = LogicalPlanBuilder::from(scan).project(staged)?.build()?;
        let scan_schema = Arc::clone(scan.schema());
        let agg_schema = Arc::clone(&self.aggregate().schema);
        let mut finals =
            Vec::with_capacity(agg_schema.fields().len() + self.aggregate_kinds().len());
        for (idx, (qualifier, field)) in agg_schema.iter().enumerate() {
            let value = if idx < n_groups {
                col(group_name(idx))
            } else {
                let i = idx - n_groups;
                let value = final_value(
                    self.aggregate_kinds()[i],
                    i,
                    if dp { self.argument_bounds(i) } else { None },
                    true,
                )?;
                let ty = value.get_type(scan_schema.as_ref())?;
                if &ty == field.data_type() {
                    value
                } else {
                    cast(value, field.data_type().clone())
                }
            };
            finals.push(value.alias_qualified(qualifier.cloned(), field.name()));
        }
        finals.push(col(NODES));
        // Carried through the upper plan beside the output: the intervals, then NODES.
        let ci_cols: Vec<Expr> = (0..self.aggregate_kinds().len())
            .map(|i| col(ci_name(i)))
            .chain(std::iter::once(col(NODES)))
            .collect();
        for (i, kind) in self.aggregate_kinds().iter().enumerate() {
            // Nodes centre each argument on the middle of its bounds (see `privacy`).
            let center = self
                .argument_bounds(i)
                .map_or(0.0, |(lo, hi)| (lo + hi) / 2.0);
            finals.push(interval(*kind, i, center)?.alias(ci_name(i)));
        }
        let mut plan = LogicalPlanBuilder::from(scan).project(finals)?.build()?;
        let mut top_projection: Option<Vec<Expr>> = None;
        for node in self.upper().iter().rev() {
            let mut exprs = node.expressions();
            if let LogicalPlan::Projection(_) = node {
                top_projection = Some(exprs.clone());
                exprs.extend(ci_cols.iter().cloned());
            }
            plan = node.with_new_exprs(exprs, vec![plan])?;
        }
        let out_fields = self.plan().schema().fields().len();
        let names = self.aggregate_names();
        let ci_of: Vec<Option<(usize, f64)>> = match &top_projection {
            Some(exprs) => exprs.iter().map(|e| aggregate_index(e, &names)).collect(),
            None => vec![None; out_fields],
        };
        let full = ctx.execute_logical_plan(plan).await?.collect().await?;
        // Nullable: a withheld cell is NULL even where the aggregate never is (COUNT).
        let schema = crate::cells::nullable(&Arc::new(self.plan().schema().as_arrow().clone()));
        let mut batches = Vec::with_capacity(full.len());
        let mut ci95 = Vec::new();
        let mut contributors = Vec::new();
        for b in &full {
            let nodes = b
                .column_by_name(NODES)
                .and_then(|a| a.as_any().downcast_ref::<Int64Array>().cloned())
                .ok_or_else(|| QueryError::Internal(format!("{NODES} lost in the merge")))?;
            contributors.extend((0..nodes.len()).map(|r| {
                if nodes.is_valid(r) {
                    nodes.value(r) as u64
                } else {
                    0
                }
            }));
            let cols: Vec<ArrayRef> = b.columns().iter().take(out_fields).cloned().collect();
            batches.push(
                RecordBatch::try_new(Arc::clone(&schema), cols)
                    .map_err(|e| QueryError::Internal(e.to_string()))?,
            );
            for r in 0..b.num_rows() {
                let row = ci_of
                    .iter()
                    .map(|i| {
                        let (i, factor) = (*i)?;
                        let a = b
                            .column(out_fields + i)
                            .as_any()
                            .downcast_ref::<Float64Array>()?;
                        (top_projection.is_some() && a.is_valid(r)).then(|| a.value(r) * factor)
                    })
                    .collect();
                ci95.push(row);
            }
        }
        Ok(Merged {
            schema,
            batches,
            suppressed_groups,
            suppressed_cells,
            incomplete_cells,
            contributors,
            ci95,
            dp,
            min_released_persons,
        })
    }
}

/// Name of the persons-count noise variance column.
pub const PERSONS_VARIANCE: &str = "__persons_v";

/// Name of the merged column of which nodes returned a group: bit `p` for the `p`-th partial.
pub const NODES: &str = "__nodes";

/// Most partials one merge can tell apart in [`NODES`].
pub const MAX_NODES: usize = 63;

/// NULLs every cell (count and sums of one aggregate in one group) that some node withheld
/// while returning the group ([`Part::Withheld`] > 0) and that would otherwise be released from the
/// other nodes' parts; returns the batches and how many cells were so NULLed.
fn withhold_incomplete(
    batches: &[RecordBatch],
    aggregates: usize,
) -> Result<(Vec<RecordBatch>, u64), QueryError> {
    let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let mut nulled = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let schema = b.schema();
        let mut columns: Vec<ArrayRef> = b.columns().to_vec();
        for i in 0..aggregates {
            let index = |p: Part| {
                schema
                    .index_of(&part_name(i, p))
                    .map_err(|e| QueryError::Internal(e.to_string()))
            };
            let (n_idx, x_idx) = (index(Part::Count)?, index(Part::Withheld)?);
            let n = b.column(n_idx);
            let withheld = b
                .column(x_idx)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| {
                    QueryError::Internal(format!("{} is not Int64", part_name(i, Part::Withheld)))
                })?;
            let mask: BooleanArray = (0..b.num_rows())
                .map(|r| Some(n.is_valid(r) && withheld.is_valid(r) && withheld.value(r) > 0))
                .collect();
            if mask.true_count() == 0 {
                continue;
            }
            nulled += mask.true_count() as u64;
            for p in Part::VALUES {
                let idx = index(p)?;
                columns[idx] = arrow::compute::nullif(&columns[idx], &mask).map_err(internal)?;
            }
        }
        out.push(RecordBatch::try_new(schema, columns).map_err(internal)?);
    }
    Ok((out, nulled))
}

fn ci_name(i: usize) -> String {
    format!("__ci{i}")
}

/// Which aggregate an output expression shows (through aliases, casts and ROUND/ABS).
/// Which aggregate an output expression reports, and by what factor its noise is scaled: the
/// aggregate itself, renamed, cast or rounded (factor 1), shifted by a constant (1), or
/// multiplied or divided by a constant. Anything else (e.g. a ratio of two aggregates) has no
/// derived interval.
pub(crate) fn aggregate_index(e: &Expr, names: &[String]) -> Option<(usize, f64)> {
    fn constant(e: &Expr) -> Option<f64> {
        match e {
            Expr::Literal(v, _) => match v.cast_to(&DataType::Float64).ok()? {
                ScalarValue::Float64(Some(x)) if x.is_finite() => Some(x),
                _ => None,
            },
            // The analyzer casts literals to the other operand's type.
            Expr::Cast(c) => constant(&c.expr),
            Expr::TryCast(c) => constant(&c.expr),
            _ => None,
        }
    }
    match e {
        Expr::Alias(a) => aggregate_index(&a.expr, names),
        Expr::Cast(c) => aggregate_index(&c.expr, names),
        Expr::TryCast(c) => aggregate_index(&c.expr, names),
        Expr::Negative(x) => aggregate_index(x, names),
        Expr::ScalarFunction(f) if f.func.name() == "round" => {
            f.args.first().and_then(|a| aggregate_index(a, names))
        }
        Expr::BinaryExpr(b) => {
            use datafusion::logical_expr::Operator;
            let (agg, k, agg_left) = match (
                aggregate_index(&b.left, names),
                aggregate_index(&b.right, names),
            ) {
                (Some(a), None) => (a, constant(&b.right)?, true),
                (None, Some(a)) => (a, constant(&b.left)?, false),
                _ => return None,
            };
            let (i, factor) = agg;
            match b.op {
                Operator::Plus | Operator::Minus => Some((i, factor)),
                Operator::Multiply => Some((i, factor * k.abs())),
                Operator::Divide if agg_left && k != 0.0 => Some((i, factor / k.abs())),
                _ => None,
            }
        }
        Expr::Column(c) => names.iter().position(|n| *n == c.name).map(|i| (i, 1.0)),
        _ => None,
    }
}

/// The final value of aggregate `i` from its summed canonical partials. With `bounds` (noisy
/// partials), averages and spreads are clamped to what values in those bounds allow — pure
/// post-processing, which costs no privacy. `staged`: a spread reads its intermediate columns
/// ([`staged_columns`]).
fn final_value(
    kind: AggKind,
    i: usize,
    bounds: Option<(f64, f64)>,
    staged: bool,
) -> datafusion::error::Result<Expr> {
    let n = || col(part_name(i, Part::Count));
    let s = || col(part_name(i, Part::Sum));
    let q = || col(part_name(i, Part::SumSquares));
    let nf = || cast(n(), DataType::Float64);
    let clamp = |x: Expr, lo: f64, hi: f64| -> datafusion::error::Result<Expr> {
        when(x.clone().lt(lit(lo)), lit(lo))
            .when(x.clone().gt(lit(hi)), lit(hi))
            .otherwise(x)
    };
    let variance = |population: bool| -> datafusion::error::Result<Expr> {
        // Σ(x - mean)² = q - s²/n, clamped at 0 against rounding and noise.
        let v = q() - s() * s() / nf();
        let ss = when(v.clone().lt(lit(0.0)), lit(0.0)).otherwise(v)?;
        let (min_n, denom) = if population {
            (0i64, nf())
        } else {
            (1i64, nf() - lit(1.0))
        };
        let var = ss / denom;
        let var = match bounds {
            Some((lo, hi)) => clamp(var, 0.0, ((hi - lo) / 2.0).powi(2))?,
            None => var,
        };
        when(n().gt(lit(min_n)), var).end()
    };
    Ok(match kind {
        // Noise can push a count below zero; a count is never negative.
        AggKind::Count | AggKind::CountPersons => {
            when(n().lt(lit(0i64)), lit(0i64)).otherwise(n())?
        }
        AggKind::Sum => when(n().gt(lit(0i64)), s()).end()?,
        AggKind::Avg => {
            let avg = s() / nf();
            let avg = match bounds {
                Some((lo, hi)) => clamp(avg, lo, hi)?,
                None => avg,
            };
            when(n().gt(lit(0i64)), avg).end()?
        }
        AggKind::Variance { population } if !staged => variance(population)?,
        AggKind::Stddev { population } if !staged => sqrt(variance(population)?),
        // Computed once per row by the projection below the final one ([`staged_columns`]).
        AggKind::Variance { .. } => col(staged_name(i, 'v')),
        AggKind::Stddev { .. } => sqrt(col(staged_name(i, 'v'))),
        // Read off the merged histogram by `crate::percentile::read_quantiles`.
        AggKind::Percentile { .. } => s(),
    })
}

/// The name of a spread's intermediate column: `v` its (clamped) variance, `r` its variance
/// before the clamp, `h` the noise variance of the variance.
fn staged_name(i: usize, what: char) -> String {
    format!("__spread_{i}_{what}")
}

/// The intermediate columns of aggregate `i` if it is a spread (VARIANCE, STDDEV): its value
/// and interval read them instead of repeating the variance's expression — nested several
/// times over, that expression made planning and evaluating the merge cost ~150 ms.
fn staged_columns(
    kind: AggKind,
    i: usize,
    bounds: Option<(f64, f64)>,
    c: f64,
) -> datafusion::error::Result<Vec<Expr>> {
    let population = match kind {
        AggKind::Variance { population } | AggKind::Stddev { population } => population,
        _ => return Ok(vec![]),
    };
    let variance = AggKind::Variance { population };
    Ok(vec![
        final_value(variance, i, bounds, false)?.alias(staged_name(i, 'v')),
        final_value(variance, i, None, false)?.alias(staged_name(i, 'r')),
        spread_noise_variance(i, population, c)?.alias(staged_name(i, 'h')),
    ])
}

/// Half-width of the 95% noise interval of aggregate `i` (NULL when exact), by the delta
/// method in the centred sums s_c = s − c·n and q_c = Σ(x − c)², whose noises are independent of
/// each other and of n's.
fn interval(kind: AggKind, i: usize, c: f64) -> datafusion::error::Result<Expr> {
    let n = || cast(col(part_name(i, Part::Count)), DataType::Float64);
    let s = || col(part_name(i, Part::Sum));
    let (vn, ws) = (
        || col(part_name(i, Part::CountNoise)),
        || col(part_name(i, Part::SumNoise)),
    );
    let sc = || s() - lit(c) * n();
    let var = match kind {
        // The half-width itself, from `crate::percentile::read_quantiles`.
        AggKind::Percentile { .. } => return Ok(col(part_name(i, Part::SumSquares))),
        AggKind::Count | AggKind::CountPersons => vn(),
        AggKind::Sum => ws() + lit(c * c) * vn(),
        // avg = c + s_c/n.
        AggKind::Avg => when(
            n().gt(lit(0.0)),
            ws() / (n() * n()) + sc() * sc() * vn() / (n() * n() * n() * n()),
        )
        .end()?,
        AggKind::Variance { .. } => col(staged_name(i, 'h')),
        // SD = √V, with V's interval ±h carried through the square root: the wider side,
        // max(√(V+h) − √V, √V − √(V−h)), which is the delta method's h/2√V for large V and
        // stays defined (√h) when the noisy V was clamped to 0.
        AggKind::Stddev { .. } => {
            let v = col(staged_name(i, 'r'));
            let h = lit(crate::dp::Z95) * sqrt(col(staged_name(i, 'h')));
            let up = sqrt(v.clone() + h.clone()) - sqrt(v.clone());
            let below = v.clone() - h;
            let down = sqrt(v.clone())
                - sqrt(when(below.clone().gt(lit(0.0)), below).otherwise(lit(0.0))?);
            let half = when(up.clone().gt(down.clone()), up).otherwise(down)?;
            // Expressed as a variance so the common 1.96·√var below gives `half`.
            let sd = half / lit(crate::dp::Z95);
            when(v.is_not_null(), sd.clone() * sd).end()?
        }
    };
    when(var.clone().gt(lit(0.0)), lit(crate::dp::Z95) * sqrt(var)).end()
}

/// Noise variance of the variance estimate V = ss/d, ss = q_c − s_c²/n, d = n − 1 (or n for
/// the population variance), by the delta method from the noise variances of n, s_c and q_c.
fn spread_noise_variance(i: usize, population: bool, c: f64) -> datafusion::error::Result<Expr> {
    let n = || cast(col(part_name(i, Part::Count)), DataType::Float64);
    let s = || col(part_name(i, Part::Sum));
    let q = || col(part_name(i, Part::SumSquares));
    let (vn, ws, uq) = (
        || col(part_name(i, Part::CountNoise)),
        || col(part_name(i, Part::SumNoise)),
        || col(part_name(i, Part::SumSquaresNoise)),
    );
    let sc = || s() - lit(c) * n();
    let qc = || q() - lit(2.0 * c) * s() + lit(c * c) * n();
    let ss = || qc() - sc() * sc() / n();
    let d = || if population { n() } else { n() - lit(1.0) };
    // ∂V/∂q_c = 1/d, ∂V/∂s_c = −2 s_c/(n d), ∂V/∂n = (s_c²/n²)/d − ss/d².
    let dq = || lit(1.0) / d();
    let ds = || lit(-2.0) * sc() / (n() * d());
    let dn = || (sc() * sc() / (n() * n())) / d() - ss() / (d() * d());
    let min_n = if population { 0.0 } else { 1.0 };
    when(
        n().gt(lit(min_n)),
        dq() * dq() * uq() + ds() * ds() * ws() + dn() * dn() * vn(),
    )
    .end()
}

/// The merged answer of a federated query.
#[derive(Debug, Clone)]
pub struct Merged {
    /// Output schema (the query's column names).
    pub schema: SchemaRef,
    /// Output rows.
    pub batches: Vec<RecordBatch>,
    /// Groups the coordinator withheld (below the federation k).
    pub suppressed_groups: u64,
    /// Cells (one aggregate of one released group) the coordinator withheld: some region of
    /// rows it reads holds 1 to k − 1 people across the nodes (`k-only`).
    pub suppressed_cells: u64,
    /// Cells released as NULL because a node that returned the group withheld its part of
    /// the cell (its region there held 1 to k − 1 people): the other nodes' parts alone are
    /// not the federation's number. Counted over every merged group the federation k kept.
    pub incomplete_cells: u64,
    /// Per output row, the partials that returned its group (bit `p` for the `p`-th partial
    /// given to the merge). A partial without the bit holds none of the group's rows or
    /// withheld them (below its k, or its DP threshold): the coordinator cannot tell which.
    pub contributors: Vec<u64>,
    /// Per output row and column: half-width of the 95% noise interval, when noised.
    pub ci95: Vec<Vec<Option<f64>>>,
    /// Whether any node added noise.
    pub dp: bool,
    /// The smallest (summed) person count among the groups released; never below `k`, except
    /// for a public key set, whose every group is released (see [`crate::keyset`]).
    pub min_released_persons: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{register_functions, session_config};
    use crate::schema::Table;
    use crate::validate::approve;
    use arrow::array::{ArrayRef, Date32Array, Int8Array, Int32Array, StringArray};
    use arrow::util::display::array_value_to_string;

    /// A small deterministic `experience` table for shard `s` (persons prefixed per shard).
    fn experience(s: usize, rows: usize) -> RecordBatch {
        let schema = Table::Experience.arrow_schema_of_version(1);
        let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from(
                (0..rows).map(|i| Some(f(i))).collect::<Vec<_>>(),
            ))
        };
        let score = |salt: usize| -> ArrayRef {
            Arc::new(Int8Array::from(
                (0..rows)
                    .map(|i| {
                        if (i + salt).is_multiple_of(17) {
                            None
                        } else {
                            Some(((i * 7 + salt * 3 + s) % 5 + 1) as i8)
                        }
                    })
                    .collect::<Vec<_>>(),
            ))
        };
        let columns: Vec<ArrayRef> = vec![
            text(&|i| format!("r{s}-{i}")),
            text(&|i| format!("p{s}-{}", i % (rows / 3))),
            text(&|i| format!("c{s}-{i}")),
            text(&|_| ["SSA", "CMS", "OPM"][s].to_string()),
            text(&|i| format!("service {}", i % 2)),
            text(&|i| crate::schema::LIFE_EXPERIENCES[i % 2].to_string()),
            text(&|i| crate::schema::JOURNEY_STAGES[(i / 2) % 3].to_string()),
            text(&|i| crate::schema::CHANNELS[(i * 5 + s) % 4].to_string()),
            text(&|i| crate::schema::STATES[i % 6].to_string()),
            text(&|i| crate::schema::AGE_BANDS[i % 6].to_string()),
            Arc::new(Date32Array::from(
                (0..rows)
                    .map(|i| Some(20_000 + (i % 200) as i32))
                    .collect::<Vec<_>>(),
            )),
            score(0),
            score(1),
            score(2),
            score(3),
            score(4),
            score(5),
            score(6),
        ];
        Table::Experience
            .complete_v1_batch(&RecordBatch::try_new(schema, columns).expect("batch"))
            .expect("complete")
    }

    fn operational(s: usize, rows: usize) -> RecordBatch {
        let schema = Table::Operational.arrow_schema_of_version(1);
        let e = experience(s, rows);
        let pick = |name: &str| Arc::clone(e.column(e.schema().index_of(name).expect("column")));
        let columns: Vec<ArrayRef> = vec![
            pick("case_id"),
            pick("person_id"),
            pick("agency"),
            pick("service"),
            pick("life_experience"),
            pick("journey_stage"),
            pick("channel"),
            pick("state"),
            pick("age_band"),
            pick("response_date"),
            pick("response_date"),
            Arc::new(Int32Array::from(
                (0..rows)
                    .map(|i| {
                        if i % 11 == 0 {
                            None
                        } else {
                            Some(((i * 37 + s) % 240) as i32)
                        }
                    })
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from(
                (0..rows)
                    .map(|i| Some(((i * 13) % 90) as i32))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(arrow::array::BooleanArray::from(
                (0..rows).map(|i| Some(i % 3 == 0)).collect::<Vec<_>>(),
            )),
            Arc::new(arrow::array::BooleanArray::from(
                (0..rows).map(|i| Some(i % 10 == 0)).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                (0..rows)
                    .map(|i| Some(crate::schema::OUTCOMES[i % 4]))
                    .collect::<Vec<_>>(),
            )),
        ];
        Table::Operational
            .complete_v1_batch(&RecordBatch::try_new(schema, columns).expect("batch"))
            .expect("complete")
    }

    fn context(shards: &[usize]) -> SessionContext {
        let ctx = SessionContext::new_with_config(session_config());
        register_functions(&ctx);
        let exp: Vec<RecordBatch> = shards.iter().map(|&s| experience(s, 240)).collect();
        let op: Vec<RecordBatch> = shards.iter().map(|&s| operational(s, 240)).collect();
        ctx.register_table(
            "experience",
            Arc::new(MemTable::try_new(Table::Experience.arrow_schema(), vec![exp]).expect("mem")),
        )
        .expect("register");
        ctx.register_table(
            "operational",
            Arc::new(MemTable::try_new(Table::Operational.arrow_schema(), vec![op]).expect("mem")),
        )
        .expect("register");
        ctx
    }

    fn render(batches: &[RecordBatch]) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                rows.push(
                    b.columns()
                        .iter()
                        .map(|c| array_value_to_string(c, r).expect("fmt"))
                        .collect(),
                );
            }
        }
        rows
    }

    fn close(a: &str, b: &str) -> bool {
        match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
            _ => a == b,
        }
    }

    #[tokio::test]
    async fn three_shards_merge_to_the_pooled_answer() {
        let queries = [
            "SELECT agency, channel, COUNT(*), AVG(trust), STDDEV(satisfaction), VAR_POP(ease), SUM(efficiency) FROM experience GROUP BY agency, channel ORDER BY agency, channel",
            "SELECT channel, COUNT(DISTINCT person_id) AS people, AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END) FROM experience GROUP BY channel ORDER BY channel",
            "SELECT COUNT(*), AVG(trust), STDDEV_POP(trust), VARIANCE(trust) FROM experience",
            "SELECT journey_stage, COUNT(*) FILTER (WHERE trust >= 4) AS hi, AVG(trust) FILTER (WHERE channel = 'phone') FROM experience WHERE life_experience = 'approaching_retirement' GROUP BY journey_stage HAVING COUNT(*) > 10 ORDER BY hi DESC LIMIT 2",
            "SELECT o.outcome, AVG(o.wait_minutes), AVG(e.satisfaction), STDDEV(o.processing_days) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY o.outcome ORDER BY 1",
            "SELECT date_trunc('month', response_date) AS m, ROUND(AVG(trust), 3) FROM experience GROUP BY date_trunc('month', response_date) ORDER BY m",
        ];
        let pooled = context(&[0, 1, 2]);
        let shards: Vec<SessionContext> = (0..3).map(|s| context(&[s])).collect();
        for sql in queries {
            let expected = pooled
                .sql(sql)
                .await
                .expect("pooled")
                .collect()
                .await
                .expect("pooled");
            let mut partials = Vec::new();
            for ctx in &shards {
                let q = approve(&ctx.state(), sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                let batches = ctx
                    .execute_logical_plan(q.partial_plan().expect("partial"))
                    .await
                    .expect("run")
                    .collect()
                    .await
                    .expect("collect");
                partials.extend(batches);
            }
            let coordinator = context(&[]);
            let q = approve(&coordinator.state(), sql).await.expect("approve");
            let merged = q.merge(&coordinator, partials, 1).await.expect("merge");
            let (got, want) = (render(&merged.batches), render(&expected));
            assert_eq!(got.len(), want.len(), "{sql}\n got {got:?}\nwant {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.iter().zip(w).all(|(a, b)| close(a, b)),
                    "{sql}\n got {g:?}\nwant {w:?}"
                );
            }
            assert_eq!(merged.suppressed_groups, 0);
        }
    }

    #[tokio::test]
    async fn suppression_counts_small_groups() {
        let ctx = context(&[0]);
        let q = approve(
            &ctx.state(),
            "SELECT state, channel, COUNT(*) FROM experience GROUP BY state, channel",
        )
        .await
        .expect("approve");
        let batches = ctx
            .execute_logical_plan(q.partial_plan().expect("partial"))
            .await
            .expect("run")
            .collect()
            .await
            .expect("collect");
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        let (kept, dropped) = suppress(&batches, 1_000).expect("suppress");
        assert_eq!(kept.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
        assert_eq!(dropped as usize, total);
        let (kept, dropped) = suppress(&batches, 1).expect("suppress");
        assert_eq!(
            (kept.iter().map(|b| b.num_rows()).sum::<usize>(), dropped),
            (total, 0)
        );
    }
}
