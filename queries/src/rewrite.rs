//! Splitting an [`ApprovedQuery`] into per-node partial aggregates, and merging them back.
//!
//! ```text
//!  node:         SELECT g AS __g0.., COUNT/SUM/SUM-of-squares AS __aI_{n,s,q},
//!                       COUNT(DISTINCT person_id) AS __persons
//!                FROM <the query's FROM/JOIN/WHERE> GROUP BY g
//!                → drop groups with __persons < node k            (suppress)
//!  coordinator:  SUM every partial column per group              (merge)
//!                → drop groups with Σ __persons < federation k
//!                → final values (AVG = s/n, VAR = (q - s²/n)/(n-1) ...)
//!                → the query's own HAVING, SELECT, ORDER BY, LIMIT
//! ```
//!
//! Partials are SQL-level sums and counts defined here, never DataFusion's internal
//! accumulator states (which for DISTINCT are lists of raw values).

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;
use datafusion::functions::math::expr_fn::sqrt;
use datafusion::functions_aggregate::{count::count_udaf, sum::sum_udaf};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, cast, col, lit, when,
};

use crate::validate::{AggKind, ApprovedQuery, QueryError};

/// Name of the distinct-person count every partial group carries.
pub const PERSONS: &str = "__persons";

fn group_name(j: usize) -> String {
    format!("__g{j}")
}

fn part_name(i: usize, part: char) -> String {
    format!("__a{i}_{part}")
}

fn agg(func: Arc<datafusion::logical_expr::AggregateUDF>, arg: Expr, distinct: bool, filter: Option<Box<Expr>>) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(func, vec![arg], distinct, filter, vec![], None))
}

fn aggregate_parts(e: &Expr) -> Result<&AggregateFunction, QueryError> {
    match e {
        Expr::Alias(a) => aggregate_parts(&a.expr),
        Expr::AggregateFunction(af) => Ok(af),
        other => Err(QueryError::Internal(format!("not an aggregate: {other}"))),
    }
}

impl ApprovedQuery {
    /// The plan each node runs on its own data: one row per group with the partial sums and
    /// counts, and the group's distinct-person count. Never includes HAVING, ORDER BY or LIMIT.
    pub fn partial_plan(&self) -> Result<LogicalPlan, QueryError> {
        let input = Arc::clone(&self.aggregate.input);
        let schema = input.schema();
        let groups: Vec<Expr> = self
            .aggregate
            .group_expr
            .iter()
            .enumerate()
            .map(|(j, g)| g.clone().unalias().alias(group_name(j)))
            .collect();
        let mut aggs = Vec::new();
        for (i, (e, kind)) in self.aggregate.aggr_expr.iter().zip(&self.kinds).enumerate() {
            let af = aggregate_parts(e)?;
            let filter = af.params.filter.clone();
            let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
            let as_f64 = |x: Expr| -> Result<Expr, QueryError> {
                let ty = x.get_type(schema.as_ref())?;
                Ok(if ty == DataType::Float64 { x } else { cast(x, DataType::Float64) })
            };
            match kind {
                AggKind::Count => {
                    aggs.push(agg(count_udaf(), arg, false, filter).alias(part_name(i, 'n')));
                }
                AggKind::CountPersons => {
                    aggs.push(agg(count_udaf(), arg, true, filter).alias(part_name(i, 'n')));
                }
                AggKind::Sum => {
                    aggs.push(agg(sum_udaf(), arg, false, filter).alias(part_name(i, 's')));
                }
                AggKind::Avg => {
                    aggs.push(agg(count_udaf(), arg.clone(), false, filter.clone()).alias(part_name(i, 'n')));
                    aggs.push(agg(sum_udaf(), as_f64(arg)?, false, filter).alias(part_name(i, 's')));
                }
                AggKind::Variance { .. } | AggKind::Stddev { .. } => {
                    let x = as_f64(arg.clone())?;
                    aggs.push(agg(count_udaf(), arg, false, filter.clone()).alias(part_name(i, 'n')));
                    aggs.push(agg(sum_udaf(), x.clone(), false, filter.clone()).alias(part_name(i, 's')));
                    aggs.push(agg(sum_udaf(), x.clone() * x, false, filter).alias(part_name(i, 'q')));
                }
            }
        }
        aggs.push(agg(count_udaf(), Expr::Column(self.person.clone()), true, None).alias(PERSONS));
        Ok(LogicalPlan::Aggregate(Aggregate::try_new(input, groups, aggs)?))
    }

    /// The Arrow schema of the partial batches every node must return.
    pub fn partial_schema(&self) -> Result<SchemaRef, QueryError> {
        Ok(Arc::new(self.partial_plan()?.schema().as_arrow().clone()))
    }

    /// Checks that a peer's partial batch has exactly the partial schema (names and types).
    /// Peers are untrusted: anything else is refused.
    pub fn check_partial(&self, batch_schema: &SchemaRef) -> Result<(), String> {
        let expected = self.partial_schema().map_err(|e| e.to_string())?;
        let same = expected.fields().len() == batch_schema.fields().len()
            && expected
                .fields()
                .iter()
                .zip(batch_schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if same {
            Ok(())
        } else {
            Err(format!("partial result has schema {batch_schema:?}, expected {expected:?}"))
        }
    }

    /// Merges every node's partial batches, withholds groups whose summed distinct-person count
    /// is below `k`, and applies the query's own projection, HAVING, ORDER BY and LIMIT.
    pub async fn merge(&self, ctx: &SessionContext, partials: Vec<RecordBatch>, k: u64) -> Result<Merged, QueryError> {
        let partial_schema = self.partial_schema()?;
        for b in &partials {
            self.check_partial(&b.schema()).map_err(QueryError::Internal)?;
        }
        // 1. Sum the partial columns per group.
        let mem = MemTable::try_new(Arc::clone(&partial_schema), vec![partials])?;
        let n_groups = self.aggregate.group_expr.len();
        let group_cols: Vec<Expr> = (0..n_groups).map(|j| col(group_name(j))).collect();
        let sums: Vec<Expr> = partial_schema.fields()[n_groups..]
            .iter()
            .map(|f| agg(sum_udaf(), col(f.name()), false, None).alias(f.name()))
            .collect();
        let plan = LogicalPlanBuilder::scan("partials", provider_as_source(Arc::new(mem)), None)?
            .aggregate(group_cols, sums)?
            .build()?;
        let merged_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let merged = ctx.execute_logical_plan(plan).await?.collect().await?;

        // 2. Federation k.
        let (kept, suppressed_groups) = suppress(&merged, k)?;

        // 3. Final values under the original aggregate's names, then the query's upper plan.
        let mem = MemTable::try_new(merged_schema, vec![kept])?;
        let scan = LogicalPlanBuilder::scan("merged", provider_as_source(Arc::new(mem)), None)?.build()?;
        let scan_schema = Arc::clone(scan.schema());
        let agg_schema = Arc::clone(&self.aggregate.schema);
        let mut finals = Vec::with_capacity(agg_schema.fields().len());
        for (idx, (qualifier, field)) in agg_schema.iter().enumerate() {
            let value = if idx < n_groups {
                col(group_name(idx))
            } else {
                let i = idx - n_groups;
                let value = final_value(self.kinds[i], i)?;
                let ty = value.get_type(scan_schema.as_ref())?;
                if &ty == field.data_type() { value } else { cast(value, field.data_type().clone()) }
            };
            finals.push(value.alias_qualified(qualifier.cloned(), field.name()));
        }
        let mut plan = LogicalPlanBuilder::from(scan).project(finals)?.build()?;
        for node in self.upper.iter().rev() {
            plan = node.with_new_exprs(node.expressions(), vec![plan])?;
        }
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
        Ok(Merged { schema, batches, suppressed_groups })
    }
}

/// The final value of aggregate `i` from its summed partials.
fn final_value(kind: AggKind, i: usize) -> datafusion::error::Result<Expr> {
    let n = || col(part_name(i, 'n'));
    let s = || cast(col(part_name(i, 's')), DataType::Float64);
    let q = || cast(col(part_name(i, 'q')), DataType::Float64);
    let nf = || cast(n(), DataType::Float64);
    let variance = |population: bool| -> datafusion::error::Result<Expr> {
        // Σ(x - mean)² = q - s²/n, clamped at 0 against rounding.
        let v = q() - s() * s() / nf();
        let ss = when(v.clone().lt(lit(0.0)), lit(0.0)).otherwise(v)?;
        let (min_n, denom) = if population { (0i64, nf()) } else { (1i64, nf() - lit(1.0)) };
        when(n().gt(lit(min_n)), ss / denom).end()
    };
    Ok(match kind {
        AggKind::Count | AggKind::CountPersons => n(),
        AggKind::Sum => col(part_name(i, 's')),
        AggKind::Avg => when(n().gt(lit(0i64)), s() / nf()).end()?,
        AggKind::Variance { population } => variance(population)?,
        AggKind::Stddev { population } => sqrt(variance(population)?),
    })
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
}

/// Keeps the rows whose [`PERSONS`] count is at least `k`; returns them and how many were
/// dropped. Used by nodes (own k) and by the coordinator (federation k).
pub fn suppress(batches: &[RecordBatch], k: u64) -> Result<(Vec<RecordBatch>, u64), QueryError> {
    let mut kept = Vec::with_capacity(batches.len());
    let mut dropped = 0u64;
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    for b in batches {
        let idx = b.schema().index_of(PERSONS).map_err(|e| QueryError::Internal(e.to_string()))?;
        let persons = b
            .column(idx)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| QueryError::Internal(format!("{PERSONS} is not Int64")))?;
        let mask: BooleanArray =
            (0..persons.len()).map(|r| Some(persons.is_valid(r) && persons.value(r) >= k)).collect();
        dropped += mask.false_count() as u64;
        kept.push(filter_record_batch(b, &mask).map_err(|e| QueryError::Internal(e.to_string()))?);
    }
    Ok((kept, dropped))
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
        let schema = Table::Experience.arrow_schema();
        let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from((0..rows).map(|i| Some(f(i))).collect::<Vec<_>>()))
        };
        let score = |salt: usize| -> ArrayRef {
            Arc::new(Int8Array::from(
                (0..rows).map(|i| if (i + salt) % 17 == 0 { None } else { Some(((i * 7 + salt * 3 + s) % 5 + 1) as i8) }).collect::<Vec<_>>(),
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
            Arc::new(Date32Array::from((0..rows).map(|i| Some(20_000 + (i % 200) as i32)).collect::<Vec<_>>())),
            score(0),
            score(1),
            score(2),
            score(3),
            score(4),
            score(5),
            score(6),
        ];
        RecordBatch::try_new(schema, columns).expect("batch")
    }

    fn operational(s: usize, rows: usize) -> RecordBatch {
        let schema = Table::Operational.arrow_schema();
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
            Arc::new(Int32Array::from((0..rows).map(|i| if i % 11 == 0 { None } else { Some(((i * 37 + s) % 240) as i32) }).collect::<Vec<_>>())),
            Arc::new(Int32Array::from((0..rows).map(|i| Some(((i * 13) % 90) as i32)).collect::<Vec<_>>())),
            Arc::new(arrow::array::BooleanArray::from((0..rows).map(|i| Some(i % 3 == 0)).collect::<Vec<_>>())),
            Arc::new(arrow::array::BooleanArray::from((0..rows).map(|i| Some(i % 10 == 0)).collect::<Vec<_>>())),
            Arc::new(StringArray::from((0..rows).map(|i| Some(crate::schema::OUTCOMES[i % 4])).collect::<Vec<_>>())),
        ];
        RecordBatch::try_new(schema, columns).expect("batch")
    }

    fn context(shards: &[usize]) -> SessionContext {
        let ctx = SessionContext::new_with_config(session_config());
        register_functions(&ctx);
        let exp: Vec<RecordBatch> = shards.iter().map(|&s| experience(s, 240)).collect();
        let op: Vec<RecordBatch> = shards.iter().map(|&s| operational(s, 240)).collect();
        ctx.register_table("experience", Arc::new(MemTable::try_new(Table::Experience.arrow_schema(), vec![exp]).expect("mem")))
            .expect("register");
        ctx.register_table("operational", Arc::new(MemTable::try_new(Table::Operational.arrow_schema(), vec![op]).expect("mem")))
            .expect("register");
        ctx
    }

    fn render(batches: &[RecordBatch]) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                rows.push(b.columns().iter().map(|c| array_value_to_string(c, r).expect("fmt")).collect());
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
            let expected = pooled.sql(sql).await.expect("pooled").collect().await.expect("pooled");
            let mut partials = Vec::new();
            for ctx in &shards {
                let q = approve(&ctx.state(), sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
                let batches = ctx.execute_logical_plan(q.partial_plan().expect("partial")).await.expect("run").collect().await.expect("collect");
                partials.extend(batches);
            }
            let coordinator = context(&[]);
            let q = approve(&coordinator.state(), sql).await.expect("approve");
            let merged = q.merge(&coordinator, partials, 1).await.expect("merge");
            let (got, want) = (render(&merged.batches), render(&expected));
            assert_eq!(got.len(), want.len(), "{sql}\n got {got:?}\nwant {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.iter().zip(w).all(|(a, b)| close(a, b)), "{sql}\n got {g:?}\nwant {w:?}");
            }
            assert_eq!(merged.suppressed_groups, 0);
        }
    }

    #[tokio::test]
    async fn suppression_counts_small_groups() {
        let ctx = context(&[0]);
        let q = approve(&ctx.state(), "SELECT state, channel, COUNT(*) FROM experience GROUP BY state, channel").await.expect("approve");
        let batches = ctx.execute_logical_plan(q.partial_plan().expect("partial")).await.expect("run").collect().await.expect("collect");
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        let (kept, dropped) = suppress(&batches, 1_000).expect("suppress");
        assert_eq!(kept.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
        assert_eq!(dropped as usize, total);
        let (kept, dropped) = suppress(&batches, 1).expect("suppress");
        assert_eq!((kept.iter().map(|b| b.num_rows()).sum::<usize>(), dropped), (total, 0));
    }
}
