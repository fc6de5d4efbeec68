//! SQL → [`ApprovedQuery`], or the [`Rejection`] that says which rule it broke.
//!
//! The check runs on DataFusion's logical plan (names resolved, `*` expanded, aliases and
//! positions in GROUP BY/ORDER BY already bound), and walks every node and every expression:
//!
//! ```text
//!  Limit / Sort / Projection / Filter(HAVING)      "upper": only over aggregate outputs
//!                     │
//!                 Aggregate                        exactly one; group keys are dimensions;
//!                     │                            aggregates COUNT SUM AVG STDDEV VAR
//!              Filter(WHERE)                       no identifiers, allow-listed functions
//!                     │
//!   TableScan | experience JOIN operational ON case_id
//! ```

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::ExprSchemable;

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DataFusionError};
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{Aggregate, Expr, JoinType, LogicalPlan, Operator};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::FutureExt;

use crate::query::{AggKind, ApprovedQuery};
use crate::rules::{QueryError, Rejection, Rule, locate_word, position_in_message};
use crate::schema::{self, Kind, Table};

/// Longest SQL text accepted, in bytes.
pub const MAX_SQL_BYTES: usize = 16 * 1024;

/// Scalar functions a query may use (DataFusion names).
pub const ALLOWED_FUNCTIONS: &[&str] = &[
    "date_trunc",
    "date_part",
    "coalesce",
    "nullif",
    "abs",
    "round",
    "floor",
    "ceil",
    "trunc",
    "sqrt",
    "power",
    "ln",
    "log10",
    "exp",
    "lower",
    "upper",
    "greatest",
    "least",
];

/// Date granularities a date may be grouped by.
pub const DATE_GRANULARITIES: &[&str] = &["month", "quarter", "year"];

/// Parses, plans and checks `sql` against the tables registered in `state`.
pub async fn approve(state: &SessionState, sql: &str) -> Result<ApprovedQuery, QueryError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(Rejection::new(
            Rule::QueryTooLarge,
            format!(
                "the query is {} bytes; at most {MAX_SQL_BYTES} are accepted",
                sql.len()
            ),
        )
        .into());
    }
    let statement = parse_one(state, sql)?;
    refuse_linkage_key(&statement)?;
    refuse_before_planning(&statement)?;
    // DataFusion's planner is the first code to see a hostile query's meaning; a panic in it
    // (one is known: see `refuse_before_planning`) becomes a refusal, never a dead request.
    let plan = std::panic::AssertUnwindSafe(state.statement_to_plan(statement))
        .catch_unwind()
        .await
        .map_err(|_| {
            Rejection::new(
                Rule::PlanError,
                "the query planner failed on this query; it is refused",
            )
        })?
        .map_err(|e| plan_error(sql, e))?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|e| Rejection::new(Rule::NotAQuery, first_line(&e.to_string())))?;
    let checked = check(sql, plan)?;
    let Checked {
        plan,
        upper,
        aggregate,
        kinds,
        person,
    } = harden(state, sql, checked)?;
    Ok(ApprovedQuery::new(
        sql.to_string(),
        plan,
        upper,
        aggregate,
        kinds,
        person,
    ))
}

/// A planned query that passed every rule: what [`ApprovedQuery::new`] is built from.
struct Checked {
    plan: LogicalPlan,
    upper: Vec<LogicalPlan>,
    aggregate: Aggregate,
    kinds: Vec<AggKind>,
    person: Column,
}

/// Refuses any mention of the linkage key ([`schema::LINKAGE_NAMES`]: `ssn`, `linkage_key`
/// ...), as a column (bare or qualified) or as a table, on the parsed SQL: no table has such a
/// column and no node registers such a table, so planning would fail anyway, but the refusal
/// should say why, name the rule (an identifier) and never depend on what the catalog holds.
fn refuse_linkage_key(statement: &DFStatement) -> Result<(), QueryError> {
    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Ident, ObjectName, Visit, Visitor};
    use std::ops::ControlFlow;

    struct Linkage;
    fn named(ident: &Ident) -> ControlFlow<Ident> {
        if schema::is_linkage_name(&ident.value) {
            ControlFlow::Break(ident.clone())
        } else {
            ControlFlow::Continue(())
        }
    }
    impl Visitor for Linkage {
        type Break = Ident;
        fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Ident> {
            for part in &relation.0 {
                if let Some(ident) = part.as_ident() {
                    named(ident)?;
                }
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &SqlExpr) -> ControlFlow<Ident> {
            match e {
                SqlExpr::Identifier(ident) => named(ident),
                SqlExpr::CompoundIdentifier(parts) => parts.iter().try_for_each(named),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let DFStatement::Statement(statement) = statement else {
        return Ok(());
    };
    match statement.visit(&mut Linkage) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(ident) => Err(Rejection {
            rule: Rule::IdentifierNotAllowed,
            reason: format!(
                "`{}` names the linkage key, which is never queryable: it is no column of any \
                 table, and only the private journey protocol uses it, blinded",
                ident.value
            ),
            position: (ident.span.start.line > 0).then_some(crate::rules::Position {
                line: ident.span.start.line,
                column: ident.span.start.column,
            }),
        }
        .into()),
    }
}

/// Refuses, before DataFusion plans anything, the nesting cxfed never accepts: subqueries in
/// expressions, derived tables and CTEs (the plan checks refuse them too). DataFusion 55
/// panics planning a scalar subquery with no columns (`trust > (SELECT FROM experience)`, found
/// by the fuzzer), so such input must not reach the planner at all.
fn refuse_before_planning(statement: &DFStatement) -> Result<(), QueryError> {
    use datafusion::sql::sqlparser::ast::{
        Expr as SqlExpr, Query, Spanned, TableFactor, Visit, Visitor,
    };
    use datafusion::sql::sqlparser::tokenizer::Span;
    use std::ops::ControlFlow;

    struct Nesting;
    impl Visitor for Nesting {
        type Break = Span;
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<Span> {
            match &q.with {
                Some(with) => ControlFlow::Break(with.span()),
                None => ControlFlow::Continue(()),
            }
        }
        fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<Span> {
            match t {
                TableFactor::Derived { .. } => ControlFlow::Break(t.span()),
                _ => ControlFlow::Continue(()),
            }
        }
        fn pre_visit_expr(&mut self, e: &SqlExpr) -> ControlFlow<Span> {
            match e {
                SqlExpr::Subquery(_) | SqlExpr::Exists { .. } | SqlExpr::InSubquery { .. } => {
                    ControlFlow::Break(e.span())
                }
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let DFStatement::Statement(statement) = statement else {
        return Ok(());
    };
    match statement.visit(&mut Nesting) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(span) => Err(Rejection {
            rule: Rule::SubqueryNotAllowed,
            reason: "subqueries, CTEs and derived tables are not allowed".into(),
            position: (span.start.line > 0).then_some(crate::rules::Position {
                line: span.start.line,
                column: span.start.column,
            }),
        }
        .into()),
    }
}

/// Parses exactly one SELECT statement (no set operation), or says which rule `sql` breaks.
pub(crate) fn parse_one(state: &SessionState, sql: &str) -> Result<DFStatement, QueryError> {
    let limit = state.config().options().sql_parser.recursion_limit.get();
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&GenericDialect {})
        .with_recursion_limit(limit)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| {
            let msg = e.to_string();
            let rule = if msg.contains("ecursion limit") || msg.contains("RecursionLimit") {
                Rule::QueryTooLarge
            } else {
                Rule::SyntaxError
            };
            let reason = if rule == Rule::QueryTooLarge {
                "the query is too deeply nested or too ambiguous to parse within the parser's \
                 recursion and backtracking limits"
                    .to_string()
            } else {
                first_line(&strip_prefix(&msg))
            };
            Rejection {
                rule,
                reason,
                position: position_in_message(&msg),
            }
        })?;
    if statements.len() != 1 {
        let rule = if statements.is_empty() {
            Rule::SyntaxError
        } else {
            Rule::MultipleStatements
        };
        let reason = if statements.is_empty() {
            "the request holds no SQL statement".to_string()
        } else {
            format!(
                "send one statement at a time; this request holds {}",
                statements.len()
            )
        };
        let position = if statements.len() > 1 {
            second_statement_position(sql)
        } else {
            None
        };
        return Err(Rejection {
            rule,
            reason,
            position,
        }
        .into());
    }
    let statement = statements
        .pop_front()
        .ok_or_else(|| QueryError::Internal("no statement".into()))?;
    match &statement {
        DFStatement::Statement(s) if matches!(**s, Statement::Query(_)) => {
            if let Statement::Query(q) = &**s
                && has_set_operation(&q.body)
            {
                return Err(Rejection::new(
                    Rule::SetOperationNotAllowed,
                    "UNION, INTERSECT and EXCEPT are not allowed",
                )
                .at_word(sql, "union")
                .at_word(sql, "intersect")
                .at_word(sql, "except")
                .into());
            }
            Ok(statement)
        }
        DFStatement::Statement(s) => {
            let word = s
                .to_string()
                .split_whitespace()
                .next()
                .unwrap_or("statement")
                .to_uppercase();
            Err(Rejection::new(
                Rule::NotAQuery,
                format!("only SELECT queries are accepted, not {word}"),
            )
            .at_word(sql, &word)
            .into())
        }
        _ => Err(Rejection::new(Rule::NotAQuery, "only SELECT queries are accepted").into()),
    }
}

/// Whether a query body combines results with UNION / INTERSECT / EXCEPT (checked on the AST:
/// the planner turns some of them into joins and DISTINCTs that would be refused less clearly).
fn has_set_operation(body: &datafusion::sql::sqlparser::ast::SetExpr) -> bool {
    use datafusion::sql::sqlparser::ast::SetExpr;
    match body {
        SetExpr::SetOperation { .. } => true,
        SetExpr::Query(q) => has_set_operation(&q.body),
        _ => false,
    }
}

fn second_statement_position(sql: &str) -> Option<crate::rules::Position> {
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let semi = tokens.iter().position(|t| t.token == Token::SemiColon)?;
    tokens[semi + 1..]
        .iter()
        .find(|t| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
        .map(|t| crate::rules::Position {
            line: t.span.start.line,
            column: t.span.start.column,
        })
}

fn strip_prefix(msg: &str) -> String {
    msg.trim_start_matches("SQL error: ")
        .trim_start_matches("ParserError(\"")
        .trim_end_matches("\")")
        .to_string()
}

fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or("").trim();
    let mut s: String = line.chars().take(300).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

/// DataFusion planning errors are the analyst's (unknown column, type mismatch ...), except
/// where DataFusion says it does not support something.
fn plan_error(sql: &str, e: DataFusionError) -> QueryError {
    let msg = e.to_string();
    let lower = msg.to_lowercase();
    let rule = if lower.contains("recursion") || lower.contains("stack") {
        Rule::QueryTooLarge
    } else if lower.contains("table") && lower.contains("not found") {
        Rule::TableNotAllowed
    } else if lower.contains("invalid function") || lower.contains("could not be planned") {
        // Functions this build does not have (md5, sha256, substr ...) are not allowed either.
        Rule::FunctionNotAllowed
    } else if lower.contains("cannot be nested") {
        Rule::NestedAggregation
    } else {
        Rule::PlanError
    };
    let mut rejection = Rejection {
        rule,
        reason: first_line(&msg.replace("Error during planning: ", "")),
        position: None,
    };
    // DataFusion names the column or table it could not find; point at it.
    if let Some(name) = quoted_name(&msg) {
        rejection = rejection.at_word(sql, &name);
    }
    rejection.into()
}

fn quoted_name(msg: &str) -> Option<String> {
    let start = msg.find(['\'', '"'])? + 1;
    let rest = &msg[start..];
    let end = rest.find(['\'', '"'])?;
    let name = &rest[..end];
    Some(name.rsplit('.').next().unwrap_or(name).to_string())
}

/// Checks a planned query; see the module docs for the shape it must have.
fn check(sql: &str, plan: LogicalPlan) -> Result<Checked, QueryError> {
    let (upper, aggregate) = split(&plan).map_err(|other| shape_rejection(sql, other, false))?;

    // Identifiers first: whatever else is wrong, a query that touches an identifier is refused
    // for that.
    let mut below = Vec::new();
    collect_below(sql, &aggregate.input, &mut below)?;
    for n in upper.iter().chain(below.iter()) {
        for e in node_expressions(n) {
            check_identifiers(sql, &e)?;
        }
    }
    for g in &aggregate.group_expr {
        check_identifiers(sql, g)?;
    }
    for a in &aggregate.aggr_expr {
        check_aggregate_identifiers(sql, a)?;
    }

    for n in &upper {
        for e in node_expressions(n) {
            check_expr(sql, &e, false)?;
        }
    }
    for n in &below {
        for e in node_expressions(n) {
            check_expr(sql, &e, true)?;
        }
    }
    for g in &aggregate.group_expr {
        check_group_key(sql, g)?;
    }
    let mut kinds = Vec::with_capacity(aggregate.aggr_expr.len());
    for a in &aggregate.aggr_expr {
        kinds.push(check_aggregate(sql, a)?);
        check_filter_type(sql, a, aggregate.input.schema())?;
    }

    let person = aggregate
        .input
        .schema()
        .columns()
        .into_iter()
        .find(|c| c.name == schema::PERSON_ID)
        .ok_or_else(|| QueryError::Internal("no person_id column under the aggregate".into()))?;

    Ok(Checked {
        plan,
        upper,
        aggregate,
        kinds,
        person,
    })
}

/// The plan nodes above the aggregate (top first) and the aggregate; or the first node that is
/// neither.
fn split(plan: &LogicalPlan) -> Result<(Vec<LogicalPlan>, Aggregate), &LogicalPlan> {
    let mut upper = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_) => {
                upper.push(node.clone());
                node = node.inputs()[0];
            }
            LogicalPlan::Aggregate(a) => return Ok((upper, a.clone())),
            other => return Err(other),
        }
    }
}

/// Makes the approved plan safe to run on hostile input, without changing any answer it gives on
/// valid data:
///
/// - DataFusion's analyzer runs first, so the casts it inserts to reconcile types are visible;
/// - under the aggregate (where rows are read) every expression becomes *total*: a cast becomes
///   TRY_CAST, integer division and remainder by 0 give NULL and by −1 cannot overflow, and
///   integer `abs` cannot overflow. Otherwise one row's value could make a query fail, and
///   whether a query failed is itself a disclosure (a bit about that row, with no noise);
/// - `experience JOIN operational ON case_id` also requires the two rows to name the same
///   person, so a mislinked case can never carry one person's data into another's
///   contribution bound.
fn harden(state: &SessionState, sql: &str, q: Checked) -> Result<Checked, QueryError> {
    let analyzed = state
        .analyzer()
        .execute_and_check(q.plan.clone(), state.config_options(), |_, _| {})
        .map_err(|e| plan_error(sql, e))?;
    let (upper, aggregate) = split(&analyzed).map_err(|n| {
        QueryError::Internal(format!("analyzed plan changed shape at {}", n.display()))
    })?;
    let hardened = LogicalPlan::Aggregate(aggregate)
        .transform_up(harden_node)?
        .data;
    let mut plan = hardened.clone();
    for node in upper.iter().rev() {
        plan = node.with_new_exprs(node.expressions(), vec![plan])?;
    }
    let (upper, aggregate) = split(&plan).map_err(|n| {
        QueryError::Internal(format!("hardened plan changed shape at {}", n.display()))
    })?;
    if plan.schema().as_arrow() != analyzed.schema().as_arrow() {
        return Err(QueryError::Internal(
            "hardening changed the query's output schema".into(),
        ));
    }
    Ok(Checked {
        plan,
        upper,
        aggregate,
        ..q
    })
}

fn harden_node(node: LogicalPlan) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    match node {
        LogicalPlan::Join(j) => {
            let person = |side: &LogicalPlan| {
                side.schema()
                    .qualified_field_with_unqualified_name(schema::PERSON_ID)
                    .map(|(q, _)| Expr::Column(Column::new(q.cloned(), schema::PERSON_ID)))
            };
            let same_person = person(&j.left)?.eq(person(&j.right)?);
            let filter = Some(match j.filter.clone() {
                Some(f) => f.and(same_person),
                None => same_person,
            });
            Ok(Transformed::yes(LogicalPlan::Join(
                datafusion::logical_expr::Join { filter, ..j },
            )))
        }
        LogicalPlan::Filter(_) | LogicalPlan::Aggregate(_) => {
            let input = Arc::clone(node.inputs()[0].schema());
            let names = NamePreserver::new(&node);
            node.map_expressions(|e| {
                let saved = names.save(&e);
                let out = e.transform_up(|x| total_expr(x, &input))?;
                Ok(if out.transformed {
                    Transformed::yes(saved.restore(out.data))
                } else {
                    out
                })
            })
        }
        other => Ok(Transformed::no(other)),
    }
}

/// A literal divisor other than 0 and −1 (the only integer divisors that fail).
fn is_safe_divisor(e: &Expr) -> bool {
    match e {
        Expr::Literal(v, _) => {
            !v.is_null()
                && v.cast_to(&DataType::Int64).is_ok_and(|v| {
                    !matches!(
                        v,
                        datafusion::scalar::ScalarValue::Int64(Some(0 | -1))
                            | datafusion::scalar::ScalarValue::Int64(None)
                    )
                })
        }
        Expr::Cast(c) => is_safe_divisor(&c.expr),
        Expr::TryCast(c) => is_safe_divisor(&c.expr),
        _ => false,
    }
}

/// One step of [`harden`] on an expression (children already rewritten).
fn total_expr(
    e: Expr,
    schema: &datafusion::common::DFSchema,
) -> datafusion::error::Result<Transformed<Expr>> {
    use datafusion::logical_expr::{BinaryExpr, Cast, TryCast, when};
    use datafusion::scalar::ScalarValue;
    Ok(match e {
        Expr::Cast(Cast { expr, field }) => {
            Transformed::yes(Expr::TryCast(TryCast { expr, field }))
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Divide | Operator::Modulo)
                && left.get_type(schema)?.is_integer()
                && right.get_type(schema)?.is_integer()
                && !is_safe_divisor(&right) =>
        {
            let ty = left.get_type(schema)?;
            let rty = right.get_type(schema)?;
            let zero = Expr::Literal(ScalarValue::new_zero(&rty)?, None);
            let minus_one = Expr::Literal(ScalarValue::new_negative_one(&rty)?, None);
            let guarded = Expr::BinaryExpr(BinaryExpr::new(
                left.clone(),
                op,
                Box::new(datafusion::functions::core::expr_fn::nullif(
                    *right.clone(),
                    zero,
                )),
            ));
            // x / −1 = −x (wrapping, as DataFusion's integer arithmetic does); x % −1 = 0.
            let by_minus_one = match op {
                Operator::Divide => Expr::Negative(left),
                _ => Expr::Literal(ScalarValue::new_zero(&ty)?, None),
            };
            Transformed::yes(when((*right).eq(minus_one), by_minus_one).otherwise(guarded)?)
        }
        Expr::ScalarFunction(f)
            if f.func.name() == "abs"
                && f.args.len() == 1
                && f.args[0].get_type(schema)?.is_integer() =>
        {
            // abs(MIN) overflows and fails; greatest(x, −x) is abs(x) elsewhere and MIN there.
            let x = f.args[0].clone();
            Transformed::yes(datafusion::functions::core::expr_fn::greatest(vec![
                x.clone(),
                Expr::Negative(Box::new(x)),
            ]))
        }
        other => Transformed::no(other),
    })
}

/// The refusal for a plan node that may not appear where it is.
fn shape_rejection(sql: &str, node: &LogicalPlan, below_aggregate: bool) -> Rejection {
    match node {
        LogicalPlan::Window(_) => Rejection::new(Rule::WindowNotAllowed, "window functions are not allowed").at_word(sql, "over"),
        LogicalPlan::Distinct(_) => Rejection::new(
            Rule::DistinctNotAllowed,
            "SELECT DISTINCT is not allowed; use GROUP BY with an aggregate",
        )
        .at_word(sql, "distinct"),
        LogicalPlan::Union(_) => Rejection::new(Rule::SetOperationNotAllowed, "UNION, INTERSECT and EXCEPT are not allowed")
            .at_word(sql, "union")
            .at_word(sql, "intersect")
            .at_word(sql, "except"),
        LogicalPlan::Aggregate(_) => Rejection::new(
            Rule::NestedAggregation,
            "only one level of aggregation is allowed (no aggregates over subqueries)",
        ),
        LogicalPlan::Subquery(_) | LogicalPlan::SubqueryAlias(_) | LogicalPlan::Unnest(_) => {
            Rejection::new(Rule::SubqueryNotAllowed, "subqueries, CTEs and derived tables are not allowed")
                .at_word(sql, "with")
        }
        LogicalPlan::Projection(_) if below_aggregate => {
            Rejection::new(Rule::SubqueryNotAllowed, "subqueries, CTEs and derived tables are not allowed")
                .at_word(sql, "with")
        }
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Rejection::new(
            Rule::TableNotAllowed,
            "a query must read the experience or operational table",
        ),
        LogicalPlan::TableScan(_) | LogicalPlan::Join(_) | LogicalPlan::Filter(_) if !below_aggregate => Rejection::new(
            Rule::RawRows,
            "only aggregates may be selected (COUNT, SUM, AVG, STDDEV, VARIANCE), optionally grouped by dimensions",
        )
        .at_word(sql, "select"),
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => {
            Rejection::new(Rule::NotAQuery, "EXPLAIN is not allowed").at_word(sql, "explain")
        }
        other => Rejection::new(
            Rule::NotAQuery,
            format!("{} is not allowed in a query", other.display().to_string().split(':').next().unwrap_or("this")),
        ),
    }
}

/// Collects the plan nodes under the aggregate, checking their shape.
fn collect_below(
    sql: &str,
    plan: &LogicalPlan,
    out: &mut Vec<LogicalPlan>,
) -> Result<(), Rejection> {
    match plan {
        LogicalPlan::Filter(f) => {
            out.push(plan.clone());
            collect_below(sql, &f.input, out)
        }
        LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => {
            scanned_table(sql, plan).map(|_| ())
        }
        LogicalPlan::Join(j) => {
            let left = scanned_table(sql, &j.left).map_err(|r| join_side(sql, r))?;
            let right = scanned_table(sql, &j.right).map_err(|r| join_side(sql, r))?;
            // The SQL planner leaves `ON a = b` in `filter`; the optimizer later moves it to `on`.
            let keys: Vec<(&Expr, &Expr)> = match (&j.on[..], &j.filter) {
                ([(l, r)], None) => vec![(l, r)],
                ([], Some(Expr::BinaryExpr(b))) if b.op == Operator::Eq => {
                    vec![(&*b.left, &*b.right)]
                }
                _ => vec![],
            };
            let on_case_id = keys.len() == 1
                && keys.iter().all(|(l, r)| {
                    matches!((l, r), (Expr::Column(a), Expr::Column(b))
                        if a.name == schema::JOIN_KEY && b.name == schema::JOIN_KEY && a.relation != b.relation)
                });
            let other_identifier = keys
                .iter()
                .flat_map(|(l, r)| [l, r])
                .chain(j.filter.iter().collect::<Vec<_>>().iter())
                .find_map(|e| match e {
                    Expr::Column(c) if is_identifier(c) && c.name != schema::JOIN_KEY => {
                        Some(c.name.clone())
                    }
                    _ => None,
                });
            if let Some(name) = other_identifier {
                return Err(identifier_rejection(sql, &name));
            }
            if j.join_type != JoinType::Inner || !on_case_id || left == right {
                return Err(Rejection::new(
                    Rule::JoinNotAllowed,
                    "the only join allowed is experience JOIN operational ON <experience>.case_id = <operational>.case_id",
                )
                .at_word(sql, "join")
                .at_word(sql, ","));
            }
            Ok(())
        }
        other => Err(shape_rejection(sql, other, true)),
    }
}

fn join_side(sql: &str, r: Rejection) -> Rejection {
    if r.rule == Rule::TableNotAllowed {
        r
    } else {
        Rejection::new(
            Rule::JoinNotAllowed,
            "joins may only combine the experience and operational tables",
        )
        .at_word(sql, "join")
    }
}

/// The table a scan (optionally under an alias) reads.
fn scanned_table(sql: &str, plan: &LogicalPlan) -> Result<Table, Rejection> {
    match plan {
        LogicalPlan::SubqueryAlias(a) if matches!(a.input.as_ref(), LogicalPlan::TableScan(_)) => {
            scanned_table(sql, &a.input)
        }
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table();
            let qualified_ok = match (scan.table_name.catalog(), scan.table_name.schema()) {
                (None, None) => true,
                (c, s) => c.is_none_or(|c| c == "datafusion") && s.is_none_or(|s| s == "public"),
            };
            match Table::from_name(name) {
                Some(t) if qualified_ok && scan.filters.is_empty() => Ok(t),
                _ => Err(Rejection::new(
                    Rule::TableNotAllowed,
                    format!(
                        "only the experience and operational tables may be queried, not {name}"
                    ),
                )
                .at_word(sql, name)),
            }
        }
        other => Err(shape_rejection(sql, other, true)),
    }
}

/// The expressions of a plan node that the walker must see. Join keys are checked by
/// [`collect_below`] itself.
fn node_expressions(node: &LogicalPlan) -> Vec<Expr> {
    match node {
        LogicalPlan::Join(_) | LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => vec![],
        other => other.expressions(),
    }
}

fn identifier_rejection(sql: &str, name: &str) -> Rejection {
    Rejection::new(
        Rule::IdentifierNotAllowed,
        format!("{name} is an identifier: it may not be selected, grouped, filtered or computed on (only COUNT(DISTINCT person_id) is allowed)"),
    )
    .at_word(sql, name)
}

fn is_identifier(c: &Column) -> bool {
    schema::column_anywhere(&c.name).is_some_and(|col| col.kind == Kind::Identifier)
}

/// Refuses any identifier column inside `e`.
fn check_identifiers(sql: &str, e: &Expr) -> Result<(), Rejection> {
    let mut found = None;
    let _ = e.apply(|x| {
        if let Expr::Column(c) | Expr::OuterReferenceColumn(_, c) = x
            && is_identifier(c)
        {
            found = Some(c.name.clone());
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    match found {
        Some(name) => Err(identifier_rejection(sql, &name)),
        None => Ok(()),
    }
}

/// `COUNT(DISTINCT person_id)` is the one place an identifier may appear.
fn is_count_persons(af: &AggregateFunction) -> bool {
    af.func.name() == "count"
        && af.params.distinct
        && af.params.args.len() == 1
        && matches!(&af.params.args[0], Expr::Column(c) if c.name == schema::PERSON_ID)
}

/// An aggregate's `FILTER (WHERE ...)` must be a condition. DataFusion plans a non-boolean one
/// (e.g. `FILTER (WHERE 'phone')`) and only fails when it runs; refuse it here, with its place.
fn check_filter_type(
    sql: &str,
    e: &Expr,
    input: &datafusion::common::DFSchema,
) -> Result<(), Rejection> {
    let Expr::AggregateFunction(af) = strip_alias(e) else {
        return Ok(());
    };
    let Some(f) = &af.params.filter else {
        return Ok(());
    };
    match f.get_type(input) {
        Ok(DataType::Boolean | DataType::Null) => Ok(()),
        Ok(other) => Err(Rejection::new(
            Rule::PlanError,
            format!("FILTER (WHERE {f}) is of type {other}; it must be a true/false condition"),
        )
        .at_word(sql, "filter")),
        Err(err) => Err(
            Rejection::new(Rule::PlanError, format!("FILTER (WHERE {f}): {err}"))
                .at_word(sql, "filter"),
        ),
    }
}

fn check_aggregate_identifiers(sql: &str, e: &Expr) -> Result<(), Rejection> {
    match strip_alias(e) {
        Expr::AggregateFunction(af) => {
            if !is_count_persons(af) {
                for a in &af.params.args {
                    check_identifiers(sql, a)?;
                }
            }
            if let Some(f) = &af.params.filter {
                check_identifiers(sql, f)?;
            }
            for s in &af.params.order_by {
                check_identifiers(sql, &s.expr)?;
            }
            Ok(())
        }
        other => check_identifiers(sql, other),
    }
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

/// Functions allowed over aggregates but not on rows (under the aggregate): `power` fails on
/// some values (0 to a negative power), and a failure that depends on one row's value discloses
/// it.
pub const AGGREGATE_ONLY_FUNCTIONS: &[&str] = &["power"];

/// Checks every sub-expression against the allow-list. `below` is true for expressions that
/// see rows (WHERE, aggregate arguments and filters), which must not be able to fail on a
/// value: no `power`, no casts to DECIMAL (decimal arithmetic overflows and fails), no
/// INTERVAL arithmetic, literal LIKE patterns and literal ROUND/TRUNC precisions.
fn check_expr(sql: &str, e: &Expr, below: bool) -> Result<(), Rejection> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut err = None;
    let _ = e.apply(|x| {
        let r = if below { row_safety(sql, x) } else { Ok(()) };
        let r = r.and_then(|()| match x {
            Expr::Alias(_)
            | Expr::Column(_)
            | Expr::Literal(..)
            | Expr::BinaryExpr(_)
            | Expr::Like(_)
            | Expr::Not(_)
            | Expr::IsNotNull(_)
            | Expr::IsNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Negative(_)
            | Expr::Between(_)
            | Expr::Case(_)
            | Expr::Cast(_)
            | Expr::TryCast(_)
            | Expr::InList(_) => Ok(()),
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                if ALLOWED_FUNCTIONS.contains(&name) {
                    Ok(())
                } else {
                    Err(Rejection::new(
                        Rule::FunctionNotAllowed,
                        format!(
                            "function {name} is not allowed; allowed: {}",
                            ALLOWED_FUNCTIONS.join(", ")
                        ),
                    )
                    .at_word(sql, name))
                }
            }
            Expr::AggregateFunction(af) => Err(Rejection::new(
                Rule::NestedAggregation,
                "aggregates are only allowed in the SELECT list and HAVING",
            )
            .at_word(sql, af.func.name())),
            Expr::WindowFunction(_) => Err(Rejection::new(
                Rule::WindowNotAllowed,
                "window functions are not allowed",
            )
            .at_word(sql, "over")),
            Expr::Exists(_)
            | Expr::InSubquery(_)
            | Expr::ScalarSubquery(_)
            | Expr::SetComparison(_)
            | Expr::OuterReferenceColumn(..) => Err(Rejection::new(
                Rule::SubqueryNotAllowed,
                "subqueries are not allowed",
            )
            .at_word(sql, "select")
            .map_position_nth(sql, "select", 1)),
            Expr::GroupingSet(_) => Err(Rejection::new(
                Rule::GroupingSetsNotAllowed,
                "GROUPING SETS, ROLLUP and CUBE are not allowed",
            )
            .at_word(sql, "rollup")
            .at_word(sql, "cube")
            .at_word(sql, "grouping")),
            #[allow(deprecated)]
            Expr::Wildcard { .. } => Err(Rejection::new(
                Rule::RawRows,
                "* may only appear in COUNT(*)",
            )),
            Expr::Placeholder(_) => Err(Rejection::new(
                Rule::FunctionNotAllowed,
                "query parameters ($1, ?) are not allowed",
            )),
            Expr::SimilarTo(_) => Err(Rejection::new(
                Rule::FunctionNotAllowed,
                "SIMILAR TO is not allowed",
            )
            .at_word(sql, "similar")),
            other => Err(Rejection::new(
                Rule::FunctionNotAllowed,
                format!("expression {} is not allowed", other.variant_name()),
            )),
        });
        match r {
            Ok(()) => Ok(TreeNodeRecursion::Continue),
            Err(rej) => {
                err = Some(rej);
                Ok(TreeNodeRecursion::Stop)
            }
        }
    });
    match err {
        Some(r) => Err(r),
        None => Ok(()),
    }
}

/// The row-level restrictions of [`check_expr`] for one expression node.
fn row_safety(sql: &str, x: &Expr) -> Result<(), Rejection> {
    use datafusion::scalar::ScalarValue;
    let unsafe_type = |t: &DataType| {
        matches!(
            t,
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
                | DataType::Interval(_)
                | DataType::Duration(_)
        )
    };
    match x {
        Expr::ScalarFunction(f) if AGGREGATE_ONLY_FUNCTIONS.contains(&f.func.name()) => Err(
            Rejection::new(
                Rule::FunctionNotAllowed,
                format!(
                    "{} may be applied to aggregates (e.g. {}(STDDEV(x), 2)) but not to row values",
                    f.func.name(),
                    f.func.name()
                ),
            )
            .at_word(sql, f.func.name()),
        ),
        Expr::ScalarFunction(f)
            if matches!(f.func.name(), "round" | "trunc")
                && f.args.get(1).is_some_and(|p| !matches!(p, Expr::Literal(..))) =>
        {
            Err(Rejection::new(
                Rule::FunctionNotAllowed,
                format!("the precision of {} must be a constant", f.func.name()),
            )
            .at_word(sql, f.func.name()))
        }
        Expr::Cast(c) if unsafe_type(c.field.data_type()) => Err(Rejection::new(
            Rule::FunctionNotAllowed,
            format!("casts to {} are not supported; use DOUBLE", c.field.data_type()),
        )
        .at_word(sql, "cast")),
        Expr::TryCast(c) if unsafe_type(c.field.data_type()) => Err(Rejection::new(
            Rule::FunctionNotAllowed,
            format!("casts to {} are not supported; use DOUBLE", c.field.data_type()),
        )
        .at_word(sql, "try_cast")),
        Expr::Literal(v, _) if unsafe_type(&v.data_type()) && !matches!(v, ScalarValue::Null) => {
            Err(Rejection::new(
                Rule::FunctionNotAllowed,
                "INTERVAL and DECIMAL values are not supported; compare dates with DATE 'YYYY-MM-DD' literals",
            )
            .at_word(sql, "interval"))
        }
        Expr::Like(l) if !matches!(*l.pattern, Expr::Literal(..)) => Err(Rejection::new(
            Rule::FunctionNotAllowed,
            "the pattern of LIKE must be a constant",
        )
        .at_word(sql, "like")),
        _ => Ok(()),
    }
}

trait NthPosition {
    fn map_position_nth(self, sql: &str, word: &str, nth: usize) -> Self;
}

impl NthPosition for Rejection {
    /// Prefers the `nth` occurrence of `word` (e.g. the SELECT of a subquery).
    fn map_position_nth(mut self, sql: &str, word: &str, nth: usize) -> Self {
        if let Some(p) = locate_word(sql, word, nth) {
            self.position = Some(p);
        }
        self
    }
}

fn check_group_key(sql: &str, g: &Expr) -> Result<(), Rejection> {
    let bad = |what: &str| {
        Rejection::new(
            Rule::GroupByNotAllowed,
            format!(
                "GROUP BY {what}: only dimension columns and dates truncated to month, quarter or year may be grouped"
            ),
        )
    };
    match strip_alias(g) {
        Expr::GroupingSet(_) => Err(Rejection::new(
            Rule::GroupingSetsNotAllowed,
            "GROUPING SETS, ROLLUP and CUBE are not allowed",
        )
        .at_word(sql, "rollup")
        .at_word(sql, "cube")
        .at_word(sql, "grouping")),
        Expr::Column(c) => match schema::column_anywhere(&c.name).map(|c| c.kind) {
            Some(Kind::Dimension) => Ok(()),
            Some(Kind::Identifier) => Err(identifier_rejection(sql, &c.name)),
            Some(Kind::Measure) => {
                Err(bad(&format!("{} is a measure", c.name)).at_word(sql, &c.name))
            }
            Some(Kind::Date) => Err(bad(&format!(
                "{} is a date; use date_trunc('month'|'quarter'|'year', {})",
                c.name, c.name
            ))
            .at_word(sql, &c.name)),
            None => Err(bad(&format!("{} is not a CX column", c.name))),
        },
        Expr::ScalarFunction(f) if matches!(f.func.name(), "date_trunc" | "date_part") => {
            let ok = match f.args.as_slice() {
                [Expr::Literal(v, _), Expr::Column(c)] => {
                    let unit = v.to_string().to_lowercase();
                    DATE_GRANULARITIES.contains(&unit.as_str())
                        && schema::column_anywhere(&c.name).is_some_and(|c| c.kind == Kind::Date)
                }
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(
                    bad("on a date must truncate a date column to month, quarter or year")
                        .at_word(sql, f.func.name()),
                )
            }
        }
        other => Err(bad(&format!("expression {other}")).at_word(sql, "group")),
    }
}

fn check_aggregate(sql: &str, e: &Expr) -> Result<AggKind, Rejection> {
    let Expr::AggregateFunction(af) = strip_alias(e) else {
        return Err(Rejection::new(
            Rule::AggregateNotAllowed,
            "unexpected aggregate expression",
        ));
    };
    let name = af.func.name();
    let refuse = |why: String| Rejection::new(Rule::AggregateNotAllowed, why).at_word(sql, name);
    let percentile = crate::percentile::classify(sql, af)?;
    if percentile.is_none() && !af.params.order_by.is_empty() {
        return Err(refuse(format!(
            "ordered aggregates ({name} with ORDER BY / WITHIN GROUP) are not allowed"
        )));
    }
    let kind = if let Some(k) = percentile {
        k
    } else {
        match name {
            "count" if is_count_persons(af) => AggKind::CountPersons,
            "count" => AggKind::Count,
            "sum" => AggKind::Sum,
            "avg" => AggKind::Avg,
            "var" => AggKind::Variance { population: false },
            "var_pop" => AggKind::Variance { population: true },
            "stddev" => AggKind::Stddev { population: false },
            "stddev_pop" => AggKind::Stddev { population: true },
            other => {
                return Err(refuse(format!(
                    "aggregate {other} is not allowed; allowed: COUNT, COUNT(DISTINCT person_id), SUM, AVG, STDDEV, STDDEV_POP, VARIANCE, VAR_POP, and (dp mode) MEDIAN, PERCENTILE_CONT, APPROX_PERCENTILE_CONT"
                )));
            }
        }
    };
    if af.params.distinct && kind != AggKind::CountPersons {
        return Err(Rejection::new(
            Rule::DistinctNotAllowed,
            format!("{name}(DISTINCT ...) is not allowed; the only distinct count is COUNT(DISTINCT person_id)"),
        )
        .at_word(sql, "distinct"));
    }
    if kind != AggKind::CountPersons {
        for a in &af.params.args {
            check_expr(sql, a, true)?;
        }
    }
    if let Some(f) = &af.params.filter {
        check_expr(sql, f, true)?;
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;

    async fn verdict(sql: &str) -> Result<ApprovedQuery, Rule> {
        let ctx = planning_context().expect("context");
        approve(&ctx.state(), sql).await.map_err(|e| match e {
            QueryError::Rejected(r) => r.rule,
            QueryError::Internal(m) => panic!("internal error for {sql}: {m}"),
        })
    }

    #[tokio::test]
    async fn accepts_grouped_aggregates() {
        for sql in [
            "SELECT journey_stage, channel, AVG(trust), COUNT(*) FROM experience WHERE life_experience = 'approaching_retirement' GROUP BY journey_stage, channel",
            "SELECT COUNT(DISTINCT person_id) FROM operational",
            "SELECT date_trunc('quarter', response_date) AS q, avg(satisfaction) FROM experience GROUP BY 1 ORDER BY 1",
            "SELECT e.channel, avg(o.wait_minutes), stddev(e.satisfaction) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.channel HAVING count(*) > 20",
            "SELECT agency, AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END) AS trust_share FROM experience GROUP BY agency",
            "SELECT agency, COUNT(*) FILTER (WHERE trust >= 4) FROM experience GROUP BY agency LIMIT 3",
            "SELECT outcome, variance(processing_days), var_pop(processing_days), stddev_pop(wait_minutes) FROM operational GROUP BY outcome",
        ] {
            let q = verdict(sql)
                .await
                .unwrap_or_else(|r| panic!("{sql} refused: {r}"));
            assert!(!q.columns().is_empty());
        }
    }

    #[tokio::test]
    async fn refuses_each_rule() {
        let cases = [
            ("SELECT * FROM experience", Rule::RawRows),
            ("SELECT trust FROM experience", Rule::RawRows),
            (
                "SELECT person_id, count(*) FROM experience GROUP BY person_id",
                Rule::IdentifierNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience WHERE person_id = 'x'",
                Rule::IdentifierNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience GROUP BY lower(person_id)",
                Rule::IdentifierNotAllowed,
            ),
            (
                "SELECT count(DISTINCT case_id) FROM experience",
                Rule::IdentifierNotAllowed,
            ),
            (
                "SELECT max(trust) FROM experience",
                Rule::AggregateNotAllowed,
            ),
            (
                "SELECT min(wait_minutes) FROM operational",
                Rule::AggregateNotAllowed,
            ),
            (
                "SELECT trust, count(*) FROM experience GROUP BY trust",
                Rule::GroupByNotAllowed,
            ),
            (
                "SELECT response_date, count(*) FROM experience GROUP BY response_date",
                Rule::GroupByNotAllowed,
            ),
            (
                "SELECT agency, count(*) OVER () FROM experience",
                Rule::WindowNotAllowed,
            ),
            (
                "SELECT count(*) FROM (SELECT * FROM experience) t",
                Rule::SubqueryNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience WHERE trust > (SELECT avg(trust) FROM experience)",
                Rule::SubqueryNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience UNION ALL SELECT count(*) FROM operational",
                Rule::SetOperationNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience a JOIN experience b ON a.case_id = b.case_id",
                Rule::JoinNotAllowed,
            ),
            (
                "SELECT count(*) FROM experience e JOIN operational o ON e.agency = o.agency",
                Rule::JoinNotAllowed,
            ),
            ("DROP TABLE experience", Rule::NotAQuery),
            (
                "INSERT INTO experience SELECT * FROM experience",
                Rule::NotAQuery,
            ),
            (
                "SELECT count(*) FROM experience; SELECT 1",
                Rule::MultipleStatements,
            ),
            ("SELEC count(*) FROM experience", Rule::SyntaxError),
            ("SELECT count(*) FROM secrets", Rule::TableNotAllowed),
            (
                "SELECT count(DISTINCT agency) FROM experience",
                Rule::DistinctNotAllowed,
            ),
            (
                "SELECT agency, count(*) FROM experience GROUP BY ROLLUP(agency)",
                Rule::GroupingSetsNotAllowed,
            ),
            ("SELECT 1", Rule::TableNotAllowed),
            ("SELECT count(nosuch) FROM experience", Rule::PlanError),
        ];
        for (sql, rule) in cases {
            match verdict(sql).await {
                Ok(_) => panic!("{sql} was accepted, expected {rule}"),
                Err(got) => assert_eq!(got, rule, "{sql}"),
            }
        }
    }

    #[tokio::test]
    async fn refuses_the_linkage_key_anywhere_with_its_position() {
        let ctx = planning_context().expect("context");
        for (sql, line, column) in [
            (
                "SELECT count(*) FROM experience WHERE ssn = '123456789'",
                1,
                39,
            ),
            (
                "SELECT count(*)\nFROM experience e\nWHERE e.SSN IS NOT NULL",
                3,
                9,
            ),
            (
                "SELECT agency, count(*) FROM experience GROUP BY agency, linkage_key",
                1,
                58,
            ),
            ("SELECT count(DISTINCT ssn) FROM operational", 1, 23),
            ("SELECT count(*) FROM linkage", 1, 22),
            (
                "SELECT count(*) FROM experience e JOIN linkage l ON e.person_id = l.person_id",
                1,
                40,
            ),
            (
                "SELECT avg(trust) FILTER (WHERE \"ssn\" > '0') FROM experience",
                1,
                33,
            ),
        ] {
            let r = match approve(&ctx.state(), sql).await {
                Err(QueryError::Rejected(r)) => r,
                other => panic!("{sql}: expected a refusal, got {other:?}"),
            };
            assert_eq!(r.rule, Rule::IdentifierNotAllowed, "{sql}: {}", r.reason);
            assert!(r.reason.contains("linkage key"), "{sql}: {}", r.reason);
            let at = r.position.map(|p| (p.line, p.column));
            assert_eq!(at, Some((line, column)), "{sql}");
        }
        // A string that happens to say ssn is only a string.
        let q = verdict("SELECT count(*) FROM experience WHERE service = 'ssn'").await;
        assert!(q.is_ok());
    }

    #[tokio::test]
    async fn names_the_position_of_an_identifier() {
        let ctx = planning_context().expect("context");
        let err = approve(
            &ctx.state(),
            "SELECT agency, count(*)\nFROM experience\nWHERE person_id = 'p1' GROUP BY agency",
        )
        .await
        .expect_err("must refuse");
        let QueryError::Rejected(r) = err else {
            panic!("not a rejection")
        };
        assert_eq!(r.rule, Rule::IdentifierNotAllowed);
        assert_eq!(
            r.position,
            Some(crate::rules::Position { line: 3, column: 7 })
        );
    }

    /// Runs `sql` as a node would (its k-only partial plan) over `experience` and `operational`.
    async fn run_partial(
        ctx: &datafusion::execution::context::SessionContext,
        sql: &str,
    ) -> Result<Vec<datafusion::arrow::array::RecordBatch>, String> {
        let q = approve(&ctx.state(), sql)
            .await
            .map_err(|e| format!("refused: {e}"))?;
        let plan = q.partial_plan().map_err(|e| e.to_string())?;
        ctx.execute_logical_plan(plan)
            .await
            .map_err(|e| e.to_string())?
            .collect()
            .await
            .map_err(|e| e.to_string())
    }

    fn survey(scores: &[&str]) -> datafusion::arrow::array::RecordBatch {
        use crate::testdata::{all, batch};
        let n = scores.len();
        let people: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let cases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let people: Vec<&str> = people.iter().map(String::as_str).collect();
        let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
        batch(
            Table::Experience,
            &[
                ("person_id", all(&people)),
                ("case_id", all(&cases)),
                ("agency", all(&vec!["SSA"; n])),
                ("service", all(&vec!["Retirement \\"; n])),
                ("channel", all(&vec!["phone"; n])),
                ("response_date", all(&vec!["2025-08-01"; n])),
                ("trust", all(scores)),
            ],
        )
    }

    /// A query that fails on one row's value tells whoever sent it something about that row,
    /// with no noise and no k: every row-level expression must evaluate on any value.
    #[tokio::test]
    async fn row_values_cannot_make_a_query_fail() {
        let ctx = crate::testdata::context(vec![survey(&["1", "3", "4", "5"])], vec![]);
        for sql in [
            // integer division and remainder by zero (trust = 3), and MIN / -1
            "SELECT COUNT(*) FROM experience WHERE 10 / (trust - 3) > 0",
            "SELECT COUNT(*) FROM experience WHERE 10 % (trust - 3) = 1",
            "SELECT COUNT(*) FROM experience WHERE CASE WHEN trust = 3 THEN 1 / (trust - 3) ELSE 0 END = 0",
            "SELECT COUNT(*) FROM experience WHERE (trust + 9223372036854775804) / -1 > 0",
            // abs(i64::MIN) overflows (trust = 4 wraps to it)
            "SELECT COUNT(*) FROM experience WHERE abs(trust + 9223372036854775804) > 0",
            // casts that fail on some values, explicit and implicit
            "SELECT COUNT(*) FROM experience WHERE CAST(CASE WHEN trust = 4 THEN 'x' ELSE '1' END AS INT) = 1",
            "SELECT COUNT(*) FROM experience WHERE CAST(trust * 100 AS TINYINT) > 0",
            "SELECT COUNT(*) FROM experience WHERE response_date > CASE WHEN trust = 5 THEN 'garbage' ELSE '2020-01-01' END",
        ] {
            if let Err(e) = run_partial(&ctx, sql).await {
                panic!("{sql}: {e}");
            }
        }
    }

    #[tokio::test]
    async fn row_level_expressions_that_can_fail_are_refused() {
        for (sql, word) in [
            (
                "SELECT COUNT(*) FROM experience WHERE power(trust - 3, -1) > 0",
                "power",
            ),
            ("SELECT AVG(power(trust, 2)) FROM experience", "power"),
            (
                "SELECT COUNT(*) FROM experience WHERE CAST(trust AS DECIMAL(3, 1)) > 1",
                "cast",
            ),
            (
                "SELECT COUNT(*) FROM experience WHERE response_date + INTERVAL '1 day' > DATE '2025-01-01'",
                "interval",
            ),
            (
                "SELECT COUNT(*) FROM experience WHERE channel LIKE service",
                "like",
            ),
            ("SELECT AVG(round(trust, trust)) FROM experience", "round"),
        ] {
            let ctx = planning_context().expect("context");
            match approve(&ctx.state(), sql).await {
                Err(QueryError::Rejected(r)) => {
                    assert_eq!(r.rule, Rule::FunctionNotAllowed, "{sql}: {r}");
                    assert!(r.position.is_some(), "{sql}: no position ({word})");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        // Over aggregates, where only released values are seen, they stay available.
        verdict("SELECT agency, power(STDDEV(trust), 2) AS v FROM experience GROUP BY agency")
            .await
            .expect("power over an aggregate");
    }

    #[tokio::test]
    async fn a_mislinked_case_joins_no_one_else() {
        use crate::testdata::{all, batch, context};
        let experience = batch(
            Table::Experience,
            &[
                ("person_id", all(&["p1", "p2"])),
                ("case_id", all(&["c1", "c2"])),
                ("channel", all(&["phone", "phone"])),
                ("trust", all(&["4", "5"])),
            ],
        );
        // c2's transaction names another person (p3): it must not join p2's survey.
        let operational = batch(
            Table::Operational,
            &[
                ("person_id", all(&["p1", "p3"])),
                ("case_id", all(&["c1", "c2"])),
                ("channel", all(&["phone", "phone"])),
                ("wait_minutes", all(&["10", "50"])),
            ],
        );
        let ctx = context(vec![experience], vec![operational]);
        let out = run_partial(
            &ctx,
            "SELECT COUNT(*) AS n, SUM(o.wait_minutes) AS w FROM experience e JOIN operational o ON e.case_id = o.case_id",
        )
        .await
        .expect("runs");
        let n = out[0]
            .column_by_name("__a0_n")
            .expect("count")
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .expect("int")
            .value(0);
        assert_eq!(n, 1, "only p1's own case joins");
    }
}
