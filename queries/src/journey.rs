//! Journey queries: the same people at two agencies, joined by a private linkage key that the
//! SQL never names. This module owns their SQL form, its validation, and the per-side,
//! per-person SQL each node runs; the private join itself (blinded linkage, intersection sums)
//! is not here. Pure: no I/O.
//!
//! ```sql
//! SELECT a.channel, b.outcome, COUNT(*) AS people, AVG(a.trust) AS trust
//! FROM ssa.experience a [LEFT] JOIN cms.operational b USING (person_id)
//! WHERE a.life_experience = 'approaching_retirement' AND b.outcome = 'approved'
//! GROUP BY a.channel, b.outcome
//! ```
//!
//! - The first table (here `a`, held by SSA) is the **value side**: it contributes each
//!   person's value of the one measure (`SUM`/`AVG`) and its group column.
//! - The second (`b`, held by CMS) is the **membership side**: it only says who is there (and
//!   in which of its groups); no aggregate reads its columns.
//! - `INNER JOIN` (or `JOIN`) counts the people at both; `LEFT JOIN` also the people at `a`
//!   but not at `b`, whose `b.` group column reads NULL.
//! - `USING (person_id)` means "the same person". The nodes' pseudonyms differ: the people are
//!   linked privately, by the linkage key, which no SQL names.
//!
//! A side's conditions say who counts as being at that side, as if they were part of the join
//! condition: under `LEFT JOIN`, `b.outcome = 'approved'` keeps the people of `a` without an
//! approved case at CMS (in the NULL cell), where plain SQL's WHERE would drop them.
//!
//! Each side's conditions (`WHERE` is a conjunction, each condition about one side) and group
//! column are checked by the ordinary rules ([`crate::validate::approve`] on a single-table
//! aggregate built for that side), so every table, identifier, function and hiding rule
//! applies; a refusal keeps its rule and reason and points into the analyst's SQL. Every
//! other shape problem is [`Rule::JourneyShape`] (`CXF-Q022`).
//!
//! **One record per person and side** (the privacy unit is the person): a side's
//! [`Side::side_sql`] groups its rows by `person_id`. A person with rows in several groups is
//! counted in the smallest group value (`MIN` in SQL order: lexicographic for text, `false`
//! before `true`; NULLs are ignored unless every row has none); a person's value is the mean of
//! their rows' measure (NULLs ignored), clipped later to the measure's bounds
//! [`Measure::lo`]`..`[`Measure::hi`]. `SUM(a.m)` is thus the sum over people of these values
//! and `AVG(a.m)` their mean, not sums over joined rows.

use std::ops::ControlFlow;

use datafusion::execution::context::SessionState;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    JoinConstraint, JoinOperator, ObjectName, Query, Select, SelectItem, SetExpr, Spanned,
    Statement, TableFactor, TableWithJoins, visit_expressions, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Span, Token, Tokenizer};

use crate::keyset::PublicKeys;
use crate::rules::QueryError;
use crate::rules::{Position, Rejection, Rule, locate_word};
use crate::schema::{self, Kind, Table};
use crate::validate;

/// A validated journey query: what each side's node computes and how the outputs are formed.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneyPlan {
    /// The first table: its people, their group and their value of the measure.
    pub value_side: Side,
    /// The second table: only who is there (and in which of its groups).
    pub member_side: Side,
    /// `LEFT JOIN`: also the people of the value side not at the membership side (their
    /// membership group reads NULL). `false`: `INNER JOIN`, the people at both.
    pub left: bool,
    /// The one measure every `SUM` and `AVG` reads, if any does.
    pub measure: Option<Measure>,
    /// The output columns, in SELECT order.
    pub outputs: Vec<Output>,
    /// The normalized SQL, see [`JourneyPlan::canonical_sql`].
    canonical: String,
}

/// One side (agency and table) of a journey query.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// The agency holding the table, uppercase (`SSA`).
    pub agency: String,
    /// The table.
    pub table: Table,
    /// The alias the analyst gave the table (normalized: lowercase unless quoted).
    pub alias: String,
    /// This side's conditions, as validated: SQL texts over the table's columns, without the
    /// alias (`life_experience = 'approaching_retirement'`); all of them hold.
    pub predicates: Vec<String>,
    /// The group column, if the side has one.
    pub group: Option<String>,
    /// The group column's public values (not NULL), in canonical order (vocabulary order,
    /// integers ascending, `false` before `true`), as text. Empty when the side has no group
    /// column: then it has one implicit group. See [`Side::cells`].
    pub group_values: Vec<String>,
    /// Whether the group column may be NULL (it is optional in the schema): then a NULL cell
    /// follows [`Side::group_values`]. On the membership side of a `LEFT JOIN`, the people not
    /// at that side fall in the NULL cell too.
    pub group_null: bool,
    /// The per-person SQL this side's node runs: one row per person (`person_id`), with the
    /// person's group `g` (the smallest of their rows' values) and, on the value side, their
    /// value `v` (the mean of their rows' measure as DOUBLE, not yet clipped); `g` and `v` are
    /// left out when the side has no group column or no measure.
    pub side_sql: String,
    /// The ordinary single-table aggregate that carried this side's conditions, group column
    /// and measure through [`validate::approve`] (`SELECT channel, COUNT(*) FROM experience
    /// WHERE … GROUP BY channel`): a node can approve it again to apply its own policy (hidden
    /// dimensions ...) to what the query reads of its table.
    pub check_sql: String,
}

impl Side {
    /// This side's cells in canonical order: each group value, then `None` (NULL) when the
    /// group column may be NULL; with no group column, the one implicit cell `None`. (On the
    /// membership side of a `LEFT JOIN` the people not at that side add a NULL cell: see
    /// [`JourneyPlan::cells`].)
    pub fn cells(&self) -> Vec<Option<String>> {
        self.cells_with_null(false)
    }

    fn cells_with_null(&self, null: bool) -> Vec<Option<String>> {
        if self.group.is_none() {
            return vec![None];
        }
        let mut out: Vec<Option<String>> = self.group_values.iter().cloned().map(Some).collect();
        if self.group_null || null {
            out.push(None);
        }
        out
    }
}

/// The measure of a journey query, and its declared bounds ([`schema::dp_bounds`]): each
/// person's value is clipped to `lo..=hi` (integer-valued measures too).
#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    /// The measure column of the value side (`trust`).
    pub column: String,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
}

/// One output column of a journey query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The value side's group column.
    GroupA {
        /// Output column name.
        name: String,
    },
    /// The membership side's group column.
    GroupB {
        /// Output column name.
        name: String,
    },
    /// `COUNT(*)`: the people in the cell.
    Count {
        /// Output column name.
        name: String,
    },
    /// `SUM(a.m)`: the sum of the cell's people's values.
    Sum {
        /// Output column name.
        name: String,
    },
    /// `AVG(a.m)`: the mean of the cell's people's values (people without a value left out).
    Avg {
        /// Output column name.
        name: String,
    },
}

impl Output {
    /// The output column name (the SELECT alias, or a default such as `count(*)`).
    pub fn name(&self) -> &str {
        match self {
            Output::GroupA { name }
            | Output::GroupB { name }
            | Output::Count { name }
            | Output::Sum { name }
            | Output::Avg { name } => name,
        }
    }
}

impl JourneyPlan {
    /// The query normalized, for logs: aliases `a` and `b`, lowercase agencies, explicit
    /// `INNER`/`LEFT JOIN`, every output named, WHERE in value-side-first order. Planning it
    /// again gives the same plan (up to the aliases).
    pub fn canonical_sql(&self) -> String {
        self.canonical.clone()
    }

    /// Every cell of the answer, known before any data is read: the cross product of the value
    /// side's cells and the membership side's (the value side's varying slowest), each as
    /// (value-side group, membership-side group). Under `LEFT JOIN` a grouped membership side
    /// always has a NULL cell (the people not at that side).
    pub fn cells(&self) -> Vec<(Option<String>, Option<String>)> {
        let member = self.member_side.cells_with_null(self.left);
        self.value_side
            .cells()
            .into_iter()
            .flat_map(|a| member.iter().map(move |b| (a.clone(), b.clone())))
            .collect()
    }
}

/// Whether `sql` looks like a journey query: it parses, and its FROM holds at least two tables
/// of which one is agency-qualified (`ssa.experience`). Cheap (no planning); the coordinator
/// routes such SQL to [`plan`], which then says precisely what is wrong with it, if anything.
pub fn is_journey(sql: &str) -> bool {
    if sql.len() > validate::MAX_SQL_BYTES {
        return false;
    }
    let Ok(statements) = Parser::parse_sql(&GenericDialect {}, sql) else {
        return false;
    };
    let [Statement::Query(query)] = statements.as_slice() else {
        return false;
    };
    let SetExpr::Select(select) = &*query.body else {
        return false;
    };
    let factors: Vec<&TableFactor> = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
        .collect();
    factors.len() >= 2 && factors.iter().any(|f| agency_qualified(f))
}

fn agency_qualified(f: &TableFactor) -> bool {
    match f {
        TableFactor::Table { name, .. } => match name.0.as_slice() {
            [_, table] => table
                .as_ident()
                .is_some_and(|t| Table::from_name(&norm(t)).is_some()),
            _ => false,
        },
        _ => false,
    }
}

/// Validates a journey query and plans it, with the schema's public values only (see
/// [`plan_with_keys`]).
pub async fn plan(state: &SessionState, sql: &str) -> Result<JourneyPlan, QueryError> {
    plan_with_keys(state, sql, &PublicKeys::schema_only()).await
}

/// Validates a journey query and plans it; a group column must have public values under
/// `public` (the schema's vocabularies, ranges and booleans, and the steward's declarations),
/// so that every cell is known before any data is read.
pub async fn plan_with_keys(
    state: &SessionState,
    sql: &str,
    public: &PublicKeys,
) -> Result<JourneyPlan, QueryError> {
    if sql.len() > validate::MAX_SQL_BYTES {
        return Err(Rejection::new(
            Rule::QueryTooLarge,
            format!(
                "the query is {} bytes; at most {} are accepted",
                sql.len(),
                validate::MAX_SQL_BYTES
            ),
        )
        .into());
    }
    let statement = validate::parse_one(state, sql)?;
    let query = match &statement {
        DFStatement::Statement(s) => match &**s {
            Statement::Query(q) => q,
            _ => {
                return Err(
                    Rejection::new(Rule::NotAQuery, "only SELECT queries are accepted").into(),
                );
            }
        },
        _ => {
            return Err(Rejection::new(Rule::NotAQuery, "only SELECT queries are accepted").into());
        }
    };
    let shape = read_shape(sql, query)?;

    // Group columns first (before the per-side rules, which would call a raw date a
    // group-by-not-allowed): a dimension or date without public values gives cells that depend
    // on the data.
    let mut values: [Option<(Vec<String>, bool)>; 2] = [None, None];
    for (i, side) in shape.sides.iter().enumerate() {
        if let Some((col, span)) = &side.group
            && let Some(c) = side.table.column(col)
            && matches!(c.kind, Kind::Dimension | Kind::Date)
        {
            values[i] = Some(group_values(public, side, c, col, *span)?);
        }
    }

    // Every ordinary rule, per side.
    let mut checks: [String; 2] = [String::new(), String::new()];
    for (i, side) in shape.sides.iter().enumerate() {
        let aggregates: &[&str] = match (&shape.measure, side.value) {
            (Some(_), true) => &["SUM", "AVG"],
            _ => &[],
        };
        let check_sql = validation_sql(
            side,
            shape.measure.as_ref().map(|m| m.0.as_str()),
            aggregates,
        );
        if let Err(e) = validate::approve(state, &check_sql).await {
            return Err(match e {
                QueryError::Rejected(r) => relocate(sql, &check_sql, &side.alias, r).into(),
                other => other,
            });
        }
        checks[i] = check_sql;
    }

    for (i, side) in shape.sides.iter().enumerate() {
        if values[i].is_none()
            && let Some((col, span)) = &side.group
        {
            let c = side.table.column(col).ok_or_else(|| {
                QueryError::Internal(format!("approved group column {col} is not in the schema"))
            })?;
            values[i] = Some(group_values(public, side, c, col, *span)?);
        }
    }

    let measure = match &shape.measure {
        None => None,
        Some((column, span)) => {
            let value = &shape.sides[0];
            let bounded = value
                .table
                .column(column)
                .filter(|c| c.kind == Kind::Measure)
                .and_then(|_| schema::dp_bounds(column));
            let Some((lo, hi)) = bounded else {
                return Err(at(
                    shape_rejection(format!(
                        "`{}.{column}` is not a measure with declared bounds; SUM and AVG take \
                         a measure of {}, e.g. trust or wait_minutes",
                        value.alias,
                        value.table.name()
                    )),
                    *span,
                )
                .into());
            };
            Some(Measure {
                column: column.clone(),
                lo,
                hi,
            })
        }
    };

    let canonical = canonical_sql(&shape);
    let [value_values, member_values] = values;
    let [value_ast, member_ast] = shape.sides;
    let [value_check, member_check] = checks;
    let value_side = side_of(value_ast, value_values, measure.as_ref(), value_check);
    let member_side = side_of(member_ast, member_values, None, member_check);
    Ok(JourneyPlan {
        value_side,
        member_side,
        left: shape.left,
        measure,
        outputs: shape.outputs,
        canonical,
    })
}

/// The public values of a side's group column, or the journey-shape refusal.
fn group_values(
    public: &PublicKeys,
    side: &SideAst,
    column: &'static schema::Column,
    name: &str,
    span: Span,
) -> Result<(Vec<String>, bool), QueryError> {
    let (values, _) = public.values_of(column).map_err(|why| {
        at(
            shape_rejection(format!(
                "`{}.{name}` has no public list of values: {why}. A journey groups only by \
                 columns whose every value is known in advance, so that every cell is released",
                side.alias
            )),
            span,
        )
    })?;
    let null = values.iter().any(|v| v.is_null());
    let texts = values
        .iter()
        .filter(|v| !v.is_null())
        .map(|v| v.to_string())
        .collect();
    Ok((texts, null))
}

fn side_of(
    ast: SideAst,
    values: Option<(Vec<String>, bool)>,
    measure: Option<&Measure>,
    check_sql: String,
) -> Side {
    let predicates: Vec<String> = ast.predicates.iter().map(|p| p.to_string()).collect();
    let mut select = vec![schema::PERSON_ID.to_string()];
    if let Some((g, _)) = &ast.group {
        select.push(format!("MIN({g}) AS g"));
    }
    if let Some(m) = measure {
        select.push(format!("AVG(CAST({} AS DOUBLE)) AS v", m.column));
    }
    let side_sql = format!(
        "SELECT {} FROM {}{} GROUP BY {}",
        select.join(", "),
        ast.table.name(),
        where_clause(&predicates),
        schema::PERSON_ID
    );
    let (group_values, group_null) = values.unwrap_or_default();
    Side {
        agency: ast.agency,
        table: ast.table,
        alias: ast.alias,
        predicates,
        group: ast.group.map(|(g, _)| g),
        group_values,
        group_null,
        side_sql,
        check_sql,
    }
}

fn where_clause(predicates: &[String]) -> String {
    if predicates.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", predicates.join(" AND "))
    }
}

/// The ordinary single-table aggregate that carries one side's conditions, group column and
/// measure through [`validate::approve`].
fn validation_sql(side: &SideAst, measure: Option<&str>, aggregates: &[&str]) -> String {
    let predicates: Vec<String> = side.predicates.iter().map(|p| p.to_string()).collect();
    let mut select = Vec::new();
    if let Some((g, _)) = &side.group {
        select.push(sql_ident(g));
    }
    select.push("COUNT(*)".to_string());
    if let Some(m) = measure {
        for f in aggregates {
            select.push(format!("{f}({})", sql_ident(m)));
        }
    }
    let group = match &side.group {
        Some((g, _)) => format!(" GROUP BY {}", sql_ident(g)),
        None => String::new(),
    };
    format!(
        "SELECT {} FROM {}{}{group}",
        select.join(", "),
        side.table.name(),
        where_clause(&predicates)
    )
}

/// A column name as SQL: bare when it is a plain lowercase identifier, else quoted (so that a
/// quoted `a."Channel"` stays the column `Channel`, which does not exist).
fn sql_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Maps a refusal of a side's validation SQL back to the analyst's SQL: same rule and reason,
/// the position of the same word (preferably as `alias.word`), or none.
fn relocate(original: &str, check_sql: &str, alias: &str, r: Rejection) -> Rejection {
    let word = r.position.and_then(|p| word_at(check_sql, p));
    let position = match word {
        Some(w) => qualified_word(original, alias, &w).or_else(|| locate_word(original, &w, 0)),
        // No position (e.g. "No field named trust."): the first word of the reason that the
        // analyst wrote as `alias.word`.
        None => r
            .reason
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .find_map(|w| qualified_word(original, alias, w)),
    };
    Rejection {
        rule: r.rule,
        reason: r.reason,
        position,
    }
}

/// The word token starting at `p` in `sql`.
fn word_at(sql: &str, p: Position) -> Option<String> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    tokens.iter().find_map(|t| match &t.token {
        Token::Word(w) if t.span.start.line == p.line && t.span.start.column == p.column => {
            Some(w.value.clone())
        }
        _ => None,
    })
}

/// The position of the first `alias.word` in `sql` (at the alias).
fn qualified_word(sql: &str, alias: &str, word: &str) -> Option<Position> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let tokens: Vec<_> = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    tokens
        .windows(3)
        .find_map(|w| match (&w[0].token, &w[1].token, &w[2].token) {
            (Token::Word(a), Token::Period, Token::Word(c))
                if a.value.eq_ignore_ascii_case(alias) && c.value.eq_ignore_ascii_case(word) =>
            {
                Some(Position {
                    line: w[0].span.start.line,
                    column: w[0].span.start.column,
                })
            }
            _ => None,
        })
}

// ---------------------------------------------------------------------------------------------
// The shape, read from the AST.

/// One side as read from the SQL.
struct SideAst {
    agency: String,
    table: Table,
    alias: String,
    /// The value side (the first table).
    value: bool,
    /// Conditions without the alias.
    predicates: Vec<Expr>,
    /// Conditions with the alias replaced by `a` / `b` (for the canonical SQL).
    canonical_predicates: Vec<Expr>,
    /// The group column and where it is named in GROUP BY.
    group: Option<(String, Span)>,
}

struct Shape {
    sides: [SideAst; 2],
    left: bool,
    /// The measure column and where it is first aggregated.
    measure: Option<(String, Span)>,
    outputs: Vec<Output>,
}

const FORM: &str = "a journey query is SELECT … FROM <agency>.<table> a [LEFT] JOIN \
                    <agency>.<table> b USING (person_id) [WHERE …] [GROUP BY …]";

fn shape_rejection(reason: impl Into<String>) -> Rejection {
    Rejection::new(Rule::JourneyShape, reason)
}

fn at(mut r: Rejection, span: Span) -> Rejection {
    if r.position.is_none() && span.start.line > 0 {
        r.position = Some(Position {
            line: span.start.line,
            column: span.start.column,
        });
    }
    r
}

/// An identifier as the planner sees it: lowercase unless quoted.
fn norm(i: &Ident) -> String {
    if i.quote_style.is_none() {
        i.value.to_lowercase()
    } else {
        i.value.clone()
    }
}

fn read_shape(sql: &str, query: &Query) -> Result<Shape, Rejection> {
    if query.with.is_some() {
        return Err(
            Rejection::new(Rule::SubqueryNotAllowed, "CTEs (WITH) are not allowed")
                .at_word(sql, "with"),
        );
    }
    if query.order_by.is_some() {
        return Err(shape_rejection(
            "ORDER BY is not supported in journey queries yet: the cells come in canonical order \
             (the value side's groups slowest)",
        )
        .at_word(sql, "order"));
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(shape_rejection(
            "LIMIT, OFFSET and FETCH are not supported in journey queries yet: every cell is released",
        )
        .at_word(sql, "limit")
        .at_word(sql, "offset")
        .at_word(sql, "fetch"));
    }
    if !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return Err(shape_rejection(FORM));
    }
    let SetExpr::Select(select) = &*query.body else {
        return Err(shape_rejection(FORM));
    };
    read_select(sql, select)
}

fn read_select(sql: &str, select: &Select) -> Result<Shape, Rejection> {
    if select.distinct.is_some() {
        return Err(
            Rejection::new(Rule::DistinctNotAllowed, "SELECT DISTINCT is not allowed")
                .at_word(sql, "distinct"),
        );
    }
    if select.having.is_some() {
        return Err(shape_rejection(
            "HAVING is not supported in journey queries yet: every cell is released",
        )
        .at_word(sql, "having"));
    }
    if select.top.is_some()
        || select.into.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.named_window.is_empty()
        || select.qualify.is_some()
        || select.value_table_mode.is_some()
        || select.exclude.is_some()
        || select.select_modifiers.is_some()
        || !select.optimizer_hints.is_empty()
    {
        return Err(shape_rejection(FORM));
    }

    let (mut sides, left) = read_from(sql, &select.from)?;
    let aliases = [sides[0].alias.clone(), sides[1].alias.clone()];
    let resolve = |e: &Expr| resolve_column(e, &aliases);

    // GROUP BY: at most one column per side.
    match &select.group_by {
        GroupByExpr::All(_) => {
            return Err(
                shape_rejection("GROUP BY ALL is not allowed: name the group columns")
                    .at_word(sql, "all"),
            );
        }
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return Err(Rejection::new(
                    Rule::GroupingSetsNotAllowed,
                    "GROUPING SETS, ROLLUP and CUBE are not allowed",
                )
                .at_word(sql, "with"));
            }
            for e in exprs {
                if matches!(e, Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_)) {
                    return Err(at(
                        Rejection::new(
                            Rule::GroupingSetsNotAllowed,
                            "GROUPING SETS, ROLLUP and CUBE are not allowed",
                        ),
                        e.span(),
                    ));
                }
                let Some(r) = resolve(e) else {
                    return Err(at(
                        shape_rejection(format!(
                            "`{e}` is not a group column: group by a column of one table, \
                             {}.col or {}.col",
                            aliases[0], aliases[1]
                        )),
                        e.span(),
                    ));
                };
                let (i, col) = r?;
                if let Some((first, _)) = &sides[i].group {
                    return Err(at(
                        shape_rejection(format!(
                            "`{e}` is a second group column of {}, which already groups by \
                             {first}: at most one group column per table",
                            aliases[i]
                        )),
                        e.span(),
                    ));
                }
                sides[i].group = Some((col, e.span()));
            }
        }
    }

    // SELECT: group columns and aggregates.
    let mut outputs = Vec::new();
    let mut measure: Option<(String, Span)> = None;
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(norm(alias))),
            other => {
                return Err(at(
                    shape_rejection(format!(
                        "`{other}` is not a journey output: select group columns and COUNT(*), \
                         SUM({a}.m) or AVG({a}.m)",
                        a = aliases[0]
                    )),
                    other.span(),
                ));
            }
        };
        let expr = unnest(expr);
        let output = if let Some(r) = resolve(expr) {
            let (i, col) = r?;
            if sides[i].group.as_ref().map(|(g, _)| g) != Some(&col) {
                return Err(at(
                    shape_rejection(format!(
                        "`{expr}` is selected but not grouped: add it to GROUP BY, or aggregate it"
                    )),
                    expr.span(),
                ));
            }
            let name = alias.unwrap_or(col);
            if i == 0 {
                Output::GroupA { name }
            } else {
                Output::GroupB { name }
            }
        } else if let Expr::Function(f) = expr {
            read_aggregate(f, expr, alias, &aliases, &mut measure)?
        } else {
            return Err(at(
                shape_rejection(format!(
                    "`{expr}` is not a journey output: select group columns ({}.col, {}.col) and \
                     COUNT(*), SUM({a}.m) or AVG({a}.m)",
                    aliases[0],
                    aliases[1],
                    a = aliases[0]
                )),
                expr.span(),
            ));
        };
        if outputs.iter().any(|o: &Output| o.name() == output.name()) {
            return Err(at(
                shape_rejection(format!(
                    "two outputs are named `{}`; give one an alias",
                    output.name()
                )),
                expr.span(),
            ));
        }
        outputs.push(output);
    }
    if !outputs.iter().any(|o| {
        matches!(
            o,
            Output::Count { .. } | Output::Sum { .. } | Output::Avg { .. }
        )
    }) {
        return Err(shape_rejection(format!(
            "a journey query releases aggregates: select COUNT(*), SUM({a}.m) or AVG({a}.m)",
            a = aliases[0]
        )));
    }

    // WHERE: a conjunction, each condition about one side.
    if let Some(selection) = &select.selection {
        let mut conjuncts = Vec::new();
        split_and(selection, &mut conjuncts);
        for c in conjuncts {
            let i = side_of_condition(c, &aliases)?;
            let mut stripped = c.clone();
            let _ = visit_expressions_mut(&mut stripped, |x| {
                if let Expr::CompoundIdentifier(parts) = x
                    && let [_, col] = parts.as_slice()
                {
                    *x = Expr::Identifier(col.clone());
                }
                ControlFlow::<()>::Continue(())
            });
            let canonical_alias = if i == 0 { "a" } else { "b" };
            let mut canonical = c.clone();
            let _ = visit_expressions_mut(&mut canonical, |x| {
                if let Expr::CompoundIdentifier(parts) = x
                    && let [q, _] = parts.as_mut_slice()
                {
                    *q = Ident::new(canonical_alias);
                }
                ControlFlow::<()>::Continue(())
            });
            sides[i].predicates.push(stripped);
            sides[i].canonical_predicates.push(canonical);
        }
    }

    Ok(Shape {
        sides,
        left,
        measure,
        outputs,
    })
}

fn unnest(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => unnest(inner),
        other => other,
    }
}

/// `None` when `e` is not a column reference; else the side and column, or why the reference
/// is wrong.
fn resolve_column(e: &Expr, aliases: &[String; 2]) -> Option<Result<(usize, String), Rejection>> {
    match unnest(e) {
        Expr::Identifier(ident) => Some(Err(unqualified(ident, aliases))),
        Expr::CompoundIdentifier(parts) => Some(qualified(parts, aliases)),
        _ => None,
    }
}

fn unqualified(ident: &Ident, aliases: &[String; 2]) -> Rejection {
    let c = &ident.value;
    at(
        shape_rejection(format!(
            "qualify `{c}` with the alias of its table: {}.{c} or {}.{c}",
            aliases[0], aliases[1]
        )),
        ident.span,
    )
}

fn qualified(parts: &[Ident], aliases: &[String; 2]) -> Result<(usize, String), Rejection> {
    match parts {
        [q, c] => match aliases.iter().position(|a| *a == norm(q)) {
            Some(i) => Ok((i, norm(c))),
            None => Err(at(
                shape_rejection(format!(
                    "`{}` is neither table's alias ({} or {}); name columns as <alias>.<column>",
                    q.value, aliases[0], aliases[1]
                )),
                q.span,
            )),
        },
        _ => Err(at(
            shape_rejection(format!(
                "`{}` is not a column reference: name columns as <alias>.<column>",
                ObjectName::from(parts.to_vec())
            )),
            parts.first().map(|p| p.span).unwrap_or(Span::empty()),
        )),
    }
}

/// Which side a WHERE condition is about (exactly one).
fn side_of_condition(c: &Expr, aliases: &[String; 2]) -> Result<usize, Rejection> {
    let mut seen = [false, false];
    let walked = visit_expressions(c, |x| match x {
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
            ControlFlow::Break(at(
                Rejection::new(
                    Rule::SubqueryNotAllowed,
                    "subqueries, CTEs and derived tables are not allowed",
                ),
                x.span(),
            ))
        }
        Expr::Identifier(ident) => ControlFlow::Break(unqualified(ident, aliases)),
        Expr::CompoundIdentifier(parts) => match qualified(parts, aliases) {
            Ok((i, _)) => {
                seen[i] = true;
                ControlFlow::Continue(())
            }
            Err(r) => ControlFlow::Break(r),
        },
        _ => ControlFlow::Continue(()),
    });
    if let ControlFlow::Break(r) = walked {
        return Err(r);
    }
    match seen {
        [true, false] => Ok(0),
        [false, true] => Ok(1),
        [true, true] => Err(at(
            shape_rejection(format!(
                "`{c}` mixes both tables; each condition of WHERE is about one table (the two \
                 agencies never see each other's rows)"
            )),
            c.span(),
        )),
        [false, false] => Err(at(
            shape_rejection(format!(
                "`{c}` refers to no column; each condition of WHERE is about one table"
            )),
            c.span(),
        )),
    }
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_and(left, out);
            split_and(right, out);
        }
        Expr::Nested(inner)
            if matches!(
                **inner,
                Expr::BinaryOp {
                    op: BinaryOperator::And,
                    ..
                } | Expr::Nested(_)
            ) =>
        {
            split_and(inner, out)
        }
        other => out.push(other),
    }
}

fn read_aggregate(
    f: &datafusion::sql::sqlparser::ast::Function,
    expr: &Expr,
    alias: Option<String>,
    aliases: &[String; 2],
    measure: &mut Option<(String, Span)>,
) -> Result<Output, Rejection> {
    let a = &aliases[0];
    let name = match f.name.0.as_slice() {
        [part] => part.as_ident().map(|i| i.value.to_lowercase()),
        _ => None,
    };
    let not_aggregate = || {
        at(
            shape_rejection(format!(
                "`{expr}` is not a journey aggregate: COUNT(*), SUM({a}.m) and AVG({a}.m) only"
            )),
            expr.span(),
        )
    };
    let Some(name) = name.filter(|n| matches!(n.as_str(), "count" | "sum" | "avg")) else {
        return Err(not_aggregate());
    };
    if f.over.is_some() {
        return Err(at(
            Rejection::new(Rule::WindowNotAllowed, "window functions are not allowed"),
            expr.span(),
        ));
    }
    if f.filter.is_some()
        || f.null_treatment.is_some()
        || !f.within_group.is_empty()
        || f.uses_odbc_syntax
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return Err(not_aggregate());
    }
    let FunctionArguments::List(list) = &f.args else {
        return Err(not_aggregate());
    };
    if list.duplicate_treatment.is_some() {
        return Err(at(
            shape_rejection(format!(
                "`{expr}`: DISTINCT is not needed, a journey counts each person once"
            )),
            expr.span(),
        ));
    }
    let [FunctionArg::Unnamed(arg)] = list.args.as_slice() else {
        return Err(not_aggregate());
    };
    if !list.clauses.is_empty() {
        return Err(not_aggregate());
    }
    if name == "count" {
        if !matches!(arg, FunctionArgExpr::Wildcard) {
            return Err(at(
                shape_rejection(format!(
                    "`{expr}`: count people with COUNT(*), each person counts once"
                )),
                expr.span(),
            ));
        }
        return Ok(Output::Count {
            name: alias.unwrap_or_else(|| "count(*)".to_string()),
        });
    }
    let FunctionArgExpr::Expr(e) = arg else {
        return Err(not_aggregate());
    };
    let Some(r) = resolve_column(e, aliases) else {
        return Err(at(
            shape_rejection(format!(
                "`{expr}`: SUM and AVG take a measure column, {a}.m, not an expression"
            )),
            e.span(),
        ));
    };
    let (i, col) = r?;
    if i == 1 {
        return Err(at(
            shape_rejection(format!(
                "`{expr}` aggregates the membership side ({b}): only the first table's values \
                 are aggregated; {b} only says who is there",
                b = aliases[1]
            )),
            e.span(),
        ));
    }
    match measure {
        Some((first, _)) if *first != col => {
            return Err(at(
                shape_rejection(format!(
                    "`{a}.{col}` is a second measure: a journey aggregates one value per person, \
                     here {a}.{first}"
                )),
                e.span(),
            ));
        }
        Some(_) => {}
        None => *measure = Some((col.clone(), e.span())),
    }
    let default = format!("{name}({a}.{col})");
    let name_out = alias.unwrap_or(default);
    Ok(if name == "sum" {
        Output::Sum { name: name_out }
    } else {
        Output::Avg { name: name_out }
    })
}

/// FROM: `<agency>.<table> <alias> [LEFT] JOIN <agency>.<table> <alias> USING (person_id)`.
fn read_from(sql: &str, from: &[TableWithJoins]) -> Result<([SideAst; 2], bool), Rejection> {
    let twj = match from {
        [one] => one,
        [] => return Err(shape_rejection(FORM)),
        [_, second, ..] => {
            return Err(at(
                shape_rejection(
                    "join the two tables with JOIN … USING (person_id), not with a comma",
                ),
                second.relation.span(),
            ));
        }
    };
    let join = match twj.joins.as_slice() {
        [one] => one,
        [] => return Err(shape_rejection(FORM)),
        [_, third, ..] => {
            return Err(at(
                shape_rejection(format!(
                    "a journey query joins exactly two tables; this one joins {}",
                    twj.joins.len() + 1
                )),
                third.relation.span(),
            ));
        }
    };
    let (left, constraint) = match &join.join_operator {
        JoinOperator::Join(c) | JoinOperator::Inner(c) => (false, c),
        JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (true, c),
        JoinOperator::Right(_) | JoinOperator::RightOuter(_) => {
            return Err(shape_rejection(
                "RIGHT JOIN is not supported: put the table whose people are counted first and \
                 use LEFT JOIN (the first table is the value side)",
            )
            .at_word(sql, "right"));
        }
        JoinOperator::FullOuter(_) => {
            return Err(shape_rejection(
                "FULL JOIN is not supported: a journey counts the people of the first table \
                 (INNER JOIN: those also at the second; LEFT JOIN: all of them)",
            )
            .at_word(sql, "full"));
        }
        JoinOperator::CrossJoin(_) => {
            return Err(shape_rejection(
                "CROSS JOIN is not supported: join the same people, JOIN … USING (person_id)",
            )
            .at_word(sql, "cross"));
        }
        _ => {
            return Err(at(
                shape_rejection(
                    "only [INNER] JOIN and LEFT [OUTER] JOIN … USING (person_id) are supported",
                ),
                join.relation.span(),
            ));
        }
    };
    if join.global {
        return Err(shape_rejection(FORM).at_word(sql, "global"));
    }
    let using = "join USING (person_id): the same person at both agencies, linked privately by a \
                 key no SQL names";
    match constraint {
        JoinConstraint::Using(cols) => {
            let other = cols.iter().find(|c| match c.0.as_slice() {
                [part] => part.as_ident().is_none_or(|i| norm(i) != schema::PERSON_ID),
                _ => true,
            });
            if let Some(other) = other {
                let rule = match other.0.as_slice() {
                    [part]
                        if part
                            .as_ident()
                            .is_some_and(|i| schema::is_linkage_name(&i.value)) =>
                    {
                        Rule::IdentifierNotAllowed
                    }
                    _ => Rule::JourneyShape,
                };
                return Err(at(
                    Rejection::new(rule, format!("{using}; not USING ({other})")),
                    other.span(),
                ));
            }
            if cols.len() != 1 {
                return Err(shape_rejection(format!("{using}, named once")).at_word(sql, "using"));
            }
        }
        JoinConstraint::On(_) => {
            return Err(shape_rejection(format!("{using}, not ON")).at_word(sql, "on"));
        }
        JoinConstraint::Natural => {
            return Err(shape_rejection(format!("{using}, not NATURAL")).at_word(sql, "natural"));
        }
        JoinConstraint::None => {
            return Err(at(
                shape_rejection(format!("{using}: the join has no condition")),
                join.relation.span(),
            ));
        }
    }
    let value = read_factor(&twj.relation, true)?;
    let member = read_factor(&join.relation, false)?;
    if value.alias == member.alias {
        return Err(at(
            shape_rejection(format!(
                "both tables are aliased `{}`; give them different aliases",
                value.alias
            )),
            join.relation.span(),
        ));
    }
    if value.agency == member.agency {
        return Err(at(
            shape_rejection(format!(
                "both tables are at {}; a journey joins the people of two agencies",
                value.agency
            )),
            join.relation.span(),
        ));
    }
    Ok(([value, member], left))
}

fn read_factor(f: &TableFactor, value: bool) -> Result<SideAst, Rejection> {
    let TableFactor::Table {
        name,
        alias,
        args,
        with_hints,
        version,
        with_ordinality,
        partitions,
        json_path,
        sample,
        index_hints,
    } = f
    else {
        if matches!(f, TableFactor::Derived { .. }) {
            return Err(at(
                Rejection::new(
                    Rule::SubqueryNotAllowed,
                    "subqueries, CTEs and derived tables are not allowed",
                ),
                f.span(),
            ));
        }
        return Err(at(
            shape_rejection(
                "a journey reads agency tables: <agency>.experience or <agency>.operational",
            ),
            f.span(),
        ));
    };
    if args.is_some() {
        return Err(at(
            Rejection::new(Rule::TableNotAllowed, "table functions are not allowed"),
            f.span(),
        ));
    }
    if !with_hints.is_empty()
        || version.is_some()
        || *with_ordinality
        || !partitions.is_empty()
        || json_path.is_some()
        || sample.is_some()
        || !index_hints.is_empty()
    {
        return Err(at(
            shape_rejection(
                "table hints, versions, partitions and samples are not part of a journey query",
            ),
            f.span(),
        ));
    }
    let parts: Option<Vec<&Ident>> = name.0.iter().map(|p| p.as_ident()).collect();
    let Some(parts) = parts else {
        return Err(at(
            shape_rejection("name a table as <agency>.<table>"),
            f.span(),
        ));
    };
    for p in &parts {
        if schema::is_linkage_name(&p.value) {
            return Err(at(
                Rejection::new(
                    Rule::IdentifierNotAllowed,
                    format!(
                        "`{}` names the linkage key, which is never queryable: only the private \
                         journey protocol uses it, blinded",
                        p.value
                    ),
                ),
                p.span,
            ));
        }
    }
    let (agency, table) = match parts.as_slice() {
        [t] => {
            return Err(at(
                shape_rejection(format!(
                    "qualify `{}` with the agency that holds it, e.g. ssa.{}",
                    t.value,
                    norm(t)
                )),
                t.span,
            ));
        }
        [agency, table] => (*agency, *table),
        _ => {
            return Err(at(
                shape_rejection("name a table as <agency>.<table>"),
                f.span(),
            ));
        }
    };
    if !(2..=8).contains(&agency.value.len())
        || !agency.value.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return Err(at(
            shape_rejection(format!(
                "`{}` is not an agency: 2 to 8 letters, e.g. ssa",
                agency.value
            )),
            agency.span,
        ));
    }
    let agency_name = agency.value.to_ascii_uppercase();
    let Some(t) = Table::from_name(&norm(table)) else {
        return Err(at(
            shape_rejection(format!(
                "`{}.{}` is not a CX table: an agency holds experience and operational",
                agency.value, table.value
            )),
            table.span,
        ));
    };
    let Some(alias) = alias else {
        return Err(at(
            shape_rejection(format!(
                "give {}.{} an alias (… a, … b) to qualify its columns with",
                agency.value, table.value
            )),
            f.span(),
        ));
    };
    if !alias.columns.is_empty() || alias.at.is_some() {
        return Err(at(
            shape_rejection("column aliases of a table are not allowed"),
            alias.name.span,
        ));
    }
    Ok(SideAst {
        agency: agency_name,
        table: t,
        alias: norm(&alias.name),
        value,
        predicates: Vec::new(),
        canonical_predicates: Vec::new(),
        group: None,
    })
}

/// The normalized rendering of [`JourneyPlan::canonical_sql`].
fn canonical_sql(shape: &Shape) -> String {
    let [a, b] = &shape.sides;
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let m = shape
        .measure
        .as_ref()
        .map(|(m, _)| m.as_str())
        .unwrap_or("");
    let items: Vec<String> = shape
        .outputs
        .iter()
        .map(|o| {
            let e = match o {
                Output::GroupA { .. } => {
                    format!("a.{}", a.group.as_ref().map(|g| g.0.as_str()).unwrap_or(""))
                }
                Output::GroupB { .. } => {
                    format!("b.{}", b.group.as_ref().map(|g| g.0.as_str()).unwrap_or(""))
                }
                Output::Count { .. } => "COUNT(*)".to_string(),
                Output::Sum { .. } => format!("SUM(a.{m})"),
                Output::Avg { .. } => format!("AVG(a.{m})"),
            };
            format!("{e} AS {}", quote(o.name()))
        })
        .collect();
    let predicates: Vec<String> = a
        .canonical_predicates
        .iter()
        .chain(b.canonical_predicates.iter())
        .map(|p| p.to_string())
        .collect();
    let groups: Vec<String> = [("a", a), ("b", b)]
        .iter()
        .filter_map(|(q, s)| s.group.as_ref().map(|(g, _)| format!("{q}.{g}")))
        .collect();
    let mut out = format!(
        "SELECT {} FROM {}.{} AS a {} JOIN {}.{} AS b USING (person_id)",
        items.join(", "),
        a.agency.to_ascii_lowercase(),
        a.table.name(),
        if shape.left { "LEFT" } else { "INNER" },
        b.agency.to_ascii_lowercase(),
        b.table.name(),
    );
    out.push_str(&where_clause(&predicates));
    if !groups.is_empty() {
        out.push_str(" GROUP BY ");
        out.push_str(&groups.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;

    async fn plan_of(sql: &str) -> Result<JourneyPlan, QueryError> {
        let ctx = planning_context().expect("context");
        plan(&ctx.state(), sql).await
    }

    async fn refusal(sql: &str) -> Rejection {
        match plan_of(sql).await {
            Err(QueryError::Rejected(r)) => r,
            other => panic!("expected a refusal of {sql}, got {other:?}"),
        }
    }

    fn pos(r: &Rejection) -> Option<(u64, u64)> {
        r.position.map(|p| (p.line, p.column))
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    const FULL: &str = "SELECT a.channel, b.age_band, COUNT(*) AS people, AVG(a.trust) AS trust, \
                        SUM(a.trust) AS total\n\
                        FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
                        WHERE a.life_experience = 'approaching_retirement' AND b.outcome = \
                        'approved' AND (a.trust >= 2 OR a.ease >= 2)\n\
                        GROUP BY a.channel, b.age_band";

    #[tokio::test]
    async fn journey_inner_plan_splits_sides() {
        let p = plan_of(FULL).await.expect("plan");
        assert!(!p.left);
        let a = &p.value_side;
        let b = &p.member_side;
        assert_eq!(
            (a.agency.as_str(), a.table, a.alias.as_str()),
            ("SSA", Table::Experience, "a")
        );
        assert_eq!(
            (b.agency.as_str(), b.table, b.alias.as_str()),
            ("CMS", Table::Operational, "b")
        );
        assert_eq!(
            a.predicates,
            strings(&[
                "life_experience = 'approaching_retirement'",
                "(trust >= 2 OR ease >= 2)"
            ])
        );
        assert_eq!(b.predicates, strings(&["outcome = 'approved'"]));
        assert_eq!(a.group.as_deref(), Some("channel"));
        assert_eq!(a.group_values, strings(schema::CHANNELS));
        assert!(!a.group_null);
        assert_eq!(b.group.as_deref(), Some("age_band"));
        assert_eq!(b.group_values, strings(schema::AGE_BANDS));
        assert!(b.group_null, "age_band is optional");
        assert_eq!(b.cells().last(), Some(&None));
        assert_eq!(b.cells().len(), schema::AGE_BANDS.len() + 1);
        assert_eq!(
            p.cells().len(),
            schema::CHANNELS.len() * (schema::AGE_BANDS.len() + 1)
        );
        assert_eq!(
            p.cells()[0],
            (
                Some(schema::CHANNELS[0].to_string()),
                Some(schema::AGE_BANDS[0].to_string())
            )
        );
        assert_eq!(
            a.check_sql,
            "SELECT channel, COUNT(*), SUM(trust), AVG(trust) FROM experience WHERE \
             life_experience = 'approaching_retirement' AND (trust >= 2 OR ease >= 2) GROUP BY \
             channel"
        );
        assert_eq!(
            b.check_sql,
            "SELECT age_band, COUNT(*) FROM operational WHERE outcome = 'approved' GROUP BY \
             age_band"
        );
        assert_eq!(
            p.measure,
            Some(Measure {
                column: "trust".into(),
                lo: 1.0,
                hi: 5.0
            })
        );
        assert_eq!(
            p.outputs,
            vec![
                Output::GroupA {
                    name: "channel".into()
                },
                Output::GroupB {
                    name: "age_band".into()
                },
                Output::Count {
                    name: "people".into()
                },
                Output::Avg {
                    name: "trust".into()
                },
                Output::Sum {
                    name: "total".into()
                },
            ]
        );
        assert_eq!(
            a.side_sql,
            "SELECT person_id, MIN(channel) AS g, AVG(CAST(trust AS DOUBLE)) AS v FROM experience \
             WHERE life_experience = 'approaching_retirement' AND (trust >= 2 OR ease >= 2) \
             GROUP BY person_id"
        );
        assert_eq!(
            b.side_sql,
            "SELECT person_id, MIN(age_band) AS g FROM operational WHERE outcome = 'approved' \
             GROUP BY person_id"
        );
        let ctx = planning_context().expect("context");
        for sql in [&a.side_sql, &b.side_sql] {
            ctx.state()
                .create_logical_plan(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[tokio::test]
    async fn journey_left_plan_without_member_group_or_measure() {
        let sql = "SELECT a.state, COUNT(*) FROM ssa.experience a LEFT JOIN cms.operational b \
                   USING (person_id) GROUP BY a.state";
        let p = plan_of(sql).await.expect("plan");
        assert!(p.left);
        assert_eq!(p.measure, None);
        assert_eq!(
            p.outputs,
            vec![
                Output::GroupA {
                    name: "state".into()
                },
                Output::Count {
                    name: "count(*)".into()
                }
            ]
        );
        assert_eq!(p.value_side.group_values, strings(schema::STATES));
        assert!(p.value_side.group_null);
        assert_eq!(p.member_side.group, None);
        assert!(p.member_side.group_values.is_empty());
        assert_eq!(p.member_side.cells(), vec![None]);
        let mut states: Vec<Option<String>> =
            schema::STATES.iter().map(|s| Some(s.to_string())).collect();
        states.push(None);
        assert_eq!(
            p.cells(),
            states.into_iter().map(|s| (s, None)).collect::<Vec<_>>()
        );
        assert!(p.member_side.predicates.is_empty());
        assert_eq!(
            p.value_side.side_sql,
            "SELECT person_id, MIN(state) AS g FROM experience GROUP BY person_id"
        );
        assert_eq!(
            p.member_side.side_sql,
            "SELECT person_id FROM operational GROUP BY person_id"
        );
        let ctx = planning_context().expect("context");
        for s in [&p.value_side.side_sql, &p.member_side.side_sql] {
            ctx.state()
                .create_logical_plan(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[tokio::test]
    async fn journey_left_outer_groups_the_member_side() {
        let sql = "SELECT b.first_contact_resolved AS resolved, SUM(a.wait_minutes) \
                   FROM va.operational x LEFT OUTER JOIN irs.experience y USING (person_id)";
        // Aliases x/y: a. is no alias here.
        let r = refusal(sql).await;
        assert_eq!(r.rule, Rule::JourneyShape);
        let sql = "SELECT y.first_contact_resolved AS resolved, SUM(x.wait_minutes) \
                   FROM va.operational x LEFT OUTER JOIN irs.operational y USING (person_id) \
                   WHERE y.outcome IN ('approved', 'denied') GROUP BY y.first_contact_resolved";
        let p = plan_of(sql).await.expect("plan");
        assert!(p.left);
        assert_eq!(p.value_side.agency, "VA");
        assert_eq!(p.member_side.agency, "IRS");
        assert_eq!(p.member_side.group_values, strings(&["false", "true"]));
        assert!(p.member_side.group_null);
        assert_eq!(
            p.measure,
            Some(Measure {
                column: "wait_minutes".into(),
                lo: 0.0,
                hi: 240.0
            })
        );
        assert_eq!(
            p.outputs,
            vec![
                Output::GroupB {
                    name: "resolved".into()
                },
                Output::Sum {
                    name: "sum(x.wait_minutes)".into()
                }
            ]
        );
        assert_eq!(
            p.value_side.side_sql,
            "SELECT person_id, AVG(CAST(wait_minutes AS DOUBLE)) AS v FROM operational GROUP BY \
             person_id"
        );
        let ctx = planning_context().expect("context");
        for s in [&p.value_side.side_sql, &p.member_side.side_sql] {
            ctx.state()
                .create_logical_plan(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[tokio::test]
    async fn journey_canonical_sql_plans_to_the_same_plan() {
        let p = plan_of(FULL).await.expect("plan");
        let canonical = p.canonical_sql();
        assert!(canonical.starts_with(
            "SELECT a.channel AS \"channel\", b.age_band AS \"age_band\", COUNT(*) AS \"people\""
        ));
        assert!(canonical.contains(
            "FROM ssa.experience AS a INNER JOIN cms.operational AS b USING (person_id) WHERE \
             a.life_experience = 'approaching_retirement' AND (a.trust >= 2 OR a.ease >= 2) AND \
             b.outcome = 'approved' GROUP BY a.channel, b.age_band"
        ));
        let again = plan_of(&canonical).await.expect("canonical plans");
        assert_eq!(again.value_side, p.value_side);
        assert_eq!(again.member_side, p.member_side);
        assert_eq!(again.outputs, p.outputs);
        assert_eq!(again.canonical_sql(), canonical);
    }

    async fn assert_shape(sql: &str, word_at: Option<(u64, u64)>, says: &str) {
        let r = refusal(sql).await;
        assert_eq!(r.rule, Rule::JourneyShape, "{sql}: {r}");
        assert_eq!(r.rule.code(), "CXF-Q022");
        assert_eq!(pos(&r), word_at, "{sql}: {r}");
        assert!(r.reason.contains(says), "{sql}: {r}");
    }

    #[tokio::test]
    async fn journey_refuses_other_joins() {
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a RIGHT JOIN cms.operational b USING (person_id)",
            Some((1, 39)),
            "RIGHT JOIN",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a FULL JOIN cms.operational b USING (person_id)",
            Some((1, 39)),
            "FULL JOIN",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a CROSS JOIN cms.operational b",
            Some((1, 39)),
            "CROSS JOIN",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a NATURAL JOIN cms.operational b",
            Some((1, 39)),
            "NATURAL",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b\n  ON a.person_id = b.person_id",
            Some((2, 3)),
            "not ON",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (case_id)",
            Some((1, 69)),
            "USING (case_id)",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             JOIN va.experience c USING (person_id)",
            Some((2, 6)),
            "joins 3",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a, cms.operational b",
            Some((1, 40)),
            "not with a comma",
        )
        .await;
        let r = refusal("SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (ssn)")
            .await;
        assert_eq!(r.rule, Rule::IdentifierNotAllowed);
    }

    #[tokio::test]
    async fn journey_refuses_bad_tables() {
        assert_shape(
            "SELECT COUNT(*) FROM experience a JOIN cms.operational b USING (person_id)",
            Some((1, 22)),
            "qualify `experience`",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.surveys a JOIN cms.operational b USING (person_id)",
            Some((1, 26)),
            "not a CX table",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM s.experience a JOIN cms.operational b USING (person_id)",
            Some((1, 22)),
            "not an agency",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience JOIN cms.operational b USING (person_id)",
            Some((1, 22)),
            "alias",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN ssa.operational b USING (person_id)",
            Some((1, 44)),
            "two agencies",
        )
        .await;
    }

    #[tokio::test]
    async fn journey_refuses_mixed_conditions_and_unqualified_columns() {
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE a.trust > 2 AND a.channel = b.channel",
            Some((2, 23)),
            "mixes both tables",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE trust > 2",
            Some((2, 7)),
            "qualify `trust`",
        )
        .await;
    }

    #[tokio::test]
    async fn journey_refuses_bad_aggregates() {
        assert_shape(
            "SELECT SUM(a.trust), AVG(a.ease) FROM ssa.experience a JOIN cms.operational b \
             USING (person_id)",
            Some((1, 26)),
            "second measure",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*), SUM(b.wait_minutes) FROM ssa.experience a JOIN cms.operational b \
             USING (person_id)",
            Some((1, 22)),
            "membership side",
        )
        .await;
        assert_shape(
            "SELECT MAX(a.trust) FROM ssa.experience a JOIN cms.operational b USING (person_id)",
            Some((1, 8)),
            "not a journey aggregate",
        )
        .await;
        assert_shape(
            "SELECT a.channel FROM ssa.experience a JOIN cms.operational b USING (person_id) \
             GROUP BY a.channel",
            None,
            "releases aggregates",
        )
        .await;
        assert_shape(
            "SELECT a.channel, COUNT(*) FROM ssa.experience a JOIN cms.operational b USING \
             (person_id)",
            Some((1, 8)),
            "not grouped",
        )
        .await;
        // A grouped column is no measure.
        assert_shape(
            "SELECT SUM(a.fiscal_quarter) FROM ssa.experience a JOIN cms.operational b USING \
             (person_id)",
            Some((1, 12)),
            "declared bounds",
        )
        .await;
    }

    #[tokio::test]
    async fn journey_refuses_groups_without_public_values() {
        assert_shape(
            "SELECT a.response_date, COUNT(*) FROM ssa.experience a JOIN cms.operational b USING \
             (person_id) GROUP BY a.response_date",
            Some((1, 106)),
            "no public list of values",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id) \
             GROUP BY b.service",
            Some((1, 89)),
            "no public list of values",
        )
        .await;
        assert_shape(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id) \
             GROUP BY a.channel, a.state",
            Some((1, 100)),
            "second group column",
        )
        .await;
    }

    #[tokio::test]
    async fn journey_declared_public_values_allow_a_group() {
        let mut keys = PublicKeys::schema_only();
        keys.declare_text("service", &strings(&["medicare", "medicaid"]))
            .expect("declare");
        let ctx = planning_context().expect("context");
        let sql = "SELECT b.service, COUNT(*) FROM ssa.experience a JOIN cms.operational b USING \
                   (person_id) GROUP BY b.service";
        let p = plan_with_keys(&ctx.state(), sql, &keys)
            .await
            .expect("plan");
        assert_eq!(
            p.member_side.group_values,
            strings(&["medicare", "medicaid"])
        );
    }

    #[tokio::test]
    async fn journey_refuses_order_limit_having() {
        let base = "SELECT a.channel, COUNT(*) AS n FROM ssa.experience a JOIN cms.operational b \
                    USING (person_id) GROUP BY a.channel";
        assert_shape(&format!("{base}\nORDER BY n"), Some((2, 1)), "ORDER BY").await;
        assert_shape(&format!("{base}\nLIMIT 3"), Some((2, 1)), "LIMIT").await;
        let having = "SELECT a.channel, COUNT(*) AS n FROM ssa.experience a JOIN \
                      cms.operational b USING (person_id) GROUP BY a.channel\nHAVING COUNT(*) > 3";
        assert_shape(having, Some((2, 1)), "HAVING").await;
    }

    #[tokio::test]
    async fn journey_per_side_rules_keep_their_codes() {
        // A raw identifier in SELECT: the ordinary identifier rule, pointed at `a.person_id`.
        let r = refusal(
            "SELECT a.person_id, COUNT(*) FROM ssa.experience a JOIN cms.operational b USING \
             (person_id) GROUP BY a.person_id",
        )
        .await;
        assert_eq!(r.rule, Rule::IdentifierNotAllowed, "{r}");
        assert_eq!(r.rule.code(), "CXF-Q012");
        assert_eq!(pos(&r), Some((1, 8)), "{r}");

        // A function outside the allow-list, in the member side's condition.
        let r = refusal(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE md5(b.service) = 'x'",
        )
        .await;
        assert_eq!(r.rule, Rule::FunctionNotAllowed, "{r}");
        assert_eq!(pos(&r), Some((2, 7)), "{r}");

        // An unknown column keeps the plan error, at the column.
        let r = refusal(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE b.trust > 3",
        )
        .await;
        assert_eq!(r.rule, Rule::PlanError, "{r}");
        assert_eq!(pos(&r), Some((2, 7)), "{r}");

        // The linkage key, as a column.
        let r = refusal(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE a.ssn = '1'",
        )
        .await;
        assert_eq!(r.rule, Rule::IdentifierNotAllowed, "{r}");

        // Grouping by a measure.
        let r = refusal(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id) \
             GROUP BY a.trust",
        )
        .await;
        assert_eq!(r.rule, Rule::GroupByNotAllowed, "{r}");
    }

    #[tokio::test]
    async fn journey_left_join_adds_a_null_membership_cell() {
        let sql = "SELECT a.survey_format, b.outcome, COUNT(*) FROM ssa.experience a LEFT JOIN \
                   cms.operational b USING (person_id) GROUP BY a.survey_format, b.outcome";
        let p = plan_of(sql).await.expect("plan");
        assert!(!p.member_side.group_null, "outcome is required");
        assert_eq!(p.member_side.cells().len(), schema::OUTCOMES.len());
        let cells = p.cells();
        assert_eq!(
            cells.len(),
            schema::SURVEY_FORMATS.len() * (schema::OUTCOMES.len() + 1)
        );
        assert_eq!(
            cells[schema::OUTCOMES.len()],
            (Some(schema::SURVEY_FORMATS[0].to_string()), None)
        );
        // The same query as INNER JOIN has no NULL membership cell.
        let inner = plan_of(&sql.replace("LEFT JOIN", "JOIN"))
            .await
            .expect("plan");
        assert_eq!(
            inner.cells().len(),
            schema::SURVEY_FORMATS.len() * schema::OUTCOMES.len()
        );
    }

    #[tokio::test]
    async fn journey_quoted_columns_keep_their_case() {
        for sql in [
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE a.\"Channel\" = 'web'",
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             GROUP BY a.\"Channel\"",
        ] {
            let r = refusal(sql).await;
            assert_eq!(r.rule, Rule::PlanError, "{sql}: {r}");
        }
        let p = plan_of(
            "SELECT COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id)\n\
             WHERE a.\"channel\" = 'web'",
        )
        .await
        .expect("plan");
        assert_eq!(p.value_side.predicates, strings(&["\"channel\" = 'web'"]));
    }

    #[test]
    fn journey_is_journey_routes() {
        assert!(is_journey(FULL));
        assert!(is_journey(
            "SELECT COUNT(*) FROM ssa.experience a LEFT JOIN cms.operational b USING (person_id)"
        ));
        // Wrong shapes still route to the journey planner, which says what is wrong.
        assert!(is_journey(
            "SELECT COUNT(*) FROM experience a JOIN cms.operational b ON a.x = b.y"
        ));
        assert!(!is_journey(
            "SELECT channel, COUNT(*) FROM experience GROUP BY channel"
        ));
        assert!(!is_journey(
            "SELECT COUNT(*) FROM experience JOIN operational ON experience.case_id = \
             operational.case_id"
        ));
        assert!(!is_journey("SELECT COUNT(*) FROM ssa.experience"));
        assert!(!is_journey("SELECT COUNT(*) FROM ssa.experience a JOIN"));
        assert!(!is_journey("DROP TABLE experience"));
    }
}
