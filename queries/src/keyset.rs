//! Public key sets: which groups a `dp` query releases without DP partition selection.
//!
//! A group key whose possible values are known before any data is read — a schema vocabulary
//! (life experience, journey stage, channel, state, age band, outcome, survey format), a small
//! integer range (fiscal quarter), a boolean, or a list the steward declares public in
//! `[privacy.public_keys]` (fiscal years, service names, agencies) — reveals nothing by being
//! released. When every key of a query is public, a node releases every group of their cross
//! product, in one canonical order, noisy even when it holds nobody, and spends no ε or δ on
//! choosing groups (Tumult `KeySet`, PipelineDP `public_partitions`, ZetaSQL `PUBLIC_GROUPS`).
//! Rows whose key is outside a declared list are dropped (the declaration says what exists).
//! Any other key (free text, dates, expressions) keeps partition selection (see
//! [`crate::dp::partition_threshold`]).
//!
//! The set is a function of the query and the declarations only, never of the data: a
//! conjunctive `WHERE key = v`, `key IN (…)` or `key IS NOT NULL` narrows it (rows outside
//! cannot exist), and a cross product larger than the steward's cap is refused before it is
//! built.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Aggregate, BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::scalar::ScalarValue;

use crate::schema::{self, ColumnType, Domain, Kind};

/// Largest integer range of the schema treated as public without a declaration (fiscal
/// quarters 1–4 are; fiscal years 1901–2200 are not).
const MAX_SCHEMA_RANGE: i64 = 64;

/// Most values one steward declaration may list.
pub const MAX_DECLARED_VALUES: usize = 10_000;

/// The public key values a node knows: the schema's, and its steward's declarations.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublicKeys {
    /// Declared lists by column name, in the canonical value type (Utf8, Int64 or Boolean).
    declared: BTreeMap<String, Vec<ScalarValue>>,
}

/// Why a public cross product is not released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the public key set of this query ({product}) has {groups} groups, more than this node's max_groups of {cap}; narrow it with WHERE or group by fewer keys"
)]
pub struct TooManyPublicGroups {
    /// The keys and their sizes, e.g. `channel (10) × state (57)`.
    pub product: String,
    /// Groups of the cross product.
    pub groups: u128,
    /// The cap.
    pub cap: u64,
}

/// How a `dp` query's groups are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupKeys {
    /// Every key is public: release every group of this set.
    Public(KeySet),
    /// Some key is data-dependent: DP partition selection.
    DataDependent {
        /// The first such key, as written in the plan.
        key: String,
        /// Why it is not public.
        why: String,
    },
}

/// The cross product of public values of a query's group keys, in canonical order: the
/// first key varies slowest, each key's values in vocabulary (or declared) order, NULL last.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySet {
    /// Per group key: its name and its values (canonical types).
    keys: Vec<(String, Vec<ScalarValue>)>,
    /// Where each key's values come from, for explain.
    sources: Vec<&'static str>,
    len: usize,
}

impl PublicKeys {
    /// The schema's public values only.
    pub const fn schema_only() -> Self {
        PublicKeys {
            declared: BTreeMap::new(),
        }
    }

    /// The columns the steward declared, with how many values each.
    pub fn declared(&self) -> impl Iterator<Item = (&str, usize)> {
        self.declared.iter().map(|(c, v)| (c.as_str(), v.len()))
    }

    /// Declares `values` of text column `column` public. Errors say what is wrong.
    pub fn declare_text(&mut self, column: &str, values: &[String]) -> Result<(), String> {
        let c = declarable(column)?;
        if c.ty != ColumnType::Text {
            return Err(format!(
                "{column} is not a text column; give an integer range \"lo..hi\""
            ));
        }
        check_count(values.len())?;
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let ok = match c.domain {
                Domain::Vocabulary(words) => words.contains(&v.as_str()),
                Domain::Agency => {
                    (2..=12).contains(&v.len())
                        && v.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                }
                _ => !v.is_empty() && v.chars().count() <= 120 && !v.chars().any(char::is_control),
            };
            if !ok {
                return Err(format!("{v:?} is not a possible value of {column}"));
            }
            let s = ScalarValue::Utf8(Some(v.clone()));
            if out.contains(&s) {
                return Err(format!("{v:?} is listed twice"));
            }
            out.push(s);
        }
        self.declared.insert(column.to_string(), out);
        Ok(())
    }

    /// Declares the integers `lo..=hi` of integer column `column` public.
    pub fn declare_range(&mut self, column: &str, lo: i64, hi: i64) -> Result<(), String> {
        let c = declarable(column)?;
        let (min, max) = match (c.ty, c.domain) {
            (ColumnType::Int8 | ColumnType::Int32, Domain::Range(a, b)) => (a, b),
            _ => return Err(format!("{column} is not an integer dimension")),
        };
        if lo > hi || lo < min || hi > max {
            return Err(format!(
                "{lo}..{hi} is not a range within {column}'s {min}..{max}"
            ));
        }
        check_count(usize::try_from(hi - lo + 1).unwrap_or(usize::MAX))?;
        self.declared.insert(
            column.to_string(),
            (lo..=hi).map(|v| ScalarValue::Int64(Some(v))).collect(),
        );
        Ok(())
    }

    /// The public values of a column with the schema's `column`, or why it has none.
    pub(crate) fn values_of(
        &self,
        column: &'static schema::Column,
    ) -> Result<(Vec<ScalarValue>, &'static str), String> {
        let mut values = match self.declared.get(column.name) {
            Some(v) => (v.clone(), "declared public by the steward"),
            None => match (column.ty, column.domain) {
                (_, Domain::Vocabulary(words)) => (
                    words
                        .iter()
                        .map(|w| ScalarValue::Utf8(Some((*w).to_string())))
                        .collect(),
                    "the schema's vocabulary",
                ),
                (ColumnType::Bool, _) => (
                    vec![
                        ScalarValue::Boolean(Some(false)),
                        ScalarValue::Boolean(Some(true)),
                    ],
                    "boolean",
                ),
                (_, Domain::Range(lo, hi)) if hi - lo < MAX_SCHEMA_RANGE => (
                    (lo..=hi).map(|v| ScalarValue::Int64(Some(v))).collect(),
                    "the schema's range",
                ),
                _ => {
                    return Err(format!(
                        "its values depend on the data (declare them in [privacy.public_keys] {} to release every group)",
                        column.name
                    ));
                }
            },
        };
        if !column.required {
            values.0.push(null_of(column.ty));
        }
        Ok(values)
    }
}

fn declarable(column: &str) -> Result<&'static schema::Column, String> {
    match schema::column_anywhere(column) {
        Some(c) if c.kind == Kind::Dimension => Ok(c),
        Some(_) => Err(format!(
            "{column} is not a dimension (only dimensions are group keys)"
        )),
        None => Err(format!("{column} is not a column of the CX schema")),
    }
}

fn check_count(n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("lists no value".into());
    }
    if n > MAX_DECLARED_VALUES {
        return Err(format!("lists {n} values, more than {MAX_DECLARED_VALUES}"));
    }
    Ok(())
}

/// The canonical type of a column's key values: text, integers as Int64, booleans.
fn canonical_type(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::Int8 | ColumnType::Int32 => DataType::Int64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Text | ColumnType::Date => DataType::Utf8,
    }
}

fn null_of(ty: ColumnType) -> ScalarValue {
    ScalarValue::try_from(&canonical_type(ty)).unwrap_or(ScalarValue::Null)
}

impl KeySet {
    /// Groups in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty (a WHERE that no public value satisfies).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Index of `key` (canonical scalars, one per group key) in the canonical order.
    pub fn index_of(&self, key: &[ScalarValue]) -> Option<usize> {
        let mut index = 0usize;
        for ((_, values), v) in self.keys.iter().zip(key) {
            let pos = values.iter().position(|x| x == v)?;
            index = index * values.len() + pos;
        }
        Some(index)
    }

    /// Casts group column `j` of a partial to the canonical type, so rows can be looked up.
    pub fn canonical_column(&self, j: usize, column: &ArrayRef) -> Result<ArrayRef, String> {
        let ty = self.keys[j]
            .1
            .first()
            .map_or(DataType::Utf8, ScalarValue::data_type);
        arrow::compute::cast(column, &ty).map_err(|e| e.to_string())
    }

    /// Column `j` of the dense set in canonical order, cast to `ty`.
    pub fn column(&self, j: usize, ty: &DataType) -> Result<ArrayRef, String> {
        let inner: usize = self.keys[j + 1..].iter().map(|(_, v)| v.len()).product();
        let values = &self.keys[j].1;
        let repeated = (0..self.len).map(|r| values[(r / inner.max(1)) % values.len()].clone());
        let array = ScalarValue::iter_to_array(repeated).map_err(|e| e.to_string())?;
        if array.data_type() == ty {
            Ok(array)
        } else {
            arrow::compute::cast(&array, ty).map_err(|e| e.to_string())
        }
    }

    /// The product, e.g. `channel (10, the schema's vocabulary) × fiscal_year (4, declared
    /// public by the steward)`.
    pub fn describe(&self) -> String {
        if self.keys.is_empty() {
            return "no group key: the one group".into();
        }
        self.keys
            .iter()
            .zip(&self.sources)
            .map(|((name, values), source)| format!("{name} ({}, {source})", values.len()))
            .collect::<Vec<_>>()
            .join(" × ")
    }
}

/// How the groups of `aggregate` (an approved query's aggregate) are chosen in `dp` mode
/// under `public` (see the module docs); a public cross product of more than `max_groups`
/// groups is refused. Callers use [`ApprovedQuery::group_keys_under`](crate::query::ApprovedQuery::group_keys_under).
pub fn group_keys(
    aggregate: &Aggregate,
    public: &PublicKeys,
    max_groups: u64,
) -> Result<GroupKeys, TooManyPublicGroups> {
    {
        let narrowing = narrowing(&aggregate.input);
        let mut keys = Vec::new();
        let mut sources = Vec::new();
        for e in &aggregate.group_expr {
            let c = match e.clone().unalias() {
                Expr::Column(c) => c,
                other => {
                    return Ok(GroupKeys::DataDependent {
                        key: other.to_string(),
                        why: "an expression's values depend on the data".into(),
                    });
                }
            };
            let Some(column) = schema::column_anywhere(&c.name) else {
                return Ok(GroupKeys::DataDependent {
                    key: c.name.clone(),
                    why: "not a column of the CX schema".into(),
                });
            };
            let (mut values, source) = match public.values_of(column) {
                Ok(v) => v,
                Err(why) => {
                    return Ok(GroupKeys::DataDependent {
                        key: c.name.clone(),
                        why,
                    });
                }
            };
            for allowed in narrowing.iter().filter(|(nc, _)| *nc == c).map(|(_, a)| a) {
                values.retain(|v| allowed.admits(v));
            }
            keys.push((c.name.clone(), values));
            sources.push(source);
        }
        let groups = keys
            .iter()
            .map(|(_, v)| v.len() as u128)
            .try_fold(1u128, u128::checked_mul)
            .unwrap_or(u128::MAX);
        let set = KeySet {
            len: usize::try_from(groups).unwrap_or(usize::MAX),
            keys,
            sources,
        };
        if groups > u128::from(max_groups) {
            return Err(TooManyPublicGroups {
                product: set.describe(),
                groups,
                cap: max_groups,
            });
        }
        Ok(GroupKeys::Public(set))
    }
}

/// What a conjunct of a WHERE allows one column to be.
enum Allowed {
    /// One of these values (literals, canonical types).
    Values(Vec<ScalarValue>),
    /// Anything but NULL.
    NotNull,
}

impl Allowed {
    fn admits(&self, v: &ScalarValue) -> bool {
        match self {
            Allowed::NotNull => !v.is_null(),
            Allowed::Values(list) => {
                !v.is_null()
                    && list
                        .iter()
                        .any(|l| l.cast_to(&v.data_type()).is_ok_and(|l| l == *v))
            }
        }
    }
}

/// The column restrictions of every conjunct of every filter below the aggregate.
fn narrowing(input: &Arc<LogicalPlan>) -> Vec<(Column, Allowed)> {
    let mut out = Vec::new();
    let _ = input.apply(|node| {
        if let LogicalPlan::Filter(f) = node {
            for conjunct in split_and(&f.predicate) {
                if let Some(r) = restriction(conjunct) {
                    out.push(r);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

fn split_and(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_and(left);
            v.extend(split_and(right));
            v
        }
        other => vec![other],
    }
}

/// `col = lit`, `lit = col`, `col IN (lits)` or `col IS NOT NULL` (through casts).
fn restriction(e: &Expr) -> Option<(Column, Allowed)> {
    fn column(e: &Expr) -> Option<&Column> {
        match e {
            Expr::Column(c) => Some(c),
            Expr::Cast(c) => column(&c.expr),
            Expr::TryCast(c) => column(&c.expr),
            _ => None,
        }
    }
    fn literal(e: &Expr) -> Option<ScalarValue> {
        match e {
            Expr::Literal(v, _) if !v.is_null() => Some(v.clone()),
            Expr::Cast(c) => literal(&c.expr),
            Expr::TryCast(c) => literal(&c.expr),
            _ => None,
        }
    }
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (column(left), column(right)) {
            (Some(c), None) => Some((c.clone(), Allowed::Values(vec![literal(right)?]))),
            (None, Some(c)) => Some((c.clone(), Allowed::Values(vec![literal(left)?]))),
            _ => None,
        },
        Expr::InList(list) if !list.negated => {
            let c = column(&list.expr)?;
            let values: Option<Vec<ScalarValue>> = list.list.iter().map(literal).collect();
            Some((c.clone(), Allowed::Values(values?)))
        }
        Expr::IsNotNull(x) => Some((column(x)?.clone(), Allowed::NotNull)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;
    use crate::validate::approve;

    async fn keys(sql: &str, public: &PublicKeys) -> Result<GroupKeys, TooManyPublicGroups> {
        keys_capped(sql, public, 10_000).await
    }

    async fn keys_capped(
        sql: &str,
        public: &PublicKeys,
        cap: u64,
    ) -> Result<GroupKeys, TooManyPublicGroups> {
        let ctx = planning_context().expect("ctx");
        let q = approve(&ctx.state(), sql).await.expect("approve");
        q.group_keys_under(public, cap)
    }

    fn public_set(k: Result<GroupKeys, TooManyPublicGroups>) -> KeySet {
        match k {
            Ok(GroupKeys::Public(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn vocabularies_are_public_and_cross() {
        let p = PublicKeys::schema_only();
        let s = public_set(
            keys(
                "SELECT life_experience, journey_stage, channel, AVG(trust) FROM experience GROUP BY life_experience, journey_stage, channel",
                &p,
            )
            .await,
        );
        let n =
            schema::LIFE_EXPERIENCES.len() * schema::JOURNEY_STAGES.len() * schema::CHANNELS.len();
        assert_eq!(s.len(), n);
        // Canonical order: the first key varies slowest.
        let first = ScalarValue::Utf8(Some(schema::LIFE_EXPERIENCES[0].into()));
        let stage = ScalarValue::Utf8(Some(schema::JOURNEY_STAGES[0].into()));
        let ch = |i: usize| ScalarValue::Utf8(Some(schema::CHANNELS[i].into()));
        assert_eq!(s.index_of(&[first.clone(), stage.clone(), ch(0)]), Some(0));
        assert_eq!(s.index_of(&[first, stage, ch(1)]), Some(1));
        let col = s.column(2, &DataType::Utf8).expect("column");
        assert_eq!(col.len(), n);
        // A nullable key adds NULL; booleans and small ranges are public.
        let s = public_set(
            keys(
                "SELECT state, fiscal_quarter, first_contact_resolved, COUNT(*) FROM operational GROUP BY state, fiscal_quarter, first_contact_resolved",
                &p,
            )
            .await,
        );
        assert_eq!(s.len(), (schema::STATES.len() + 1) * 4 * 3);
        assert!(
            s.describe()
                .contains("fiscal_quarter (4, the schema's range)")
        );
    }

    #[tokio::test]
    async fn data_dependent_keys_keep_partition_selection() {
        let p = PublicKeys::schema_only();
        for (sql, key) in [
            (
                "SELECT service, COUNT(*) FROM experience GROUP BY service",
                "service",
            ),
            (
                "SELECT agency, channel, COUNT(*) FROM experience GROUP BY agency, channel",
                "agency",
            ),
            (
                "SELECT fiscal_year, COUNT(*) FROM experience GROUP BY fiscal_year",
                "fiscal_year",
            ),
            (
                "SELECT date_trunc('month', response_date), COUNT(*) FROM experience GROUP BY 1",
                "date_trunc",
            ),
        ] {
            match keys(sql, &p).await {
                Ok(GroupKeys::DataDependent { key: k, .. }) => {
                    assert!(k.contains(key), "{sql}: {k}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn declarations_make_keys_public() {
        let mut p = PublicKeys::schema_only();
        p.declare_text("agency", &["SSA".into(), "CMS".into()])
            .expect("agency");
        p.declare_range("fiscal_year", 2023, 2026).expect("years");
        let s = public_set(
            keys(
                "SELECT agency, fiscal_year, COUNT(*) FROM experience GROUP BY agency, fiscal_year",
                &p,
            )
            .await,
        );
        assert_eq!(s.len(), 2 * 4);
        assert!(s.describe().contains("declared public by the steward"));
        assert!(p.declare_text("agency", &["ssa".into()]).is_err());
        assert!(p.declare_text("trust", &["1".into()]).is_err());
        assert!(p.declare_text("person_id", &["x".into()]).is_err());
        assert!(p.declare_range("fiscal_year", 1800, 2000).is_err());
        assert!(p.declare_range("channel", 1, 2).is_err());
        assert!(p.declare_text("service", &[]).is_err());
        assert!(
            p.declare_text("service", &["a".into(), "a".into()])
                .is_err()
        );
    }

    #[tokio::test]
    async fn where_narrows_and_the_cap_refuses() {
        let p = PublicKeys::schema_only();
        let s = public_set(
            keys(
                "SELECT channel, state, COUNT(*) FROM experience WHERE channel = 'phone' AND state IN ('WY', 'VT') GROUP BY channel, state",
                &p,
            )
            .await,
        );
        assert_eq!(s.len(), 2);
        let s = public_set(
            keys(
                "SELECT state, COUNT(*) FROM experience WHERE state IS NOT NULL GROUP BY state",
                &p,
            )
            .await,
        );
        assert_eq!(s.len(), schema::STATES.len());
        // An OR does not narrow.
        let s = public_set(
            keys(
                "SELECT channel, COUNT(*) FROM experience WHERE channel = 'phone' OR trust > 3 GROUP BY channel",
                &p,
            )
            .await,
        );
        assert_eq!(s.len(), schema::CHANNELS.len());
        let err = keys_capped(
            "SELECT state, channel, COUNT(*) FROM experience GROUP BY state, channel",
            &p,
            100,
        )
        .await
        .expect_err("too many");
        assert!(err.to_string().contains("max_groups of 100"), "{err}");
        assert!(err.product.contains("state"), "{err}");
    }

    #[tokio::test]
    async fn no_group_by_is_one_public_group() {
        let p = PublicKeys::schema_only();
        let s = public_set(keys_capped("SELECT COUNT(*) FROM experience", &p, 1).await);
        assert_eq!(s.len(), 1);
        assert_eq!(s.index_of(&[]), Some(0));
    }
}
