//! Harness for cxfed's multi-node end-to-end tests: a three-agency federation on loopback
//! (certificates from `cxfed certs dev`, data from `cxfed synth` + `cxfed ingest`, real mTLS
//! nodes), and a pooled single-process DataFusion reference over the union of the three
//! agencies' Parquet files that applies the same suppression rule.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::array_value_to_string;
use datafusion::common::Column;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, lit};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use serde_json::Value;

use cxfed::client::AnalystClient;
use cxfed::client::{QueryFailure, send_query};
use cxfed::demo::{LocalFederation, start_federation};
use cxfed_protocol::wire::{QueryRequest, QueryResponse};
use cxfed_queries::schema::Table;

pub use cxfed::demo::AGENCIES;

/// People per agency in the test federation: big enough for most groups to pass k = 10,
/// small enough that some do not.
pub const PEOPLE: usize = 3_000;
/// k of every test node.
pub const K: u64 = 10;

/// A running test federation.
pub struct Fed {
    pub dir: tempfile::TempDir,
    pub fed: LocalFederation,
    pub analyst: AnalystClient,
}

impl Fed {
    pub async fn start() -> Fed {
        Self::start_with(PEOPLE, Duration::from_secs(20)).await
    }

    pub async fn start_with(people: usize, timeout: Duration) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let fed = start_federation(dir.path(), &AGENCIES, people, K, timeout)
            .await
            .unwrap();
        let analyst =
            AnalystClient::new(&fed.tls("SSA", "analyst"), Duration::from_secs(60)).unwrap();
        Fed { dir, fed, analyst }
    }

    /// A federation whose nodes run in differential-privacy mode with `dp`.
    pub async fn start_dp(people: usize, dp: cxfed::policy::DpSettings) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let fed = cxfed::demo::start_federation_with(
            dir.path(),
            &AGENCIES,
            people,
            K,
            Duration::from_secs(30),
            Some(dp),
        )
        .await
        .unwrap();
        let analyst =
            AnalystClient::new(&fed.tls("SSA", "analyst"), Duration::from_secs(60)).unwrap();
        Fed { dir, fed, analyst }
    }

    /// A federation of the retirement journey's agencies (SSA, CMS, OPM) on linked synthetic
    /// populations (`overlap` of each agency's retirement people also at the next), with a
    /// shared linkage key; `dp` as in [`Fed::start_dp`], or `k-only` nodes.
    pub async fn start_journeys(
        people: usize,
        overlap: f64,
        dp: Option<cxfed::policy::DpSettings>,
    ) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let fed = cxfed::demo::start_journey_federation(
            dir.path(),
            cxfed::synth::journeys::Journey::Retirement,
            people,
            overlap,
            K,
            Duration::from_secs(60),
            dp,
        )
        .await
        .unwrap();
        let analyst =
            AnalystClient::new(&fed.tls("SSA", "analyst"), Duration::from_secs(60)).unwrap();
        Fed { dir, fed, analyst }
    }

    /// Sends `sql` as the SSA analyst to node `i`.
    pub async fn query_at(
        &self,
        i: usize,
        sql: &str,
        require_all: bool,
    ) -> Result<QueryResponse, QueryFailure> {
        send_query(
            &self.analyst,
            &self.fed.url(i),
            &QueryRequest::new(sql).require_all(require_all),
        )
        .await
    }

    pub async fn query(&self, sql: &str) -> Result<QueryResponse, QueryFailure> {
        self.query_at(0, sql, true).await
    }

    /// An analyst client (mTLS + request signing) of `agency`.
    pub fn analyst_of(&self, agency: &str) -> AnalystClient {
        AnalystClient::new(&self.fed.tls(agency, "analyst"), Duration::from_secs(60)).unwrap()
    }

    /// What CMS's node forwards, as coordinator, for the SSA analyst's `sql` (signed for
    /// coordinator CMS; see [`signed_partial`]): the tests' hostile coordinator is
    /// `client("CMS", "node")`.
    pub fn signed_partial(
        &self,
        query_id: &str,
        sql: &str,
        epsilon: Option<f64>,
    ) -> cxfed_protocol::wire::PartialRequest {
        signed_partial(&self.analyst, "CMS", query_id, sql, epsilon)
    }

    /// A client holding `role`'s certificate of `agency`.
    pub fn client(&self, agency: &str, role: &str) -> reqwest::Client {
        cxfed::client::http_client(&self.fed.tls(agency, role), Duration::from_secs(30)).unwrap()
    }

    /// Node `i`'s audit log as the SSA auditor fetches it (each line's hash checked).
    pub async fn audit_log(&self, i: usize) -> Vec<cxfed::audit::Entry> {
        let bytes = self.audit_bytes(i).await;
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| cxfed::audit::parse_line(l).unwrap())
            .collect()
    }

    /// Node `i`'s audit log bytes as `GET /v1/audit` sends them to the SSA auditor.
    pub async fn audit_bytes(&self, i: usize) -> Vec<u8> {
        let resp = self
            .client("SSA", "auditor")
            .get(format!("{}/v1/audit", self.fed.url(i)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap().to_vec()
    }

    /// Node `i`'s budget view, as its steward fetches it (`GET /v1/budget`).
    pub async fn budget(&self, i: usize) -> cxfed_protocol::wire::BudgetResponse {
        self.client(AGENCIES[i], "steward")
            .get(format!("{}/v1/budget", self.fed.url(i)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// ε used so far on node `i` by the SSA analyst (the one [`Fed::query`] sends as).
    pub async fn used_by_ssa_analyst(&self, i: usize) -> f64 {
        self.budget(i)
            .await
            .analysts
            .iter()
            .filter(|a| a.analyst.contains("/SSA/analyst/"))
            .map(|a| a.used)
            .sum()
    }

    pub fn data_dir(&self, agency: &str) -> std::path::PathBuf {
        self.dir.path().join("data").join(agency.to_lowercase())
    }

    /// One DataFusion session over the union of every agency's Parquet files.
    pub fn pooled(&self) -> SessionContext {
        pooled_context(self.dir.path())
    }
}

/// What the node of agency `coordinator` forwards for `analyst`'s `sql`: a partial request
/// carrying their fresh signature for that coordinator.
pub fn signed_partial(
    analyst: &AnalystClient,
    coordinator: &str,
    query_id: &str,
    sql: &str,
    epsilon: Option<f64>,
) -> cxfed_protocol::wire::PartialRequest {
    let signature = analyst
        .signer
        .sign(coordinator, sql, epsilon, true)
        .unwrap();
    cxfed_protocol::wire::PartialRequest {
        protocol: cxfed_protocol::wire::PROTOCOL_VERSION,
        query_id: query_id.into(),
        sql: sql.into(),
        analyst: analyst.signer.identity().to_string(),
        epsilon,
        require_all: true,
        signature: Some(signature),
        secagg: None,
    }
}

/// One DataFusion session over the union of every agency's Parquet files under `dir/data`.
/// One agency's own tables (its node's Parquet files), for an oracle that joins agencies.
pub fn agency_context(dir: &std::path::Path, agency: &str) -> SessionContext {
    let ctx = SessionContext::new();
    cxfed_queries::context::register_functions(&ctx);
    for table in Table::ALL {
        let d = std::fs::canonicalize(
            dir.join("data")
                .join(agency.to_lowercase())
                .join(table.name()),
        )
        .unwrap();
        let url = ListingTableUrl::parse(format!("{}/", d.display())).unwrap();
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(table.arrow_schema());
        ctx.register_table(
            table.name(),
            Arc::new(ListingTable::try_new(config).unwrap()),
        )
        .unwrap();
    }
    ctx
}

pub fn pooled_context(dir: &std::path::Path) -> SessionContext {
    let ctx = SessionContext::new();
    // Same function names as the nodes (VARIANCE is an alias cxfed adds).
    cxfed_queries::context::register_functions(&ctx);
    for table in Table::ALL {
        let urls = AGENCIES
            .iter()
            .map(|a| {
                let d = std::fs::canonicalize(
                    dir.join("data").join(a.to_lowercase()).join(table.name()),
                )
                .unwrap();
                ListingTableUrl::parse(format!("{}/", d.display())).unwrap()
            })
            .collect();
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(table.arrow_schema());
        ctx.register_table(
            table.name(),
            Arc::new(ListingTable::try_new(config).unwrap()),
        )
        .unwrap();
    }
    ctx
}

/// What the pooled reference answers for a [`Case`].
#[derive(Debug, Clone)]
pub struct Pooled {
    pub rows: Vec<Vec<Value>>,
    /// Groups withheld by nodes and by the coordinator.
    pub suppressed_groups: u64,
    /// (node, group, aggregate) cells the nodes withheld.
    pub withheld_cells: u64,
    /// Merged cells NULL because some node withheld its part.
    pub incomplete_cells: u64,
}

/// A query given by parts, so that the pooled reference can apply the same suppression.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub select: &'static str,
    pub from: &'static str,
    pub filter: Option<&'static str>,
    pub group: &'static [&'static str],
    pub having: Option<&'static str>,
    pub order: Option<&'static str>,
    pub limit: Option<u32>,
    /// Qualified person and agency columns for this FROM clause.
    pub person: &'static str,
    pub agency: &'static str,
}

impl Case {
    pub const fn new(select: &'static str, group: &'static [&'static str]) -> Case {
        Case {
            select,
            from: "experience",
            filter: None,
            group,
            having: None,
            order: None,
            limit: None,
            person: "person_id",
            agency: "agency",
        }
    }

    pub const fn joined(self) -> Case {
        Case {
            from: "experience e JOIN operational o ON e.case_id = o.case_id",
            person: "e.person_id",
            agency: "e.agency",
            ..self
        }
    }

    pub const fn on(self, table: &'static str) -> Case {
        Case {
            from: table,
            ..self
        }
    }

    pub const fn filter(self, f: &'static str) -> Case {
        Case {
            filter: Some(f),
            ..self
        }
    }

    pub const fn having(self, h: &'static str) -> Case {
        Case {
            having: Some(h),
            ..self
        }
    }

    pub const fn order(self, o: &'static str) -> Case {
        Case {
            order: Some(o),
            ..self
        }
    }

    pub const fn limit(self, l: u32) -> Case {
        Case {
            limit: Some(l),
            ..self
        }
    }

    /// The SQL the analyst sends.
    pub fn sql(&self) -> String {
        self.compose(self.filter.map(String::from), self.having.map(String::from))
    }

    fn compose(&self, filter: Option<String>, having: Option<String>) -> String {
        let mut s = format!("SELECT {} FROM {}", self.select, self.from);
        if let Some(f) = filter {
            s.push_str(&format!(" WHERE {f}"));
        }
        if !self.group.is_empty() {
            s.push_str(&format!(" GROUP BY {}", self.group.join(", ")));
        }
        if let Some(h) = having {
            s.push_str(&format!(" HAVING {h}"));
        }
        if let Some(o) = self.order {
            s.push_str(&format!(" ORDER BY {o}"));
        }
        if let Some(l) = self.limit {
            s.push_str(&format!(" LIMIT {l}"));
        }
        s
    }

    fn where_clause(&self, extra: Option<&str>) -> Option<String> {
        match (self.filter, extra) {
            (Some(f), Some(e)) => Some(format!("({f}) AND ({e})")),
            (Some(f), None) => Some(f.to_string()),
            (None, Some(e)) => Some(e.to_string()),
            (None, None) => None,
        }
    }

    /// The pooled answer after the same suppression as the federation: groups of one agency
    /// below `K` persons are dropped as a node would, cells of an agency's group whose regions
    /// hold 1 to K − 1 people are left out of their aggregate as a node would, then groups
    /// below `K` are dropped as the coordinator would. Returns the rows, the number of
    /// suppressed groups and the number of cells the nodes withheld.
    pub async fn pooled_answer(&self, ctx: &SessionContext) -> (Vec<Vec<Value>>, u64, u64) {
        let p = self.pooled_reference(ctx).await;
        (p.rows, p.suppressed_groups, p.withheld_cells)
    }

    /// [`Case::pooled_answer`] with the cells the federation releases as NULL because a node
    /// withheld its part of them (the rows already hold those NULLs).
    pub async fn pooled_reference(&self, ctx: &SessionContext) -> Pooled {
        // 1. The cells each node would withhold.
        let keys: Vec<String> = std::iter::once(self.agency.to_string())
            .chain(self.group.iter().map(|g| g.to_string()))
            .collect();
        let aliased: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS __k{i}"))
            .collect();
        let cells_sql = format!(
            "SELECT {}, COUNT(DISTINCT {}) AS __p FROM {}{} GROUP BY {}",
            aliased.join(", "),
            self.person,
            self.from,
            self.filter
                .map(|f| format!(" WHERE {f}"))
                .unwrap_or_default(),
            keys.join(", ")
        );
        let cells = collect(ctx, &cells_sql).await;
        let mut small = Vec::new();
        for b in &cells {
            for r in 0..b.num_rows() {
                let p = array_value_to_string(b.column(keys.len()), r)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
                if p < K {
                    let conds: Vec<String> = keys
                        .iter()
                        .enumerate()
                        .map(|(c, key)| {
                            let col = b.column(c);
                            if col.is_null(r) {
                                format!("({key}) IS NULL")
                            } else {
                                let v = array_value_to_string(col, r).unwrap().replace('\'', "''");
                                format!(
                                    "(({key}) IS NOT DISTINCT FROM CAST('{v}' AS {}))",
                                    sql_type(col.data_type())
                                )
                            }
                        })
                        .collect();
                    small.push(format!("({})", conds.join(" AND ")));
                }
            }
        }
        let node_suppressed = small.len() as u64;
        let exclude = (!small.is_empty()).then(|| format!("NOT {}", balanced_or(&small)));

        // 2. Groups the coordinator withholds.
        let group_sql = format!(
            "SELECT COUNT(DISTINCT {}) AS __p FROM {}{}{}",
            self.person,
            self.from,
            self.where_clause(exclude.as_deref())
                .map(|w| format!(" WHERE {w}"))
                .unwrap_or_default(),
            if self.group.is_empty() {
                String::new()
            } else {
                format!(" GROUP BY {}", self.group.join(", "))
            }
        );
        let groups = collect(ctx, &group_sql).await;
        let mut coordinator_suppressed = 0;
        for b in &groups {
            for r in 0..b.num_rows() {
                let p = array_value_to_string(b.column(0), r)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap_or(0);
                if p < K {
                    coordinator_suppressed += 1;
                }
            }
        }

        // 3. The answer itself.
        let k_rule = format!("COUNT(DISTINCT {}) >= {K}", self.person);
        let having = Some(match self.having {
            Some(h) => format!("({h}) AND {k_rule}"),
            None => k_rule,
        });
        let sql = self.compose(self.where_clause(exclude.as_deref()), having);
        let plan = ctx
            .state()
            .create_logical_plan(&sql)
            .await
            .unwrap_or_else(|e| panic!("pooled reference failed to plan {sql}: {e}"));
        let (plan, node_cells, incomplete_cells) = self.withhold_cells(ctx, plan).await;
        let batches = ctx
            .execute_logical_plan(plan)
            .await
            .unwrap_or_else(|e| panic!("pooled reference failed to plan {sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("pooled reference failed to run {sql}: {e}"));
        Pooled {
            rows: cxfed::output::rows(&batches).unwrap(),
            suppressed_groups: node_suppressed + coordinator_suppressed,
            withheld_cells: node_cells,
            incomplete_cells,
        }
    }

    /// Cells each node would withhold (k per cell: every region of rows an aggregate reads —
    /// its FILTER, a non-NULL value, each branch of a CASE — must hold 0 or ≥ K people at that
    /// node), excluded from each aggregate of `plan` with an extra FILTER. Implemented here
    /// independently of `cxfed_queries::cells`, on the pooled plan. The federation's rule for
    /// them: the merged aggregate of a group in which some node withheld its cell is NULL (not
    /// the other nodes' parts). Returns the plan, how many (node, group, aggregate) cells were
    /// withheld, and how many merged cells (of groups the federation k keeps) that rule NULLs
    /// where some other node's part was there.
    pub async fn withhold_cells(
        &self,
        ctx: &SessionContext,
        plan: LogicalPlan,
    ) -> (LogicalPlan, u64, u64) {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        let mut withheld_total = 0u64;
        let mut incomplete_total = 0u64;
        // (aggregate index, extra column index) of each aggregate with withheld node cells.
        let mut incomplete: Vec<(usize, usize)> = Vec::new();
        let mut extra: Vec<Expr> = Vec::new();
        let mut found = None;
        plan.apply(|n| {
            if let LogicalPlan::Aggregate(a) = n {
                found = Some(a.clone());
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        let Some(aggregate) = found else {
            return (plan, 0, 0);
        };
        let agency = Expr::Column(Column::from_qualified_name(self.agency));
        let mut keys = vec![agency];
        keys.extend(aggregate.group_expr.iter().cloned());
        let person = Expr::Column(Column::from_qualified_name(self.person));
        let mut new_aggs = Vec::new();
        for e in &aggregate.aggr_expr {
            let Expr::AggregateFunction(af) = e else {
                new_aggs.push(e.clone());
                continue;
            };
            let filter = af.params.filter.as_deref().cloned();
            let distinct_persons = af.func.name() == "count" && af.params.distinct;
            if distinct_persons && filter.is_none() {
                // The group's own people: ≥ K at every node that kept the group.
                new_aggs.push(e.clone());
                continue;
            }
            let regions: Vec<Expr> = if distinct_persons {
                vec![filter.clone().unwrap_or_else(|| lit(true))]
            } else {
                let arg = af.params.args.first().cloned().unwrap_or_else(|| lit(1i64));
                reference_regions(&arg)
                    .into_iter()
                    .map(|r| match &filter {
                        Some(f) => Expr::IsTrue(Box::new(f.clone())).and(r),
                        None => r,
                    })
                    .collect()
            };
            let mut small: Vec<Expr> = Vec::new();
            for region in regions {
                let count = Expr::AggregateFunction(
                    datafusion::logical_expr::expr::AggregateFunction::new_udf(
                        datafusion::functions_aggregate::count::count_udaf(),
                        vec![person.clone()],
                        true,
                        Some(Box::new(region)),
                        vec![],
                        None,
                    ),
                )
                .alias("__people");
                let names: Vec<Expr> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| k.clone().alias(format!("__k{i}")))
                    .collect();
                let per_node = LogicalPlanBuilder::from(Arc::clone(&aggregate.input))
                    .aggregate(names, vec![count])
                    .unwrap()
                    .build()
                    .unwrap();
                let rows = ctx
                    .execute_logical_plan(per_node)
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
                for b in &rows {
                    let people = b
                        .column(keys.len())
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .unwrap();
                    for r in 0..b.num_rows() {
                        let n = people.value(r) as u64;
                        if n == 0 || n >= K {
                            continue;
                        }
                        let cond = keys
                            .iter()
                            .enumerate()
                            .map(|(c, k)| {
                                let v = ScalarValue::try_from_array(b.column(c), r).unwrap();
                                Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr::new(
                                    Box::new(k.clone()),
                                    datafusion::logical_expr::Operator::IsNotDistinctFrom,
                                    Box::new(Expr::Literal(v, None)),
                                ))
                            })
                            .reduce(Expr::and)
                            .unwrap();
                        small.push(cond);
                    }
                }
            }
            if small.is_empty() {
                new_aggs.push(e.clone());
                continue;
            }
            // The same (node, group) may be small in several regions: one cell.
            small.sort_by_key(|c| format!("{c}"));
            small.dedup_by_key(|c| format!("{c}"));
            withheld_total += small.len() as u64;
            // The federation's rule: a merged cell some node withheld is NULL, never the other
            // nodes' parts alone. `flag` marks the rows of the (node, group) cells withheld.
            let flag = datafusion::logical_expr::when(
                Expr::IsTrue(Box::new(small.into_iter().reduce(Expr::or).unwrap())),
                lit(1i64),
            )
            .otherwise(lit(0i64))
            .unwrap();
            let max = datafusion::functions_aggregate::min_max::max(flag.clone());
            let min = datafusion::functions_aggregate::min_max::min(flag);
            let persons = Expr::AggregateFunction(
                datafusion::logical_expr::expr::AggregateFunction::new_udf(
                    datafusion::functions_aggregate::count::count_udaf(),
                    vec![person.clone()],
                    true,
                    None,
                    vec![],
                    None,
                ),
            );
            // Counted where the federation k keeps the group and some node that returned it
            // did not withhold the cell (otherwise there is no number to NULL).
            let counting = LogicalPlanBuilder::from(Arc::clone(&aggregate.input))
                .aggregate(
                    aggregate.group_expr.clone(),
                    vec![
                        max.clone().alias("__max"),
                        min.alias("__min"),
                        persons.alias("__p"),
                    ],
                )
                .unwrap()
                .build()
                .unwrap();
            for b in ctx
                .execute_logical_plan(counting)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
            {
                let int = |name: &str| {
                    b.column_by_name(name)
                        .unwrap()
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .unwrap()
                        .clone()
                };
                let (mx, mn, p) = (int("__max"), int("__min"), int("__p"));
                incomplete_total += (0..b.num_rows())
                    .filter(|&r| mx.value(r) == 1 && mn.value(r) == 0 && p.value(r) as u64 >= K)
                    .count() as u64;
            }
            let i = new_aggs.len();
            new_aggs.push(e.clone());
            incomplete.push((i, extra.len()));
            extra.push(max.alias(format!("__inc{i}")));
        }
        let n_keys = aggregate.group_expr.len();
        let mut all_aggs = new_aggs;
        all_aggs.extend(extra);
        let widened = LogicalPlan::Aggregate(
            datafusion::logical_expr::Aggregate::try_new(
                Arc::clone(&aggregate.input),
                aggregate.group_expr.clone(),
                all_aggs,
            )
            .unwrap(),
        );
        // Back to the aggregate's own columns, with the incomplete cells NULL.
        let projection: Vec<Expr> = aggregate
            .schema
            .iter()
            .enumerate()
            .map(|(idx, (qualifier, field))| {
                let c = Expr::Column(Column::new(qualifier.cloned(), field.name()));
                let inc = idx
                    .checked_sub(n_keys)
                    .and_then(|i| incomplete.iter().find(|(a, _)| *a == i));
                match inc {
                    None => c,
                    Some((i, _)) => datafusion::logical_expr::when(
                        Expr::Column(Column::from_name(format!("__inc{i}"))).eq(lit(1i64)),
                        Expr::Literal(ScalarValue::try_from(field.data_type()).unwrap(), None),
                    )
                    .otherwise(c)
                    .unwrap()
                    .alias_qualified(qualifier.cloned(), field.name()),
                }
            })
            .collect();
        let new = LogicalPlanBuilder::from(widened)
            .project(projection)
            .unwrap()
            .build()
            .unwrap();
        let plan = plan
            .transform_down(|n| {
                Ok(if matches!(n, LogicalPlan::Aggregate(_)) {
                    Transformed::new(new.clone(), true, TreeNodeRecursion::Jump)
                } else {
                    Transformed::no(n)
                })
            })
            .unwrap()
            .data;
        (plan, withheld_total, incomplete_total)
    }
}

/// The regions of rows an aggregate argument reads: one per non-NULL CASE branch (reached
/// when the earlier conditions are not true), or the rows where a plain argument is not NULL.
fn reference_regions(arg: &Expr) -> Vec<Expr> {
    let mut e = arg;
    while let Expr::Cast(c) = e {
        e = &c.expr;
    }
    let Expr::Case(case) = e else {
        return vec![arg.clone().is_not_null()];
    };
    let mut out = Vec::new();
    let mut earlier: Vec<Expr> = Vec::new();
    let branches = case
        .when_then_expr
        .iter()
        .map(|(w, t)| (Some((**w).clone()), (**t).clone()))
        .chain(case.else_expr.iter().map(|e| (None, (**e).clone())));
    for (when, then) in branches {
        let mut reach: Vec<Expr> = earlier
            .iter()
            .map(|c| Expr::IsNotTrue(Box::new(c.clone())))
            .collect();
        if let Some(w) = &when {
            reach.push(Expr::IsTrue(Box::new(w.clone())));
        }
        reach.push(then.clone().is_not_null());
        out.push(reach.into_iter().reduce(Expr::and).unwrap());
        if let Some(w) = when {
            earlier.push(w);
        }
    }
    out
}

/// `a OR b OR ...` as a balanced tree, so hundreds of terms do not nest hundreds deep.
fn balanced_or(terms: &[String]) -> String {
    match terms {
        [one] => one.clone(),
        _ => {
            let (l, r) = terms.split_at(terms.len() / 2);
            format!("({} OR {})", balanced_or(l), balanced_or(r))
        }
    }
}

fn sql_type(t: &arrow::datatypes::DataType) -> &'static str {
    use arrow::datatypes::DataType as D;
    match t {
        D::Date32 => "DATE",
        D::Timestamp(..) => "TIMESTAMP",
        D::Boolean => "BOOLEAN",
        D::Int8 | D::Int16 | D::Int32 | D::Int64 => "BIGINT",
        D::Float64 | D::Float32 => "DOUBLE",
        _ => "VARCHAR",
    }
}

async fn collect(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    ctx.sql(sql)
        .await
        .unwrap_or_else(|e| panic!("pooled reference failed to plan {sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("pooled reference failed to run {sql}: {e}"))
}

/// Compares two JSON rows sets: integers exactly, floats to 1e-9 relative.
pub fn assert_rows_match(context: &str, got: &[Vec<Value>], want: &[Vec<Value>]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{context}: row count\n got {got:?}\nwant {want:?}"
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{context}: row {i} width");
        for (a, b) in g.iter().zip(w) {
            let same = match (a, b) {
                (Value::Number(x), Value::Number(y)) if x.is_i64() && y.is_i64() => x == y,
                (Value::Number(x), Value::Number(y)) => {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
                }
                _ => a == b,
            };
            assert!(same, "{context}: row {i}\n got {g:?}\nwant {w:?}");
        }
    }
}
