//! k-anonymity per cell, for `k-only` nodes: every released number is computed from rows of at
//! least k distinct people.
//!
//! A group with k people is not enough: `SUM(trust) FILTER (WHERE <one person's traits>)`, or
//! `AVG(ease)` in a group padded with rows whose `ease` is NULL, or `SUM(CASE WHEN <one person>
//! THEN trust ELSE 0 END)` each read one person's answer inside a large group. So each
//! aggregate is split into the *regions* of rows it actually reads, and each region must hold
//! no one or at least k people:
//!
//! ```text
//!  aggregate i = AGG(a) FILTER (WHERE f)
//!    a not a CASE:              regions { f ∧ a IS NOT NULL }
//!    a = CASE WHEN c1 THEN v1 … ELSE v0 END:
//!                               regions { f ∧ c1 ∧ v1 IS NOT NULL,  f ∧ ¬c1 ∧ c2 ∧ v2 IS NOT NULL, …,
//!                                         f ∧ ¬c1 ∧ … ∧ v0 IS NOT NULL }   (NULL branches read nothing)
//!    COUNT(DISTINCT person_id): its own value is its support
//!  cell (group, i) released  ⇔  every region: 0 or ≥ k distinct people
//! ```
//!
//! The argument itself may only be measures, constants and linear arithmetic over them (at
//! most a product of two measures), optionally as the branches of one CASE: functions such as
//! `exp`, `greatest` or `power` inside an aggregate can make one value dominate a sum (e.g.
//! `LN(SUM(EXP(100*trust)))/100` is MAX), and a dimension inside the argument is a condition
//! the regions would not see. Conditions on anything belong in FILTER or CASE WHEN.
//!
//! Nodes count people per region exactly, or — when every person is known to hold at most R
//! rows of the query's input — bound them from below by ⌈rows/R⌉, which costs a row count
//! instead of a distinct count and is exact enough whenever it already reaches k (see
//! [`lower_bounds`]). The coordinator sums the regions' people across nodes and checks again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::functions_aggregate::{count::count_udaf, sum::sum_udaf};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Case, Cast, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder,
    Operator, TryCast, cast, col, lit,
};

use crate::partial::{Encoding, KPartial, PERSONS, Part, PartialMeta, agg, group_name, part_name};
use crate::query::{AggKind, ApprovedQuery};
use crate::rules::{QueryError, Rejection, Rule};
use crate::schema::{self, Kind};

/// Name of the people-count column of region `j` of aggregate `i`.
pub fn region_name(i: usize, j: usize) -> String {
    format!("__a{i}_p{j}")
}

/// Where one aggregate's numbers live in a batch, and what supports them.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Columns holding the aggregate's partial values (withheld together).
    pub values: Vec<String>,
    /// People counts that must each be 0 or ≥ k.
    pub supports: Vec<String>,
}

impl ApprovedQuery {
    /// The plan each `k-only` node runs on its own data (exactly counted): one row per group
    /// with the partial sums and counts, the people in each region of each aggregate (see
    /// the module docs) and in the group. Never includes HAVING, ORDER BY or LIMIT.
    pub fn partial_plan(&self) -> Result<LogicalPlan, QueryError> {
        Ok(self.k_partial()?.exact)
    }

    /// The partial sums and counts of every aggregate, as aggregate expressions named
    /// `__a{i}_{n,s,q}`.
    pub(crate) fn part_aggregates(&self) -> Result<Vec<Expr>, QueryError> {
        let schema = self.aggregate().input.schema();
        let mut aggs = Vec::new();
        for (i, (e, kind)) in self
            .aggregate()
            .aggr_expr
            .iter()
            .zip(self.aggregate_kinds())
            .enumerate()
        {
            let af = aggregate_function(e)?;
            let filter = af.params.filter.clone();
            let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
            let as_f64 = |x: Expr| -> Result<Expr, QueryError> {
                let ty = x.get_type(schema.as_ref())?;
                Ok(if ty == DataType::Float64 {
                    x
                } else {
                    cast(x, DataType::Float64)
                })
            };
            match kind {
                AggKind::Count => {
                    aggs.push(
                        agg(count_udaf(), arg, false, filter).alias(part_name(i, Part::Count)),
                    );
                }
                AggKind::CountPersons => {
                    aggs.push(
                        agg(count_udaf(), arg, true, filter).alias(part_name(i, Part::Count)),
                    );
                }
                AggKind::Sum => {
                    aggs.push(
                        agg(count_udaf(), arg.clone(), false, filter.clone())
                            .alias(part_name(i, Part::Count)),
                    );
                    aggs.push(agg(sum_udaf(), arg, false, filter).alias(part_name(i, Part::Sum)));
                }
                AggKind::Avg => {
                    aggs.push(
                        agg(count_udaf(), arg.clone(), false, filter.clone())
                            .alias(part_name(i, Part::Count)),
                    );
                    aggs.push(
                        agg(sum_udaf(), as_f64(arg)?, false, filter).alias(part_name(i, Part::Sum)),
                    );
                }
                AggKind::Percentile { .. } => {
                    return Err(QueryError::Internal(
                        "a percentile has no k-only partial".into(),
                    ));
                }
                AggKind::Variance { .. } | AggKind::Stddev { .. } => {
                    let x = as_f64(arg.clone())?;
                    aggs.push(
                        agg(count_udaf(), arg, false, filter.clone())
                            .alias(part_name(i, Part::Count)),
                    );
                    aggs.push(
                        agg(sum_udaf(), x.clone(), false, filter.clone())
                            .alias(part_name(i, Part::Sum)),
                    );
                    aggs.push(
                        agg(sum_udaf(), x.clone() * x, false, filter)
                            .alias(part_name(i, Part::SumSquares)),
                    );
                }
            }
        }
        Ok(aggs)
    }

    /// The Arrow schema of the partial batches a `k-only` node returns.
    pub fn partial_schema(&self) -> Result<SchemaRef, QueryError> {
        Ok(Arc::new(self.partial_plan()?.schema().as_arrow().clone()))
    }

    /// How a `k-only` node encodes its partials: exact, uncentred values.
    pub fn k_only_meta(&self) -> PartialMeta {
        PartialMeta {
            dp: false,
            public_keys: false,
            variance_factor: 1.0,
            epsilon: None,
            encodings: vec![
                Encoding {
                    center: 0.0,
                    scale: 1.0
                };
                self.aggregate_kinds().len()
            ],
            scales: BTreeMap::new(),
        }
    }

    /// The regions of every aggregate (empty for `COUNT(DISTINCT person_id)`), after checking
    /// the `k-only` rule for aggregate arguments.
    pub fn cell_regions(&self) -> Result<Vec<Vec<Expr>>, QueryError> {
        let mut out = Vec::with_capacity(self.aggregate_kinds().len());
        for (e, kind) in self
            .aggregate()
            .aggr_expr
            .iter()
            .zip(self.aggregate_kinds())
        {
            let af = aggregate_function(e)?;
            // A percentile has no k-only partial (`build_k_partial` refuses it).
            if matches!(kind, AggKind::CountPersons | AggKind::Percentile { .. }) {
                out.push(vec![]);
                continue;
            }
            let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
            check_argument(&arg, *kind).map_err(|why| {
                QueryError::Rejected(
                    Rejection::new(
                        Rule::ArgumentNotAllowed,
                        format!(
                            "in k-only mode the argument of {} must be measures, constants and arithmetic over them (at most a product of two measures), or one CASE over such values; {why}",
                            af.func.name()
                        ),
                    )
                    .at_word(self.sql(), af.func.name()),
                )
            })?;
            let filter = af.params.filter.as_deref().cloned();
            let regions = branches(&arg)
                .into_iter()
                .map(|(reach, value)| {
                    let mut r = value.is_not_null();
                    if let Some(reach) = reach {
                        r = reach.and(r);
                    }
                    if let Some(f) = &filter {
                        r = Expr::IsTrue(Box::new(f.clone())).and(r);
                    }
                    r
                })
                .collect();
            out.push(regions);
        }
        Ok(out)
    }

    /// The names of each aggregate's region columns, without building plans (the coordinator
    /// uses them to check a peer's partial).
    pub fn region_names(&self) -> Result<Vec<Vec<String>>, QueryError> {
        Ok(self
            .cell_regions()?
            .iter()
            .enumerate()
            .map(|(i, r)| (0..r.len()).map(|j| region_name(i, j)).collect())
            .collect())
    }

    /// Each aggregate's cell: the columns of its value (among `value_parts`, e.g. [`Part::VALUES`])
    /// and of its supports.
    pub fn cells(&self, value_parts: &[Part]) -> Result<Vec<Cell>, QueryError> {
        Ok(self
            .region_names()?
            .into_iter()
            .enumerate()
            .map(|(i, regions)| Cell {
                values: value_parts.iter().map(|p| part_name(i, *p)).collect(),
                supports: if self.aggregate_kinds()[i] == AggKind::CountPersons {
                    vec![part_name(i, Part::Count)]
                } else {
                    regions
                },
            })
            .collect())
    }

    /// The `k-only` partial plans (see the module docs); built once per query.
    pub fn k_partial(&self) -> Result<KPartial, QueryError> {
        self.cached_k_partial(|| self.build_k_partial())
    }

    fn build_k_partial(&self) -> Result<KPartial, QueryError> {
        self.refuse_exact_percentiles()?;
        let regions = self.cell_regions()?;
        let person = Expr::Column(self.person().clone());
        let groups: Vec<Expr> = self
            .aggregate()
            .group_expr
            .iter()
            .enumerate()
            .map(|(j, g)| g.clone().unalias().alias(group_name(j)))
            .collect();
        let parts = self.part_aggregates()?;

        // One people count per distinct predicate (regions often repeat: COUNT(*) and AVG(x)
        // over a column without NULLs), the group's own last.
        let mut unique: Vec<Option<Expr>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut slot = |pred: Option<&Expr>| -> usize {
            let key = pred.map_or_else(String::new, |p| format!("{p:?}"));
            *index.entry(key).or_insert_with(|| {
                unique.push(pred.cloned());
                unique.len() - 1
            })
        };
        let mut region_slots = Vec::new();
        for (i, rs) in regions.iter().enumerate() {
            for (j, r) in rs.iter().enumerate() {
                region_slots.push((region_name(i, j), slot(Some(r))));
            }
        }
        let group_slot = slot(None);
        let support = |u: usize| format!("__support{u}");

        // Rows of a plain argument's one region (its FILTER, a non-NULL value) are exactly its
        // count part, and rows of the group are a plain COUNT(*)'s: the row-counting plan reuses
        // them instead of counting again.
        let mut same_rows: HashMap<usize, String> = HashMap::new();
        let mut k = 0;
        for (i, (e, kind)) in self
            .aggregate()
            .aggr_expr
            .iter()
            .zip(self.aggregate_kinds())
            .enumerate()
        {
            let af = aggregate_function(e)?;
            let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
            let plain = matches!(branches(&arg).as_slice(), [(None, _)]);
            if *kind == AggKind::CountPersons {
                continue;
            }
            if plain {
                same_rows
                    .entry(region_slots[k].1)
                    .or_insert_with(|| part_name(i, Part::Count));
                let whole_group = *kind == AggKind::Count
                    && af.params.filter.is_none()
                    && matches!(strip_casts(&arg), Expr::Literal(v, _) if !v.is_null());
                if whole_group {
                    same_rows
                        .entry(group_slot)
                        .or_insert_with(|| part_name(i, Part::Count));
                }
            }
            k += regions[i].len();
        }

        let plan_with = |distinct: bool| -> Result<LogicalPlan, QueryError> {
            let mut aggs = parts.clone();
            for (u, pred) in unique.iter().enumerate() {
                if !distinct && same_rows.contains_key(&u) {
                    continue;
                }
                let arg = if distinct { person.clone() } else { lit(1i64) };
                aggs.push(count(arg, distinct, pred.clone().map(Box::new)).alias(support(u)));
            }
            let aggregate = LogicalPlan::Aggregate(Aggregate::try_new(
                Arc::clone(&self.aggregate().input),
                groups.clone(),
                aggs,
            )?);
            let mut out: Vec<Expr> = (0..groups.len()).map(|j| col(group_name(j))).collect();
            out.extend(parts.iter().map(|p| col(p.schema_name().to_string())));
            let source = |u: usize| match same_rows.get(&u) {
                Some(part) if !distinct => col(part.clone()),
                _ => col(support(u)),
            };
            out.extend(
                region_slots
                    .iter()
                    .map(|(name, u)| source(*u).alias(name.clone())),
            );
            out.push(source(group_slot).alias(PERSONS));
            Ok(LogicalPlanBuilder::from(aggregate).project(out)?.build()?)
        };
        let mut support_columns: Vec<String> =
            region_slots.iter().map(|(n, _)| n.clone()).collect();
        support_columns.push(PERSONS.to_string());
        Ok(KPartial {
            exact: plan_with(true)?,
            counting_rows: plan_with(false)?,
            support_columns,
        })
    }
}

fn count(arg: Expr, distinct: bool, filter: Option<Box<Expr>>) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        count_udaf(),
        vec![arg],
        distinct,
        filter,
        vec![],
        None,
    ))
}

fn aggregate_function(e: &Expr) -> Result<&AggregateFunction, QueryError> {
    match e {
        Expr::Alias(a) => aggregate_function(&a.expr),
        Expr::AggregateFunction(af) => Ok(af),
        other => Err(QueryError::Internal(format!("not an aggregate: {other}"))),
    }
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_casts(&a.expr),
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => strip_casts(expr),
        other => other,
    }
}

fn is_null_literal(e: &Expr) -> bool {
    matches!(strip_casts(e), Expr::Literal(v, _) if v.is_null())
}

fn has_columns(e: &Expr) -> bool {
    !e.column_refs().is_empty()
}

/// The branches of an argument: (condition that reaches it, its value), with NULL branches
/// left out (they read nothing). A plain value is one branch reached always; a top-level CASE
/// has its WHEN/ELSE branches; `coalesce`, `nullif`, `abs` and two-argument `greatest` /
/// `least` are read as the CASE they are, NULLs included, so that every row with a non-NULL
/// value falls in exactly one region.
fn branches(arg: &Expr) -> Vec<(Option<Expr>, Expr)> {
    let inner = strip_casts(arg);
    let not_null = |e: &Expr| e.clone().is_not_null();
    match inner {
        Expr::Case(Case {
            expr,
            when_then_expr,
            else_expr,
        }) => {
            let mut out = Vec::new();
            let mut not_before: Option<Expr> = None;
            for (when, then) in when_then_expr {
                let cond = match expr {
                    Some(base) => (**base).clone().eq((**when).clone()),
                    None => (**when).clone(),
                };
                let hit = Expr::IsTrue(Box::new(cond.clone()));
                let reach = match &not_before {
                    Some(n) => n.clone().and(hit),
                    None => hit,
                };
                if !is_null_literal(then) {
                    out.push((Some(reach), (**then).clone()));
                }
                let miss = Expr::IsNotTrue(Box::new(cond));
                not_before = Some(match not_before {
                    Some(n) => n.and(miss),
                    None => miss,
                });
            }
            if let Some(e) = else_expr
                && !is_null_literal(e)
            {
                out.push((not_before, (**e).clone()));
            }
            out
        }
        Expr::ScalarFunction(f) => match (f.func.name(), f.args.as_slice()) {
            ("coalesce", args) => {
                let mut out = Vec::new();
                let mut before: Option<Expr> = None;
                for a in args {
                    let here = match &before {
                        Some(b) => b.clone().and(not_null(a)),
                        None => not_null(a),
                    };
                    out.push((Some(here), a.clone()));
                    let null = a.clone().is_null();
                    before = Some(match before {
                        Some(b) => b.and(null),
                        None => null,
                    });
                }
                out
            }
            ("nullif", [a, b]) => vec![(
                Some(Expr::IsNotTrue(Box::new(a.clone().eq(b.clone())))),
                a.clone(),
            )],
            ("abs", [x]) => vec![
                (Some(x.clone().gt_eq(lit(0i64))), x.clone()),
                (
                    Some(x.clone().lt(lit(0i64))),
                    Expr::Negative(Box::new(x.clone())),
                ),
            ],
            (name @ ("greatest" | "least"), [a, b]) => {
                let (a_wins, b_wins) = if name == "greatest" {
                    (a.clone().gt_eq(b.clone()), a.clone().lt(b.clone()))
                } else {
                    (a.clone().lt_eq(b.clone()), a.clone().gt(b.clone()))
                };
                vec![
                    (
                        Some(not_null(a).and(b.clone().is_null().or(a_wins))),
                        a.clone(),
                    ),
                    (
                        Some(not_null(b).and(a.clone().is_null().or(b_wins))),
                        b.clone(),
                    ),
                ]
            }
            _ => vec![(None, arg.clone())],
        },
        _ => vec![(None, arg.clone())],
    }
}

/// The `k-only` rule for an aggregate's argument (see the module docs); `Err` says what broke it.
fn check_argument(arg: &Expr, kind: AggKind) -> Result<(), String> {
    let inner = strip_casts(arg);
    if let Expr::ScalarFunction(f) = inner {
        let arity_ok = match f.func.name() {
            "coalesce" => true,
            "nullif" | "greatest" | "least" => f.args.len() == 2,
            "abs" => f.args.len() == 1,
            _ => false,
        };
        if !arity_ok {
            return Err(format!("function {} inside an aggregate", f.func.name()));
        }
    }
    for (_, v) in branches(arg) {
        // COUNT only sees whether a value is NULL: any column may be counted.
        if kind == AggKind::Count && matches!(strip_casts(&v), Expr::Column(_)) {
            continue;
        }
        degree(&v)?;
    }
    Ok(())
}

/// The degree of a linear-arithmetic value in measures (constants 0, a measure 1, products
/// add), at most 2.
fn degree(e: &Expr) -> Result<u8, String> {
    if !has_columns(e) {
        return Ok(0);
    }
    let d = match e {
        Expr::Alias(a) => degree(&a.expr)?,
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => degree(expr)?,
        Expr::Column(c) => match schema::column_anywhere(&c.name).map(|c| c.kind) {
            Some(Kind::Measure) => 1,
            _ => {
                return Err(format!(
                    "{} is not a measure: put conditions on it in FILTER (WHERE ...) or CASE WHEN ... THEN",
                    c.name
                ));
            }
        },
        Expr::Negative(x) => degree(x)?,
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Plus | Operator::Minus => degree(left)?.max(degree(right)?),
            Operator::Multiply => degree(left)? + degree(right)?,
            Operator::Divide if !has_columns(right) => degree(left)?,
            other => return Err(format!("operator {other} over measures is not allowed")),
        },
        Expr::Case(_) => return Err("a CASE may only be the whole argument".into()),
        Expr::ScalarFunction(f) => {
            return Err(format!("function {} inside an aggregate", f.func.name()));
        }
        other => return Err(format!("{} inside an aggregate", other.variant_name())),
    };
    if d > 2 {
        return Err("a product of more than two measures".into());
    }
    Ok(d)
}

/// Turns the row counts of a [`KPartial::counting_rows`] result into lower bounds on people,
/// ⌈rows / R⌉, where no one holds more than `rows_per_person` (R) rows of the query's input.
/// Returns the bounded batches, or `None` when some count is not decided by its bound (rows
/// but a bound below `k`): the node must then count people exactly.
pub fn lower_bounds(
    batches: &[RecordBatch],
    support_columns: &[String],
    rows_per_person: u64,
    k: u64,
) -> Result<Option<Vec<RecordBatch>>, QueryError> {
    let r = i64::try_from(rows_per_person.max(1)).unwrap_or(i64::MAX);
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let mut columns: Vec<ArrayRef> = b.columns().to_vec();
        for name in support_columns {
            let idx = b
                .schema()
                .index_of(name)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            let rows = int_column(b, idx)?;
            let mut bounded = Vec::with_capacity(rows.len());
            for x in 0..rows.len() {
                let n = if rows.is_valid(x) { rows.value(x) } else { 0 };
                let lb = (n + r - 1) / r;
                if n > 0 && lb < k {
                    return Ok(None);
                }
                bounded.push(Some(lb));
            }
            columns[idx] = Arc::new(Int64Array::from(bounded));
        }
        out.push(
            RecordBatch::try_new(b.schema(), columns)
                .map_err(|e| QueryError::Internal(e.to_string()))?,
        );
    }
    Ok(Some(out))
}

/// `schema` with every field nullable.
pub fn nullable(schema: &arrow::datatypes::SchemaRef) -> arrow::datatypes::SchemaRef {
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

fn int_column(b: &RecordBatch, idx: usize) -> Result<&Int64Array, QueryError> {
    b.column(idx)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| {
            QueryError::Internal(format!("{} is not Int64", b.schema().field(idx).name()))
        })
}

/// Withholds every cell with a support of 1 to k − 1 people: its value columns (and supports)
/// become NULL (the returned batches' fields are all nullable). Returns the batches and how
/// many cells were withheld. Columns of a cell that a batch does not have are skipped.
pub fn suppress_cells(
    batches: &[RecordBatch],
    cells: &[Cell],
    k: u64,
) -> Result<(Vec<RecordBatch>, u64), QueryError> {
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let mut withheld = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let schema = nullable(&b.schema());
        let mut columns: Vec<ArrayRef> = b.columns().to_vec();
        for cell in cells {
            let mut small = vec![false; b.num_rows()];
            for s in &cell.supports {
                let idx = schema
                    .index_of(s)
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                let people = int_column(b, idx)?;
                for (x, flag) in small.iter_mut().enumerate() {
                    if people.is_valid(x) && people.value(x) > 0 && people.value(x) < k {
                        *flag = true;
                    }
                }
            }
            let mask = BooleanArray::from(small);
            withheld += mask.true_count() as u64;
            if mask.true_count() == 0 {
                continue;
            }
            for name in cell.values.iter().chain(&cell.supports) {
                if let Ok(idx) = schema.index_of(name) {
                    columns[idx] =
                        arrow::compute::nullif(&columns[idx], &mask).map_err(internal)?;
                }
            }
        }
        out.push(RecordBatch::try_new(Arc::clone(&schema), columns).map_err(internal)?);
    }
    Ok((out, withheld))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partial::suppress;
    use crate::schema::Table;
    use crate::testdata::{all, batch, context};
    use crate::validate::approve;
    use arrow::util::display::array_value_to_string;
    use datafusion::execution::context::SessionContext;

    /// 20 people at SSA, one response each; person 0 lives in WY, the others in VA. `ease` is
    /// only answered by person 0 (the others took the FY2024 form).
    fn twenty() -> SessionContext {
        let people: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let people: Vec<&str> = people.iter().map(String::as_str).collect();
        let mut state = vec!["VA"; 20];
        state[0] = "WY";
        let mut ease = vec![None; 20];
        ease[0] = Some("2");
        let trust: Vec<&str> = (0..20).map(|i| if i < 15 { "5" } else { "2" }).collect();
        let e = batch(
            Table::Experience,
            &[
                ("person_id", all(&people)),
                ("agency", all(&vec!["SSA"; 20])),
                ("state", all(&state)),
                ("trust", all(&trust)),
                ("ease", ease),
            ],
        );
        context(vec![e], vec![])
    }

    /// Runs `sql` as a k-only node with k = 10 would, exactly: values of the first group, with
    /// withheld cells as "" and the number of cells withheld.
    async fn node_answer(ctx: &SessionContext, sql: &str, k: u64) -> (Vec<String>, u64) {
        let q = approve(&ctx.state(), sql).await.expect("approve");
        let kp = q.k_partial().expect("k partial");
        let rows = ctx
            .execute_logical_plan(kp.exact)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let (kept, _) = suppress(&rows, k).expect("suppress");
        let (kept, withheld) =
            suppress_cells(&kept, &q.cells(&Part::VALUES).expect("cells"), k).expect("cells");
        let b = kept
            .iter()
            .find(|b| b.num_rows() > 0)
            .expect("a released group");
        let shown = (0..q.aggregate_kinds().len())
            .map(|i| {
                let c = b.column_by_name(&part_name(i, Part::Count)).expect("n");
                if c.is_null(0) {
                    String::new()
                } else {
                    array_value_to_string(c, 0).expect("fmt")
                }
            })
            .collect();
        (shown, withheld)
    }

    #[tokio::test]
    async fn a_filter_on_one_persons_traits_is_withheld() {
        let ctx = twenty();
        let (shown, withheld) = node_answer(
            &ctx,
            "SELECT agency, SUM(trust) FILTER (WHERE state = 'WY'), COUNT(*) FROM experience GROUP BY agency",
            10,
        )
        .await;
        assert_eq!(shown, ["", "20"]);
        assert_eq!(withheld, 1);
    }

    #[tokio::test]
    async fn nulls_cannot_shrink_a_group_to_one_person() {
        let ctx = twenty();
        let (shown, withheld) = node_answer(
            &ctx,
            "SELECT agency, AVG(ease), AVG(trust) FROM experience GROUP BY agency",
            10,
        )
        .await;
        assert_eq!(shown, ["", "20"], "AVG(ease) reads one person");
        assert_eq!(withheld, 1);
    }

    #[tokio::test]
    async fn a_case_that_singles_out_a_person_is_withheld() {
        let ctx = twenty();
        for sql in [
            "SELECT agency, SUM(CASE WHEN state = 'WY' THEN trust ELSE 0 END) FROM experience GROUP BY agency",
            "SELECT agency, SUM(CASE WHEN state = 'WY' THEN trust ELSE 0.0001 END) FROM experience GROUP BY agency",
            "SELECT agency, COUNT(CASE WHEN state = 'WY' THEN 1 END) FROM experience GROUP BY agency",
            "SELECT agency, SUM(CASE state WHEN 'WY' THEN trust END) FROM experience GROUP BY agency",
            "SELECT agency, AVG(coalesce(ease, 0)) FROM experience GROUP BY agency",
            "SELECT agency, COUNT(DISTINCT person_id) FILTER (WHERE state = 'WY') FROM experience GROUP BY agency",
        ] {
            let (shown, withheld) = node_answer(&ctx, sql, 10).await;
            assert_eq!((shown, withheld), (vec![String::new()], 1), "{sql}");
        }
    }

    #[tokio::test]
    async fn a_share_is_released_only_when_both_sides_have_k_people() {
        let ctx = twenty();
        let share = "SELECT agency, AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END) FROM experience GROUP BY agency";
        // 15 trust ≥ 4, 5 below: the 5 are fewer than k = 10.
        assert_eq!(node_answer(&ctx, share, 10).await.1, 1);
        assert_eq!(
            node_answer(&ctx, share, 5).await,
            (vec!["20".to_string()], 0)
        );
    }

    #[tokio::test]
    async fn arguments_that_can_single_out_a_value_are_refused_in_k_only_mode() {
        let ctx = twenty();
        for sql in [
            // LN(SUM(EXP(100·x)))/100 is MAX(x)
            "SELECT ROUND(LN(SUM(EXP(100 * trust))) / 100) FROM experience",
            "SELECT SUM(greatest(trust, 3, 4)) FROM experience",
            "SELECT SUM(trust * date_part('day', response_date)) FROM experience",
            "SELECT SUM(trust * trust * trust) FROM experience",
            "SELECT AVG(CASE WHEN trust > 3 THEN CASE WHEN state = 'WY' THEN trust END END) FROM experience",
            "SELECT SUM(CAST(state = 'WY' AS INT) * trust) FROM experience",
            "SELECT SUM(trust / trust) FROM experience",
        ] {
            let q = approve(&ctx.state(), sql).await.expect("approve");
            match q.k_partial() {
                Err(QueryError::Rejected(r)) => {
                    assert_eq!(r.rule, Rule::ArgumentNotAllowed, "{sql}: {r}");
                    assert!(r.position.is_some(), "{sql}");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn row_counts_bound_people_and_fall_back_when_undecided() {
        let ctx = twenty();
        let q = approve(
            &ctx.state(),
            "SELECT agency, COUNT(*), AVG(trust) FILTER (WHERE trust >= 4) FROM experience GROUP BY agency",
        )
        .await
        .expect("approve");
        let kp = q.k_partial().expect("k partial");
        let rows = ctx
            .execute_logical_plan(kp.counting_rows.clone())
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        let exact = ctx
            .execute_logical_plan(kp.exact.clone())
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        assert_eq!(rows[0].schema(), exact[0].schema(), "same shape");
        // One row per person: the bounds are the exact counts.
        let bounded = lower_bounds(&rows, &kp.support_columns, 1, 10)
            .expect("bounds")
            .expect("decided");
        assert_eq!(bounded, exact);
        // Two rows per person at most: 15 rows bound 8 people, below k = 10 → count exactly.
        assert!(
            lower_bounds(&rows, &kp.support_columns, 2, 10)
                .expect("bounds")
                .is_none()
        );
        // 20 rows, R = 2 → at least 10 people: decided, and never above the truth.
        let bounded = lower_bounds(&rows, &kp.support_columns, 2, 7)
            .expect("bounds")
            .expect("decided");
        for name in &kp.support_columns {
            let got = bounded[0].column_by_name(name).expect("col");
            let want = exact[0].column_by_name(name).expect("col");
            let (got, want) = (
                got.as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("int")
                    .value(0),
                want.as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("int")
                    .value(0),
            );
            assert!(got <= want && got >= 7, "{name}: {got} vs {want}");
        }
    }

    #[tokio::test]
    async fn the_coordinator_checks_cells_summed_over_nodes() {
        // Two nodes, each with 6 people in WY among 20: each passes its own k = 5.
        let node = |prefix: &str| {
            let people: Vec<String> = (0..20).map(|i| format!("{prefix}{i}")).collect();
            let people: Vec<&str> = people.iter().map(String::as_str).collect();
            let state: Vec<&str> = (0..20).map(|i| if i < 6 { "WY" } else { "VA" }).collect();
            context(
                vec![batch(
                    Table::Experience,
                    &[
                        ("person_id", all(&people)),
                        ("agency", all(&vec!["SSA"; 20])),
                        ("state", all(&state)),
                        ("trust", all(&vec!["3"; 20])),
                    ],
                )],
                vec![],
            )
        };
        let sql = "SELECT agency, SUM(trust) FILTER (WHERE state = 'WY') AS wy FROM experience GROUP BY agency";
        let mut partials = Vec::new();
        for ctx in [node("a"), node("b")] {
            let q = approve(&ctx.state(), sql).await.expect("approve");
            let rows = ctx
                .execute_logical_plan(q.partial_plan().expect("plan"))
                .await
                .expect("plan")
                .collect()
                .await
                .expect("run");
            let (kept, _) = suppress(&rows, 5).expect("suppress");
            let (kept, withheld) =
                suppress_cells(&kept, &q.cells(&Part::VALUES).expect("cells"), 5).expect("cells");
            assert_eq!(withheld, 0);
            partials.extend(kept);
        }
        let coordinator = context(vec![], vec![]);
        let q = approve(&coordinator.state(), sql).await.expect("approve");
        let merged = q
            .merge(&coordinator, partials.clone(), 10)
            .await
            .expect("merge");
        assert_eq!(
            merged.suppressed_cells, 0,
            "12 people in WY across the nodes"
        );
        assert_eq!(
            array_value_to_string(merged.batches[0].column(1), 0).expect("fmt"),
            "36"
        );
        let merged = q.merge(&coordinator, partials, 20).await.expect("merge");
        assert_eq!(merged.suppressed_cells, 1, "12 < 20");
        assert!(merged.batches[0].column(1).is_null(0));
    }
}
