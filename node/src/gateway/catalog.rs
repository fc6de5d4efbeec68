//! What PostgreSQL clients ask about the database, answered on the analyst's machine from the CX
//! schema ([`cxfed_queries::schema`]): `SET`, `SHOW`, `version()`, and `pg_catalog` /
//! `information_schema` queries about the two tables (what psql's `\d`, drivers and BI tools
//! send to browse). Nothing here reaches a node, so nothing here is charged or logged there.
//!
//! A catalog query is parsed (PostgreSQL dialect) and evaluated over small virtual catalog
//! relations built from the schema:
//!
//! ```text
//!  SELECT <items> FROM <relation> [JOIN …] WHERE <cond> ORDER BY … LIMIT …
//!          │             │                     │
//!          │     rows of pg_class, pg_attribute, information_schema.columns, … (from
//!          │     schema.rs); a relation the gateway does not model has no rows, and an
//!          │     inner join with it has none either
//!          └── each item evaluated per row: columns, literals, = <> < >, AND/OR/NOT, ~ and
//!              OPERATOR(pg_catalog.~), LIKE, IN, IS NULL, CASE, casts, format_type(),
//!              pg_table_is_visible(), version(), current_schema(), …; anything else is NULL
//! ```

use std::cmp::Ordering;
use std::collections::BTreeMap;

use cxfed_queries::schema::{ColumnType, Table};
use datafusion::sql::sqlparser::ast::{
    self, BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, JoinOperator,
    ObjectName, OrderByKind, Query, SelectItem, SetExpr, Statement, TableFactor, UnaryOperator,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// The database name clients see.
pub const DATABASE: &str = "cx";
/// The schema (namespace) holding the two tables.
pub const SCHEMA: &str = "public";
/// The PostgreSQL version the gateway presents (clients pick their catalog queries by it).
pub const SERVER_VERSION: &str = "15.0";
/// Oid of the first table; the second is the next.
const FIRST_TABLE_OID: i64 = 16_384;
const PUBLIC_OID: i64 = 2200;
const PG_CATALOG_OID: i64 = 11;
const INFORMATION_SCHEMA_OID: i64 = 13_000;

/// A catalog value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer (also oids).
    Int(i64),
    /// Text.
    Text(String),
}

impl Val {
    fn text(s: &str) -> Val {
        Val::Text(s.to_string())
    }

    /// The value as PostgreSQL text output.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Val::Null => None,
            Val::Bool(b) => Some(if *b { "t" } else { "f" }.into()),
            Val::Int(i) => Some(i.to_string()),
            Val::Text(s) => Some(s.clone()),
        }
    }

    fn truthy(&self) -> bool {
        matches!(self, Val::Bool(true))
    }

    fn cmp_with(&self, other: &Val) -> Option<Ordering> {
        match (self, other) {
            (Val::Null, _) | (_, Val::Null) => None,
            (Val::Int(a), Val::Int(b)) => Some(a.cmp(b)),
            (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
            (Val::Int(a), Val::Text(b)) => b.trim().parse::<i64>().ok().map(|b| a.cmp(&b)),
            (Val::Text(a), Val::Int(b)) => a.trim().parse::<i64>().ok().map(|a| a.cmp(b)),
            (Val::Bool(a), Val::Text(b)) => parse_bool(b).map(|b| a.cmp(&b)),
            (Val::Text(a), Val::Bool(b)) => parse_bool(a).map(|a| a.cmp(b)),
            (a, b) => Some(a.as_text().cmp(&b.as_text())),
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "on" | "yes" | "1" => Some(true),
        "f" | "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// The session facts catalog answers depend on.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user name the client logged in with.
    pub user: String,
    /// Settings (`SET` changes them; `SHOW` reads them).
    pub settings: BTreeMap<String, String>,
}

impl Session {
    /// A session for `user` with PostgreSQL's usual client-visible defaults.
    pub fn new(user: &str) -> Session {
        let settings = [
            ("server_version", SERVER_VERSION),
            ("server_version_num", "150000"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("datestyle", "ISO, MDY"),
            ("intervalstyle", "postgres"),
            ("timezone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("search_path", "public"),
            ("transaction_isolation", "read committed"),
            ("transaction_read_only", "on"),
            ("default_transaction_read_only", "on"),
            ("max_identifier_length", "63"),
            ("application_name", ""),
            ("extra_float_digits", "1"),
            ("lc_collate", "C"),
            ("lc_ctype", "C"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Session {
            user: user.to_string(),
            settings,
        }
    }

    /// The value `SHOW name` prints, if the setting exists.
    pub fn show(&self, name: &str) -> Option<&str> {
        self.settings
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// The text `version()` returns.
pub fn version() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (cxfed gateway {}: federated CX data, aggregate queries only)",
        env!("CARGO_PKG_VERSION")
    )
}

/// A local answer: named columns and rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<Val>>,
}

/// Why a catalog query could not be answered (the client's query; never sent anywhere).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct CatalogError(pub String);

/// Does `sql` ask about the database rather than the CX data? True for references to
/// `pg_catalog`, `information_schema`, a `pg_*` relation or function, and the session
/// functions clients call on connect. Such SQL is answered here, never sent to the federation.
pub fn is_catalog_query(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    const MARKERS: &[&str] = &[
        "pg_catalog",
        "information_schema",
        "version(",
        "current_schema",
        "current_database",
        "current_user",
        "session_user",
        "current_setting",
        "current_catalog",
        "set_config(",
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "inet_server_addr",
        "txid_current",
    ];
    MARKERS.iter().any(|m| lower.contains(m))
        || lower
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w.starts_with("pg_"))
}

/// Answers a catalog query.
pub fn answer(session: &Session, sql: &str) -> Result<Answer, CatalogError> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| CatalogError(format!("catalog query: {e}")))?;
    let [Statement::Query(q)] = statements.as_slice() else {
        return Err(CatalogError(
            "catalog query: expected one SELECT statement".into(),
        ));
    };
    Eval { session }.query(q)
}

type Row = BTreeMap<String, Val>;

struct Eval<'a> {
    session: &'a Session,
}

/// The CX column type as PostgreSQL names it (`format_type`) and its oid.
pub fn pg_type(ty: ColumnType) -> (&'static str, i64, &'static str) {
    match ty {
        ColumnType::Text => ("text", 25, "text"),
        ColumnType::Date => ("date", 1082, "date"),
        ColumnType::Int8 => ("smallint", 21, "int2"),
        ColumnType::Int32 => ("integer", 23, "int4"),
        ColumnType::Bool => ("boolean", 16, "bool"),
    }
}

fn table_oid(i: usize) -> i64 {
    FIRST_TABLE_OID + i as i64
}

fn relation_rows(name: &str) -> Option<Vec<Row>> {
    let r = |pairs: Vec<(&str, Val)>| -> Row {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    let rows = match name {
        "pg_class" | "pg_tables" => Table::ALL
            .iter()
            .enumerate()
            .map(|(i, t)| {
                r(vec![
                    ("oid", Val::Int(table_oid(i))),
                    ("relname", Val::text(t.name())),
                    ("tablename", Val::text(t.name())),
                    ("schemaname", Val::text(SCHEMA)),
                    ("tableowner", Val::text("cxfed")),
                    ("relnamespace", Val::Int(PUBLIC_OID)),
                    ("nspname", Val::text(SCHEMA)),
                    ("relkind", Val::text("r")),
                    ("relowner", Val::Int(10)),
                    ("relam", Val::Int(2)),
                    ("amname", Val::text("heap")),
                    ("relnatts", Val::Int(t.columns().len() as i64)),
                    ("relchecks", Val::Int(0)),
                    ("relhasindex", Val::Bool(false)),
                    ("hasindexes", Val::Bool(false)),
                    ("relhasrules", Val::Bool(false)),
                    ("hasrules", Val::Bool(false)),
                    ("relhastriggers", Val::Bool(false)),
                    ("hastriggers", Val::Bool(false)),
                    ("relrowsecurity", Val::Bool(false)),
                    ("rowsecurity", Val::Bool(false)),
                    ("relforcerowsecurity", Val::Bool(false)),
                    ("relhasoids", Val::Bool(false)),
                    ("relispartition", Val::Bool(false)),
                    ("relhassubclass", Val::Bool(false)),
                    ("relispopulated", Val::Bool(true)),
                    ("reltablespace", Val::Int(0)),
                    ("reloftype", Val::Int(0)),
                    ("reltoastrelid", Val::Int(0)),
                    ("relpersistence", Val::text("p")),
                    ("relreplident", Val::text("d")),
                    // Row counts are not released exactly: "unknown", as PostgreSQL says for a
                    // table never analyzed.
                    ("reltuples", Val::Int(-1)),
                    ("relpages", Val::Int(0)),
                ])
            })
            .collect(),
        "pg_attribute" => Table::ALL
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                t.columns().iter().enumerate().map(move |(n, c)| {
                    let (format, oid, _) = pg_type(c.ty);
                    r(vec![
                        ("attrelid", Val::Int(table_oid(i))),
                        ("relname", Val::text(t.name())),
                        ("nspname", Val::text(SCHEMA)),
                        ("attname", Val::text(c.name)),
                        ("atttypid", Val::Int(oid)),
                        ("format_type", Val::text(format)),
                        ("atttypmod", Val::Int(-1)),
                        ("attnum", Val::Int(n as i64 + 1)),
                        ("attnotnull", Val::Bool(c.required)),
                        ("attisdropped", Val::Bool(false)),
                        ("atthasdef", Val::Bool(false)),
                        ("attidentity", Val::text("")),
                        ("attgenerated", Val::text("")),
                        ("attcollation", Val::Int(0)),
                        ("attstattarget", Val::Int(-1)),
                        ("attislocal", Val::Bool(true)),
                        ("attinhcount", Val::Int(0)),
                        ("attcompression", Val::text("")),
                    ])
                })
            })
            .collect(),
        "pg_namespace" => [
            (PG_CATALOG_OID, "pg_catalog"),
            (PUBLIC_OID, SCHEMA),
            (INFORMATION_SCHEMA_OID, "information_schema"),
        ]
        .into_iter()
        .map(|(oid, name)| {
            r(vec![
                ("oid", Val::Int(oid)),
                ("nspname", Val::text(name)),
                ("nspowner", Val::Int(10)),
            ])
        })
        .collect(),
        "pg_database" => vec![r(vec![
            ("oid", Val::Int(1)),
            ("datname", Val::text(DATABASE)),
            ("datdba", Val::Int(10)),
            ("encoding", Val::Int(6)),
            ("datallowconn", Val::Bool(true)),
            ("datistemplate", Val::Bool(false)),
        ])],
        "pg_type" => [
            ("bool", 16, 1),
            ("int8", 20, 8),
            ("int2", 21, 2),
            ("int4", 23, 4),
            ("text", 25, -1),
            ("oid", 26, 4),
            ("float8", 701, 8),
            ("varchar", 1043, -1),
            ("date", 1082, 4),
            ("timestamp", 1114, 8),
            ("numeric", 1700, -1),
        ]
        .into_iter()
        .map(|(name, oid, len)| {
            r(vec![
                ("oid", Val::Int(oid)),
                ("typname", Val::text(name)),
                ("typnamespace", Val::Int(PG_CATALOG_OID)),
                ("typlen", Val::Int(len)),
                ("typtype", Val::text("b")),
                ("typbasetype", Val::Int(0)),
                ("typelem", Val::Int(0)),
                ("typarray", Val::Int(0)),
                ("typrelid", Val::Int(0)),
                ("nspname", Val::text("pg_catalog")),
            ])
        })
        .collect(),
        "tables" => Table::ALL
            .iter()
            .map(|t| {
                r(vec![
                    ("table_catalog", Val::text(DATABASE)),
                    ("table_schema", Val::text(SCHEMA)),
                    ("table_name", Val::text(t.name())),
                    ("table_type", Val::text("BASE TABLE")),
                    ("is_insertable_into", Val::text("NO")),
                ])
            })
            .collect(),
        "columns" => Table::ALL
            .iter()
            .flat_map(|t| {
                t.columns().iter().enumerate().map(move |(n, c)| {
                    let (format, _, udt) = pg_type(c.ty);
                    r(vec![
                        ("table_catalog", Val::text(DATABASE)),
                        ("table_schema", Val::text(SCHEMA)),
                        ("table_name", Val::text(t.name())),
                        ("column_name", Val::text(c.name)),
                        ("ordinal_position", Val::Int(n as i64 + 1)),
                        ("data_type", Val::text(format)),
                        ("udt_name", Val::text(udt)),
                        (
                            "is_nullable",
                            Val::text(if c.required { "NO" } else { "YES" }),
                        ),
                        ("column_default", Val::Null),
                        ("is_updatable", Val::text("NO")),
                    ])
                })
            })
            .collect(),
        "schemata" => [SCHEMA, "pg_catalog", "information_schema"]
            .into_iter()
            .map(|s| {
                r(vec![
                    ("catalog_name", Val::text(DATABASE)),
                    ("schema_name", Val::text(s)),
                    ("schema_owner", Val::text("cxfed")),
                ])
            })
            .collect(),
        _ => return None,
    };
    Some(rows)
}

fn object_last(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.to_ascii_lowercase())
        .unwrap_or_default()
}

fn ident_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.to_ascii_lowercase()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_ascii_lowercase()),
        _ => None,
    }
}

impl Eval<'_> {
    fn query(&self, q: &Query) -> Result<Answer, CatalogError> {
        let mut answer = self.set_expr(&q.body)?;
        if let Some(order) = &q.order_by
            && let OrderByKind::Expressions(exprs) = &order.kind
        {
            let keys: Vec<(usize, bool)> = exprs
                .iter()
                .filter_map(|o| {
                    let idx = match &o.expr {
                        Expr::Value(v) => match &v.value {
                            ast::Value::Number(n, _) => n.parse::<usize>().ok()?.checked_sub(1)?,
                            _ => return None,
                        },
                        other => {
                            let name = ident_name(other)?;
                            answer.columns.iter().position(|c| *c == name)?
                        }
                    };
                    Some((idx, o.options.asc != Some(false)))
                })
                .collect();
            answer.rows.sort_by(|a, b| {
                for (i, asc) in &keys {
                    let (x, y) = (a.get(*i), b.get(*i));
                    let o = match (x, y) {
                        (Some(x), Some(y)) => x.cmp_with(y).unwrap_or(Ordering::Equal),
                        _ => Ordering::Equal,
                    };
                    let o = if *asc { o } else { o.reverse() };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            });
        }
        if let Some(ast::LimitClause::LimitOffset {
            limit: Some(limit), ..
        }) = &q.limit_clause
            && let Val::Int(n) = self.expr(limit, &Row::new())
        {
            answer.rows.truncate(usize::try_from(n).unwrap_or(0));
        }
        Ok(answer)
    }

    fn set_expr(&self, body: &SetExpr) -> Result<Answer, CatalogError> {
        match body {
            SetExpr::Select(s) => self.select(s),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { left, right, .. } => {
                let mut l = self.set_expr(left)?;
                let r = self.set_expr(right)?;
                l.rows.extend(r.rows);
                Ok(l)
            }
            _ => Err(CatalogError(
                "catalog query: only SELECT is answered by the gateway".into(),
            )),
        }
    }

    fn select(&self, s: &ast::Select) -> Result<Answer, CatalogError> {
        // The primary relation gives the rows; inner joins with a relation the gateway does
        // not model (or that has no rows) leave none; outer joins add nothing.
        let mut rows: Vec<Row> = match s.from.first() {
            None => vec![Row::new()],
            Some(first) => {
                let mut rows = self.factor_rows(&first.relation);
                let inner_empty = s
                    .from
                    .iter()
                    .skip(1)
                    .any(|t| self.factor_rows(&t.relation).is_empty())
                    || s.from.iter().flat_map(|t| &t.joins).any(|j| {
                        matches!(
                            j.join_operator,
                            JoinOperator::Join(_) | JoinOperator::Inner(_)
                        ) && self.factor_rows(&j.relation).is_empty()
                    });
                if inner_empty {
                    rows.clear();
                }
                rows
            }
        };
        if let Some(cond) = &s.selection {
            rows.retain(|r| self.expr(cond, r).truthy());
        }
        let mut columns = Vec::new();
        let mut out: Vec<Vec<Val>> = rows.iter().map(|_| Vec::new()).collect();
        for item in &s.projection {
            match item {
                SelectItem::UnnamedExpr(e) => {
                    columns.push(output_name(e));
                    for (o, r) in out.iter_mut().zip(&rows) {
                        o.push(self.expr(e, r));
                    }
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    columns.push(alias.value.clone());
                    for (o, r) in out.iter_mut().zip(&rows) {
                        o.push(self.expr(expr, r));
                    }
                }
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    if let Some(first) = rows.first() {
                        columns.extend(first.keys().cloned());
                    }
                    for (o, r) in out.iter_mut().zip(&rows) {
                        o.extend(r.values().cloned());
                    }
                }
                _ => {
                    return Err(CatalogError(
                        "catalog query: unsupported select item".into(),
                    ));
                }
            }
        }
        // Aggregates over a catalog (`SELECT count(*) FROM pg_class …`): one row.
        if s.projection.iter().any(is_count) {
            let n = out.len() as i64;
            out = vec![
                s.projection
                    .iter()
                    .map(|p| if is_count(p) { Val::Int(n) } else { Val::Null })
                    .collect(),
            ];
        }
        Ok(Answer { columns, rows: out })
    }

    fn factor_rows(&self, f: &TableFactor) -> Vec<Row> {
        match f {
            TableFactor::Table { name, .. } => {
                relation_rows(&object_last(name)).unwrap_or_default()
            }
            TableFactor::Derived { subquery, .. } => match self.query(subquery) {
                Ok(a) => a
                    .rows
                    .into_iter()
                    .map(|r| a.columns.iter().cloned().zip(r).collect())
                    .collect(),
                Err(_) => vec![],
            },
            _ => vec![],
        }
    }

    fn expr(&self, e: &Expr, row: &Row) -> Val {
        match e {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                let name = ident_name(e).unwrap_or_default();
                match name.as_str() {
                    "current_user" | "session_user" | "user" => Val::text(&self.session.user),
                    "current_schema" => Val::text(SCHEMA),
                    "current_catalog" => Val::text(DATABASE),
                    _ => row.get(&name).cloned().unwrap_or(Val::Null),
                }
            }
            Expr::Value(v) => match &v.value {
                ast::Value::Number(n, _) => n
                    .parse::<i64>()
                    .map(Val::Int)
                    .unwrap_or_else(|_| Val::Text(n.clone())),
                ast::Value::SingleQuotedString(s)
                | ast::Value::EscapedStringLiteral(s)
                | ast::Value::DoubleQuotedString(s) => Val::Text(s.clone()),
                ast::Value::Boolean(b) => Val::Bool(*b),
                _ => Val::Null,
            },
            Expr::Nested(inner) | Expr::Collate { expr: inner, .. } => self.expr(inner, row),
            Expr::Cast { expr, .. } => self.expr(expr, row),
            Expr::IsNull(x) => Val::Bool(self.expr(x, row) == Val::Null),
            Expr::IsNotNull(x) => Val::Bool(self.expr(x, row) != Val::Null),
            Expr::IsTrue(x) => Val::Bool(self.expr(x, row).truthy()),
            Expr::IsFalse(x) => Val::Bool(self.expr(x, row) == Val::Bool(false)),
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => match self.expr(expr, row) {
                Val::Bool(b) => Val::Bool(!b),
                _ => Val::Null,
            },
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let v = self.expr(expr, row);
                if v == Val::Null {
                    return Val::Null;
                }
                let found = list
                    .iter()
                    .any(|x| v.cmp_with(&self.expr(x, row)) == Some(Ordering::Equal));
                Val::Bool(found != *negated)
            }
            Expr::Like {
                negated,
                expr,
                pattern,
                ..
            }
            | Expr::ILike {
                negated,
                expr,
                pattern,
                ..
            } => {
                let ci = matches!(e, Expr::ILike { .. });
                match (
                    self.expr(expr, row).as_text(),
                    self.expr(pattern, row).as_text(),
                ) {
                    (Some(s), Some(p)) => regex_match(&like_to_regex(&p), &s, ci)
                        .map_or(Val::Null, |m| Val::Bool(m != *negated)),
                    _ => Val::Null,
                }
            }
            Expr::BinaryOp { left, op, right } => self.binary(left, op, right, row),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let subject = operand.as_ref().map(|o| self.expr(o, row));
                for w in conditions {
                    let hit = match &subject {
                        Some(s) => {
                            s.cmp_with(&self.expr(&w.condition, row)) == Some(Ordering::Equal)
                        }
                        None => self.expr(&w.condition, row).truthy(),
                    };
                    if hit {
                        return self.expr(&w.result, row);
                    }
                }
                else_result
                    .as_ref()
                    .map_or(Val::Null, |x| self.expr(x, row))
            }
            Expr::Function(f) => self.function(f, row),
            _ => Val::Null,
        }
    }

    fn binary(&self, left: &Expr, op: &BinaryOperator, right: &Expr, row: &Row) -> Val {
        let (l, r) = (self.expr(left, row), self.expr(right, row));
        let regex = |ci: bool, negate: bool| match (l.as_text(), r.as_text()) {
            (Some(s), Some(p)) => {
                regex_match(&p, &s, ci).map_or(Val::Null, |m| Val::Bool(m != negate))
            }
            _ => Val::Null,
        };
        match op {
            BinaryOperator::And => match (&l, &r) {
                (Val::Bool(false), _) | (_, Val::Bool(false)) => Val::Bool(false),
                (Val::Bool(true), Val::Bool(true)) => Val::Bool(true),
                _ => Val::Null,
            },
            BinaryOperator::Or => match (&l, &r) {
                (Val::Bool(true), _) | (_, Val::Bool(true)) => Val::Bool(true),
                (Val::Bool(false), Val::Bool(false)) => Val::Bool(false),
                _ => Val::Null,
            },
            BinaryOperator::Eq => cmp(&l, &r, |o| o == Ordering::Equal),
            BinaryOperator::NotEq => cmp(&l, &r, |o| o != Ordering::Equal),
            BinaryOperator::Lt => cmp(&l, &r, |o| o == Ordering::Less),
            BinaryOperator::LtEq => cmp(&l, &r, |o| o != Ordering::Greater),
            BinaryOperator::Gt => cmp(&l, &r, |o| o == Ordering::Greater),
            BinaryOperator::GtEq => cmp(&l, &r, |o| o != Ordering::Less),
            BinaryOperator::PGRegexMatch => regex(false, false),
            BinaryOperator::PGRegexIMatch => regex(true, false),
            BinaryOperator::PGRegexNotMatch => regex(false, true),
            BinaryOperator::PGRegexNotIMatch => regex(true, true),
            BinaryOperator::PGCustomBinaryOperator(parts) => {
                match parts.last().map(String::as_str) {
                    Some("~") => regex(false, false),
                    Some("~*") => regex(true, false),
                    Some("!~") => regex(false, true),
                    Some("!~*") => regex(true, true),
                    Some("=") => cmp(&l, &r, |o| o == Ordering::Equal),
                    Some("<>") => cmp(&l, &r, |o| o != Ordering::Equal),
                    _ => Val::Null,
                }
            }
            BinaryOperator::StringConcat => match (l.as_text(), r.as_text()) {
                (Some(a), Some(b)) => Val::Text(a + &b),
                _ => Val::Null,
            },
            _ => Val::Null,
        }
    }

    fn function(&self, f: &ast::Function, row: &Row) -> Val {
        let name = object_last(&f.name);
        let args: Vec<Val> = match &f.args {
            FunctionArguments::List(list) => list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x))
                    | FunctionArg::Named {
                        arg: FunctionArgExpr::Expr(x),
                        ..
                    } => self.expr(x, row),
                    _ => Val::Null,
                })
                .collect(),
            _ => vec![],
        };
        match name.as_str() {
            "version" => Val::Text(version()),
            "current_schema" => Val::text(SCHEMA),
            "current_schemas" => Val::Text(format!("{{{SCHEMA}}}")),
            "current_database" | "current_catalog" => Val::text(DATABASE),
            "current_user" | "session_user" | "user" => Val::text(&self.session.user),
            "current_setting" => match args.first().and_then(Val::as_text) {
                Some(n) => self.session.show(&n).map_or(Val::Null, Val::text),
                None => Val::Null,
            },
            "pg_table_is_visible" | "pg_type_is_visible" => Val::Bool(true),
            "has_table_privilege" | "has_schema_privilege" | "has_database_privilege" => {
                Val::Bool(true)
            }
            "pg_get_userbyid" => Val::text("cxfed"),
            "format_type" => {
                row.get("format_type")
                    .cloned()
                    .unwrap_or_else(|| match args.first() {
                        Some(Val::Int(oid)) => type_name_of_oid(*oid).map_or(Val::Null, Val::text),
                        _ => Val::Null,
                    })
            }
            "pg_encoding_to_char" => Val::text("UTF8"),
            "lower" => args
                .first()
                .and_then(Val::as_text)
                .map_or(Val::Null, |s| Val::Text(s.to_lowercase())),
            "upper" => args
                .first()
                .and_then(Val::as_text)
                .map_or(Val::Null, |s| Val::Text(s.to_uppercase())),
            "coalesce" => args
                .into_iter()
                .find(|v| *v != Val::Null)
                .unwrap_or(Val::Null),
            _ => Val::Null,
        }
    }
}

fn type_name_of_oid(oid: i64) -> Option<&'static str> {
    Some(match oid {
        16 => "boolean",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        26 => "oid",
        701 => "double precision",
        1043 => "character varying",
        1082 => "date",
        1114 => "timestamp without time zone",
        1700 => "numeric",
        _ => return None,
    })
}

fn is_count(item: &SelectItem) -> bool {
    let e = match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return false,
    };
    matches!(e, Expr::Function(f) if object_last(&f.name) == "count")
}

fn cmp(l: &Val, r: &Val, f: impl Fn(Ordering) -> bool) -> Val {
    l.cmp_with(r).map_or(Val::Null, |o| Val::Bool(f(o)))
}

/// PostgreSQL's name for an unaliased output column.
fn output_name(e: &Expr) -> String {
    match e {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
            ident_name(e).unwrap_or_else(|| "?column?".into())
        }
        Expr::Function(f) => object_last(&f.name),
        Expr::Cast { expr, .. } | Expr::Nested(expr) | Expr::Collate { expr, .. } => {
            output_name(expr)
        }
        Expr::Case { .. } => "case".into(),
        _ => "?column?".into(),
    }
}

fn like_to_regex(p: &str) -> String {
    let mut re = String::from("^");
    for c in p.chars() {
        match c {
            '%' => re.push_str(".*"),
            '_' => re.push('.'),
            c => re.push_str(&regex_lite::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

fn regex_match(pattern: &str, s: &str, case_insensitive: bool) -> Option<bool> {
    regex_lite::RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .build()
        .ok()
        .map(|re| re.is_match(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(sql: &str) -> Answer {
        answer(&Session::new("analyst"), sql).expect(sql)
    }

    #[test]
    fn psql_finds_the_table_by_its_regex() {
        let a = ask(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN \
             pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relname \
             OPERATOR(pg_catalog.~) '^(experience)$' COLLATE pg_catalog.default AND \
             pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3;",
        );
        assert_eq!(a.columns, ["oid", "nspname", "relname"]);
        assert_eq!(
            a.rows,
            vec![vec![
                Val::Int(16384),
                Val::text("public"),
                Val::text("experience")
            ]]
        );
    }

    #[test]
    fn columns_come_from_the_schema() {
        let a = ask(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull \
             FROM pg_catalog.pg_attribute a WHERE a.attrelid = '16385' AND a.attnum > 0 AND \
             NOT a.attisdropped ORDER BY a.attnum",
        );
        assert_eq!(a.rows.len(), Table::Operational.columns().len());
        assert_eq!(
            a.rows[11],
            vec![
                Val::text("wait_minutes"),
                Val::text("integer"),
                Val::Bool(false)
            ]
        );
        let a = ask(
            "select column_name, data_type from information_schema.columns where \
             table_name = 'experience' and column_name like 'trust%' order by ordinal_position",
        );
        assert_eq!(
            a.rows,
            vec![
                vec![Val::text("trust"), Val::text("smallint")],
                vec![Val::text("trust_thumbs_up"), Val::text("smallint")]
            ]
        );
    }

    #[test]
    fn unmodelled_relations_and_inner_joins_with_them_are_empty() {
        let a =
            ask("SELECT pol.polname FROM pg_catalog.pg_policy pol WHERE pol.polrelid = '16384'");
        assert_eq!(a.columns, ["polname"]);
        assert!(a.rows.is_empty());
        let a = ask(
            "SELECT c.oid::pg_catalog.regclass FROM pg_catalog.pg_class c, pg_catalog.pg_inherits i \
             WHERE c.oid = i.inhparent AND i.inhrelid = '16384'",
        );
        assert!(a.rows.is_empty());
    }

    #[test]
    fn session_functions_answer_locally() {
        let a = ask("select version(), current_schema(), current_user");
        assert!(matches!(&a.rows[0][0], Val::Text(v) if v.starts_with("PostgreSQL 15.0 (cxfed")));
        assert_eq!(a.rows[0][1..], [Val::text("public"), Val::text("analyst")]);
        assert!(is_catalog_query("SELECT version()"));
        assert!(is_catalog_query("select * from pg_type"));
        assert!(!is_catalog_query(
            "SELECT agency, COUNT(*) FROM experience GROUP BY agency"
        ));
    }

    #[test]
    fn refuses_what_is_not_a_select() {
        let e = answer(&Session::new("a"), "DELETE FROM pg_class").expect_err("not a select");
        assert!(e.0.contains("SELECT"), "{e}");
    }
}
