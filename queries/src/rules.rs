//! Why a query was refused: stable rule codes, one-line reasons and SQL positions; and
//! [`QueryError`], the error every step of the crate returns (a refusal, or ours).
//!
//! Codes never change meaning once published; README.md documents each one.

use std::fmt;

use datafusion::common::DataFusionError;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use serde::{Deserialize, Serialize};

/// Why a query could not be answered: the analyst's fault or ours.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The query broke a rule of the aggregate-only subset.
    #[error("{0}")]
    Rejected(Rejection),
    /// A bug or an engine failure; the message is for logs, not for analysts.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Rejection> for QueryError {
    fn from(r: Rejection) -> Self {
        QueryError::Rejected(r)
    }
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        QueryError::Internal(e.to_string())
    }
}

/// A rule of the aggregate-only query subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Rule {
    /// The SQL does not parse.
    SyntaxError,
    /// More than one statement was sent.
    MultipleStatements,
    /// The statement is not a SELECT (DDL, DML, COPY, SET, EXPLAIN ...).
    NotAQuery,
    /// A table or column does not exist, or types do not fit.
    PlanError,
    /// The query would return rows that are not aggregates.
    RawRows,
    /// A table other than `experience` or `operational` (or a table function).
    TableNotAllowed,
    /// Subqueries, CTEs and derived tables.
    SubqueryNotAllowed,
    /// UNION / INTERSECT / EXCEPT.
    SetOperationNotAllowed,
    /// A join other than `experience JOIN operational ON case_id`.
    JoinNotAllowed,
    /// Window functions.
    WindowNotAllowed,
    /// An aggregate outside COUNT, SUM, AVG, STDDEV, VARIANCE (e.g. MIN, MAX, ARRAY_AGG).
    AggregateNotAllowed,
    /// An identifier column (person_id, case_id, response_id) used where it may not be.
    IdentifierNotAllowed,
    /// GROUP BY on something that is not a dimension.
    GroupByNotAllowed,
    /// A scalar function or expression outside the allow-list.
    FunctionNotAllowed,
    /// DISTINCT other than COUNT(DISTINCT person_id).
    DistinctNotAllowed,
    /// More than one level of aggregation.
    NestedAggregation,
    /// GROUPING SETS, ROLLUP, CUBE.
    GroupingSetsNotAllowed,
    /// The query is too long or too deeply nested.
    QueryTooLarge,
    /// In differential-privacy mode, an aggregate's argument has no declared bounds.
    UnboundedArgument,
    /// In `k-only` mode, an aggregate's argument is more than measures, constants, linear
    /// arithmetic (at most a product of two measures) and one CASE over them.
    ArgumentNotAllowed,
    /// In `k-only` mode, a percentile (MEDIAN, PERCENTILE_CONT, APPROX_PERCENTILE_CONT): an
    /// exact percentile is one person's raw value.
    ExactPercentile,
    /// A journey query (two agencies' tables joined `USING (person_id)`, see
    /// [`crate::journey`]) of a shape the journey protocol does not answer: other joins or join
    /// keys, unqualified tables, a condition mixing both tables, more than one measure, an
    /// aggregate over the membership side, a group column without public values, ORDER BY ...
    JourneyShape,
}

impl Rule {
    /// Every rule, in code order.
    pub const ALL: [Rule; 22] = [
        Rule::SyntaxError,
        Rule::MultipleStatements,
        Rule::NotAQuery,
        Rule::PlanError,
        Rule::RawRows,
        Rule::TableNotAllowed,
        Rule::SubqueryNotAllowed,
        Rule::SetOperationNotAllowed,
        Rule::JoinNotAllowed,
        Rule::WindowNotAllowed,
        Rule::AggregateNotAllowed,
        Rule::IdentifierNotAllowed,
        Rule::GroupByNotAllowed,
        Rule::FunctionNotAllowed,
        Rule::DistinctNotAllowed,
        Rule::NestedAggregation,
        Rule::GroupingSetsNotAllowed,
        Rule::QueryTooLarge,
        Rule::UnboundedArgument,
        Rule::ArgumentNotAllowed,
        Rule::ExactPercentile,
        Rule::JourneyShape,
    ];

    /// The stable code, e.g. `CXF-Q012`.
    pub fn code(self) -> &'static str {
        match self {
            Rule::SyntaxError => "CXF-Q001",
            Rule::MultipleStatements => "CXF-Q002",
            Rule::NotAQuery => "CXF-Q003",
            Rule::PlanError => "CXF-Q004",
            Rule::RawRows => "CXF-Q005",
            Rule::TableNotAllowed => "CXF-Q006",
            Rule::SubqueryNotAllowed => "CXF-Q007",
            Rule::SetOperationNotAllowed => "CXF-Q008",
            Rule::JoinNotAllowed => "CXF-Q009",
            Rule::WindowNotAllowed => "CXF-Q010",
            Rule::AggregateNotAllowed => "CXF-Q011",
            Rule::IdentifierNotAllowed => "CXF-Q012",
            Rule::GroupByNotAllowed => "CXF-Q013",
            Rule::FunctionNotAllowed => "CXF-Q014",
            Rule::DistinctNotAllowed => "CXF-Q015",
            Rule::NestedAggregation => "CXF-Q016",
            Rule::GroupingSetsNotAllowed => "CXF-Q017",
            Rule::QueryTooLarge => "CXF-Q018",
            Rule::UnboundedArgument => "CXF-Q019",
            Rule::ArgumentNotAllowed => "CXF-Q020",
            Rule::ExactPercentile => "CXF-Q021",
            Rule::JourneyShape => "CXF-Q022",
        }
    }

    /// The stable slug, e.g. `identifier-not-allowed`.
    pub fn slug(self) -> &'static str {
        match self {
            Rule::SyntaxError => "syntax-error",
            Rule::MultipleStatements => "multiple-statements",
            Rule::NotAQuery => "not-a-query",
            Rule::PlanError => "plan-error",
            Rule::RawRows => "raw-rows",
            Rule::TableNotAllowed => "table-not-allowed",
            Rule::SubqueryNotAllowed => "subquery-not-allowed",
            Rule::SetOperationNotAllowed => "set-operation-not-allowed",
            Rule::JoinNotAllowed => "join-not-allowed",
            Rule::WindowNotAllowed => "window-not-allowed",
            Rule::AggregateNotAllowed => "aggregate-not-allowed",
            Rule::IdentifierNotAllowed => "identifier-not-allowed",
            Rule::GroupByNotAllowed => "group-by-not-allowed",
            Rule::FunctionNotAllowed => "function-not-allowed",
            Rule::DistinctNotAllowed => "distinct-not-allowed",
            Rule::NestedAggregation => "nested-aggregation",
            Rule::GroupingSetsNotAllowed => "grouping-sets-not-allowed",
            Rule::QueryTooLarge => "query-too-large",
            Rule::UnboundedArgument => "unbounded-argument",
            Rule::ArgumentNotAllowed => "argument-not-allowed",
            Rule::ExactPercentile => "exact-percentile",
            Rule::JourneyShape => "journey-shape",
        }
    }

    /// Parses a code (`CXF-Q012`) or a slug (`identifier-not-allowed`).
    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL
            .into_iter()
            .find(|r| r.code() == s || r.slug() == s)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.slug())
    }
}

/// A 1-based line and column in the SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A refused query: the rule it broke, why, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The rule.
    pub rule: Rule,
    /// One line saying what is wrong. Never contains data values.
    pub reason: String,
    /// Where in the SQL, when it can be told.
    pub position: Option<Position>,
}

impl Rejection {
    /// A rejection without a position.
    pub fn new(rule: Rule, reason: impl Into<String>) -> Self {
        Rejection {
            rule,
            reason: reason.into(),
            position: None,
        }
    }

    /// Sets the position to the first place `word` appears as a token in `sql`, if it does.
    pub fn at_word(mut self, sql: &str, word: &str) -> Self {
        if self.position.is_none() {
            self.position = locate_word(sql, word, 0);
        }
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.reason)?;
        if let Some(p) = self.position {
            write!(f, " (at {p})")?;
        }
        Ok(())
    }
}

/// Finds the position of the `nth` (0-based) token equal to `word` (case-insensitive; quoted
/// identifiers match their unquoted text).
pub fn locate_word(sql: &str, word: &str, nth: usize) -> Option<Position> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    tokens
        .iter()
        .filter(|t| match &t.token {
            Token::Word(w) => w.value.eq_ignore_ascii_case(word),
            _ => false,
        })
        .nth(nth)
        .map(|t| Position {
            line: t.span.start.line,
            column: t.span.start.column,
        })
}

/// Extracts "Line: L, Column: C" from a sqlparser error message.
pub fn position_in_message(msg: &str) -> Option<Position> {
    let l = msg.find("Line: ")?;
    let rest = &msg[l + 6..];
    let line: u64 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let c = rest.find("Column: ")?;
    let column: u64 = rest[c + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(Position { line, column })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_slugs_are_unique_and_parse_back() {
        for r in Rule::ALL {
            assert_eq!(Rule::parse(r.code()), Some(r));
            assert_eq!(Rule::parse(r.slug()), Some(r));
        }
        let mut codes: Vec<_> = Rule::ALL.iter().map(|r| r.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), Rule::ALL.len());
    }

    #[test]
    fn locates_words_by_token_not_substring() {
        let sql = "SELECT count(*)\nFROM experience WHERE person_id_x = 1 AND \"person_id\" = 2";
        assert_eq!(
            locate_word(sql, "person_id", 0),
            Some(Position {
                line: 2,
                column: 43
            })
        );
        assert_eq!(locate_word(sql, "nothing", 0), None);
    }

    #[test]
    fn reads_positions_from_parser_messages() {
        let p = position_in_message(
            "sql parser error: Expected: end of statement, found: x at Line: 3, Column: 14",
        );
        assert_eq!(
            p,
            Some(Position {
                line: 3,
                column: 14
            })
        );
    }
}
