//! How a person reads each output column of an approved query: the decimals the query rounded
//! it to, the calendar unit it names (a date, a federal fiscal year or quarter), and the whole
//! range its values can take — so a noise interval wider than that range can be shown as what
//! it is, not informative. Read off the approved plan only (no data, no noise): post-processing
//! that costs no privacy. The node's renderers apply it.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, LogicalPlan};

use cxfed_protocol::wire::{Calendar, ColumnFormat};

use crate::merge::aggregate_index;
use crate::query::{AggKind, ApprovedQuery};

/// Most decimals a `ROUND` is shown with (beyond this, f64 has no more digits to show).
const MAX_DECIMALS: u32 = 15;

impl ApprovedQuery {
    /// One [`ColumnFormat`] per output column, in output order.
    pub fn column_formats(&self) -> Vec<ColumnFormat> {
        let names = self.aggregate_names();
        let n_groups = self.aggregate().group_expr.len();
        let outputs: Vec<Expr> = match self
            .upper()
            .iter()
            .find(|n| matches!(n, LogicalPlan::Projection(_)))
        {
            Some(projection) => projection.expressions(),
            // No projection above the aggregate: its own columns are the output.
            None => self
                .aggregate()
                .schema
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect(),
        };
        let group_names: Vec<String> = self
            .aggregate()
            .schema
            .fields()
            .iter()
            .take(n_groups)
            .map(|f| f.name().clone())
            .collect();
        outputs
            .iter()
            .map(|e| ColumnFormat {
                decimals: decimals(e),
                calendar: group_of(e, &group_names)
                    .and_then(|j| calendar(&self.aggregate().group_expr[j])),
                range: aggregate_index(e, &names).and_then(|(i, factor)| {
                    let (lo, hi) = self.argument_bounds(i)?;
                    whole_range(self.aggregate_kinds()[i], hi - lo).map(|r| r * factor)
                }),
            })
            .collect()
    }
}

/// Per row, the output columns whose 95% interval is wider than the column's whole range:
/// the interval `value ± ci` says less than the range itself does.
pub fn not_informative(formats: &[ColumnFormat], ci95: &[Vec<Option<f64>>]) -> Vec<Vec<usize>> {
    ci95.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(
                    |(c, ci)| match (ci, formats.get(*c).and_then(|f| f.range)) {
                        (Some(ci), Some(range)) => 2.0 * ci > range,
                        _ => false,
                    },
                )
                .map(|(c, _)| c)
                .collect()
        })
        .collect()
}

/// The width of the values an aggregate of values spread over `width` can take, where the
/// aggregate is bounded by its argument's bounds at all (a count or sum is not).
fn whole_range(kind: AggKind, width: f64) -> Option<f64> {
    match kind {
        AggKind::Count | AggKind::CountPersons | AggKind::Sum => None,
        // A mean or a percentile lies within the argument's bounds.
        AggKind::Avg | AggKind::Percentile { .. } => Some(width),
        // Population variance of values in [lo, hi] is at most width²/4; the sample variance
        // at most width²/2 (two values, one at each end).
        AggKind::Variance { population: true } => Some(width * width / 4.0),
        AggKind::Variance { population: false } => Some(width * width / 2.0),
        AggKind::Stddev { population: true } => Some(width / 2.0),
        AggKind::Stddev { population: false } => Some(width / std::f64::consts::SQRT_2),
    }
}

/// Strips what does not change what a column is (names and casts).
fn peel(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => peel(&a.expr),
        Expr::Cast(c) => peel(&c.expr),
        Expr::TryCast(c) => peel(&c.expr),
        other => other,
    }
}

/// The decimals of an outermost `ROUND(x)` (0) or `ROUND(x, d)` with a constant `d`.
fn decimals(e: &Expr) -> Option<u32> {
    let Expr::ScalarFunction(f) = peel(e) else {
        return None;
    };
    if f.func.name() != "round" {
        return None;
    }
    match f.args.get(1).map(peel) {
        None => Some(0),
        Some(Expr::Literal(v, _)) => match v.cast_to(&arrow::datatypes::DataType::Int64).ok()? {
            ScalarValue::Int64(Some(d)) => Some(u32::try_from(d.max(0)).ok()?.min(MAX_DECIMALS)),
            _ => None,
        },
        Some(_) => None,
    }
}

/// Which group key an output column shows unchanged (by name, through aliases and casts).
fn group_of(e: &Expr, group_names: &[String]) -> Option<usize> {
    match peel(e) {
        Expr::Column(c) => group_names.iter().position(|n| *n == c.name),
        _ => None,
    }
}

/// The calendar unit of a group key: the fiscal columns by name, `date_trunc` by its unit.
fn calendar(group: &Expr) -> Option<Calendar> {
    match peel(group) {
        Expr::Column(c) => match c.name.as_str() {
            "fiscal_year" => Some(Calendar::FiscalYear),
            "fiscal_quarter" => Some(Calendar::FiscalQuarter),
            _ => None,
        },
        Expr::ScalarFunction(f) if f.func.name() == "date_trunc" => {
            let unit = match f.args.first().map(peel) {
                Some(Expr::Literal(ScalarValue::Utf8(Some(u)), _))
                | Some(Expr::Literal(ScalarValue::Utf8View(Some(u)), _))
                | Some(Expr::Literal(ScalarValue::LargeUtf8(Some(u)), _)) => u.to_lowercase(),
                _ => return None,
            };
            match unit.as_str() {
                "quarter" => Some(Calendar::Quarter),
                "day" | "week" | "month" | "year" => Some(Calendar::Date),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::planning_context;
    use crate::validate::approve;

    async fn formats(sql: &str) -> Vec<ColumnFormat> {
        let ctx = planning_context().expect("context");
        approve(&ctx.state(), sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .column_formats()
    }

    #[tokio::test]
    async fn rounding_is_read_from_the_query() {
        let f = formats(
            "SELECT channel, ROUND(AVG(trust), 2) AS t, ROUND(AVG(ease)) AS e, AVG(trust) AS raw, \
             COUNT(*) AS n FROM experience GROUP BY channel",
        )
        .await;
        let decimals: Vec<Option<u32>> = f.iter().map(|c| c.decimals).collect();
        assert_eq!(decimals, vec![None, Some(2), Some(0), None, None]);
    }

    #[tokio::test]
    async fn calendar_units_are_read_from_the_group_keys() {
        let f = formats(
            "SELECT date_trunc('quarter', response_date) AS q, date_trunc('month', response_date) \
             AS m, fiscal_year, fiscal_quarter AS fq, channel, COUNT(*) AS n FROM experience \
             GROUP BY 1, 2, 3, 4, 5",
        )
        .await;
        let units: Vec<Option<Calendar>> = f.iter().map(|c| c.calendar).collect();
        assert_eq!(
            units,
            vec![
                Some(Calendar::Quarter),
                Some(Calendar::Date),
                Some(Calendar::FiscalYear),
                Some(Calendar::FiscalQuarter),
                None,
                None
            ]
        );
    }

    #[tokio::test]
    async fn ranges_follow_the_declared_bounds_and_constant_factors() {
        let f = formats(
            "SELECT channel, AVG(trust) AS t, AVG(trust) * 20 AS pct, STDDEV_POP(trust) AS sd, \
             SUM(trust) AS s FROM experience GROUP BY channel",
        )
        .await;
        let ranges: Vec<Option<f64>> = f.iter().map(|c| c.range).collect();
        assert_eq!(ranges, vec![None, Some(4.0), Some(80.0), Some(2.0), None]);
    }

    #[test]
    fn an_interval_wider_than_the_range_is_not_informative() {
        let f = vec![
            ColumnFormat::default(),
            ColumnFormat {
                range: Some(4.0),
                ..ColumnFormat::default()
            },
        ];
        let ci = vec![
            vec![None, Some(0.03)],
            vec![None, Some(40.38)],
            vec![None, Some(2.0)],
            vec![None, Some(2.01)],
            vec![Some(1e9), None],
        ];
        assert_eq!(
            not_informative(&f, &ci),
            vec![vec![], vec![1], vec![], vec![1], vec![]]
        );
    }
}
