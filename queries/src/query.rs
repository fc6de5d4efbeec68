//! The approved query: [`ApprovedQuery`], and the [`AggKind`] of each of its aggregates.
//!
//! Only [`approve`](crate::validate::approve) builds an `ApprovedQuery`, through the
//! crate-private `ApprovedQuery::new` that nothing else calls; its fields are private to this
//! module, so the layers above (cells, privacy, percentile, merge, explain) read what was
//! approved through accessors and can never change it. The type lives here, below the
//! aggregate modules, rather than in [`crate::validate`] because those modules take it as
//! input while `validate` calls into some of them (a percentile's arguments are recognised by
//! [`crate::percentile`]).

use std::fmt;
use std::sync::OnceLock;

use datafusion::arrow::datatypes::Field;
use datafusion::common::Column;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};

use crate::keyset::{GroupKeys, PublicKeys, TooManyPublicGroups, group_keys};
use crate::partial::{KPartial, Part, group_name};
use crate::rules::QueryError;
use crate::schema::{self, Table};

/// What one aggregate of the query computes, and so which partials it needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggKind {
    /// `COUNT(*)` or `COUNT(expr)`.
    Count,
    /// `COUNT(DISTINCT person_id)`.
    CountPersons,
    /// `SUM(expr)`.
    Sum,
    /// `AVG(expr)`.
    Avg,
    /// `VAR`/`VARIANCE` (sample) or `VAR_POP`.
    Variance {
        /// Population rather than sample.
        population: bool,
    },
    /// `STDDEV` (sample) or `STDDEV_POP`.
    Stddev {
        /// Population rather than sample.
        population: bool,
    },
    /// `MEDIAN(x)`, `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY x)` or
    /// `APPROX_PERCENTILE_CONT(x, p)`: answered in `dp` mode only, from a noisy histogram
    /// over the measure's public grid (see [`crate::percentile`]).
    Percentile {
        /// The fraction of values at or below the answer, in [0, 1] (0.5 for MEDIAN).
        p: f64,
    },
}

impl fmt::Display for AggKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AggKind::Count => "count",
            AggKind::CountPersons => "count distinct persons",
            AggKind::Sum => "sum",
            AggKind::Avg => "avg",
            AggKind::Variance { population: false } => "var",
            AggKind::Variance { population: true } => "var_pop",
            AggKind::Stddev { population: false } => "stddev",
            AggKind::Stddev { population: true } => "stddev_pop",
            AggKind::Percentile { p } => return write!(f, "percentile({p})"),
        };
        f.write_str(s)
    }
}

impl AggKind {
    /// The parts a partial carries for an aggregate of this kind (see [`crate::partial`]):
    /// count, and sums where the kind needs them. A percentile carries its histogram's
    /// buckets instead ([`crate::percentile`]).
    pub(crate) fn parts(self) -> &'static [Part] {
        match self {
            AggKind::Count | AggKind::CountPersons => &[Part::Count],
            AggKind::Sum | AggKind::Avg => &[Part::Count, Part::Sum],
            AggKind::Variance { .. } | AggKind::Stddev { .. } => &Part::VALUES,
            AggKind::Percentile { .. } => &[],
        }
    }
}

/// A query that passed every rule. Only an `ApprovedQuery` can be turned into a partial plan
/// or merged (see [`crate::cells`], [`crate::privacy`] and [`crate::merge`]).
#[derive(Debug, Clone)]
pub struct ApprovedQuery {
    sql: String,
    plan: LogicalPlan,
    /// Plan nodes above the aggregate, top first.
    upper: Vec<LogicalPlan>,
    aggregate: Aggregate,
    kinds: Vec<AggKind>,
    person: Column,
    /// The `k-only` partial plans, built once on first use (the coordinator checks every
    /// partial against them; see [`ApprovedQuery::cached_k_partial`]).
    k_partial: OnceLock<KPartial>,
}

impl ApprovedQuery {
    /// The approved query of `sql`: its (hardened) plan, the plan nodes above its aggregate
    /// (top first), the aggregate, the kind of each aggregate and the person column under the
    /// aggregate. Called only by [`crate::validate`], once every rule has passed.
    pub(crate) fn new(
        sql: String,
        plan: LogicalPlan,
        upper: Vec<LogicalPlan>,
        aggregate: Aggregate,
        kinds: Vec<AggKind>,
        person: Column,
    ) -> Self {
        ApprovedQuery {
            sql,
            plan,
            upper,
            aggregate,
            kinds,
            person,
            k_partial: OnceLock::new(),
        }
    }

    /// The query's one aggregate node.
    pub(crate) fn aggregate(&self) -> &Aggregate {
        &self.aggregate
    }

    /// The plan nodes above the aggregate (projection, HAVING, ORDER BY, LIMIT), top first.
    pub(crate) fn upper(&self) -> &[LogicalPlan] {
        &self.upper
    }

    /// The `person_id` column under the aggregate.
    pub(crate) fn person(&self) -> &Column {
        &self.person
    }

    /// The `k-only` partial plans: built by `build` on first use, then the same every time.
    pub(crate) fn cached_k_partial(
        &self,
        build: impl FnOnce() -> Result<KPartial, QueryError>,
    ) -> Result<KPartial, QueryError> {
        if let Some(k) = self.k_partial.get() {
            return Ok(k.clone());
        }
        let built = build()?;
        Ok(self.k_partial.get_or_init(|| built).clone())
    }

    /// The types of the group keys, as every partial carries them (`__g{j}` is the query's own
    /// group expression).
    pub(crate) fn group_fields(&self) -> Vec<Field> {
        let n_groups = self.aggregate.group_expr.len();
        self.aggregate
            .schema
            .fields()
            .iter()
            .take(n_groups)
            .enumerate()
            .map(|(j, f)| f.as_ref().clone().with_name(group_name(j)))
            .collect()
    }
}

impl ApprovedQuery {
    /// How this query's groups are chosen in `dp` mode under `public` (see [`crate::keyset`]);
    /// a public cross product of more than `max_groups` groups is refused.
    pub fn group_keys_under(
        &self,
        public: &PublicKeys,
        max_groups: u64,
    ) -> Result<GroupKeys, TooManyPublicGroups> {
        group_keys(&self.aggregate, public, max_groups)
    }
}

impl ApprovedQuery {
    /// The SQL as the analyst wrote it.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The validated logical plan.
    pub fn plan(&self) -> &LogicalPlan {
        &self.plan
    }

    /// Output column names, in order.
    pub fn columns(&self) -> Vec<String> {
        self.plan
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    /// The tables the query reads (both for the case_id join).
    pub fn tables(&self) -> Vec<Table> {
        let mut out = Vec::new();
        let _ = self.aggregate.input.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some(t) = Table::from_name(scan.table_name.table())
                && !out.contains(&t)
            {
                out.push(t);
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        out
    }

    /// The kind of each aggregate of the query, in plan order.
    pub fn aggregate_kinds(&self) -> &[AggKind] {
        &self.kinds
    }

    /// The grouping expressions, as text.
    pub fn group_keys(&self) -> Vec<String> {
        self.aggregate
            .group_expr
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    /// The output names of the aggregates, in plan order.
    pub fn aggregate_names(&self) -> Vec<String> {
        let n = self.aggregate.group_expr.len();
        self.aggregate
            .schema
            .fields()
            .iter()
            .skip(n)
            .map(|f| f.name().clone())
            .collect()
    }

    /// Every CX column the query reads anywhere (select, where, join, group, having, order),
    /// for steward policies that hide dimensions.
    pub fn referenced_columns(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let _ = self.plan.apply_with_subqueries(|node| {
            for e in node.expressions() {
                let _ = e.apply(|x| {
                    if let Expr::Column(c) = x
                        && schema::column_anywhere(&c.name).is_some()
                    {
                        out.insert(c.name.clone());
                    }
                    Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
                });
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        out
    }
}
