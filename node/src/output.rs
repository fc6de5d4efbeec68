//! Rendering results: Arrow batches to JSON rows (the wire format of `/v1/query`), and a
//! [`QueryResponse`] to a person-readable table, JSON or CSV.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

use cxfed_protocol::wire::{Calendar, ColumnFormat, NodeState, QueryResponse};

/// Output formats of `cxfed query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people (default).
    Table,
    /// One JSON object.
    Json,
    /// CSV with a header line.
    Csv,
}

/// Converts batches to JSON rows: numbers, strings (dates ISO-8601), booleans or null.
pub fn rows(batches: &[RecordBatch]) -> Result<Vec<Vec<Value>>, arrow::error::ArrowError> {
    let mut out = Vec::new();
    let options = FormatOptions::default().with_null("");
    for b in batches {
        let formatters: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<_, _>>()?;
        for r in 0..b.num_rows() {
            let mut row = Vec::with_capacity(b.num_columns());
            for (c, col) in b.columns().iter().enumerate() {
                row.push(value(col.as_ref(), r, &formatters[c]));
            }
            out.push(row);
        }
    }
    Ok(out)
}

fn value(col: &dyn Array, r: usize, fmt: &ArrayFormatter) -> Value {
    if col.is_null(r) {
        return Value::Null;
    }
    let float = |f: f64| {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    };
    match col.data_type() {
        DataType::Int8 => Value::from(col.as_primitive::<Int8Type>().value(r)),
        DataType::Int16 => Value::from(col.as_primitive::<Int16Type>().value(r)),
        DataType::Int32 => Value::from(col.as_primitive::<Int32Type>().value(r)),
        DataType::Int64 => Value::from(col.as_primitive::<Int64Type>().value(r)),
        DataType::UInt64 => Value::from(col.as_primitive::<UInt64Type>().value(r)),
        DataType::Float32 => float(f64::from(col.as_primitive::<Float32Type>().value(r))),
        DataType::Float64 => float(col.as_primitive::<Float64Type>().value(r)),
        DataType::Boolean => Value::Bool(col.as_boolean().value(r)),
        DataType::Decimal128(_, _) => fmt
            .value(r)
            .to_string()
            .parse::<f64>()
            .map(float)
            .unwrap_or(Value::Null),
        _ => Value::String(fmt.value(r).to_string()),
    }
}

/// Formats a JSON cell for a person: floats to the decimals the query rounded to (else 4),
/// dates without a time of day, and federal fiscal years and quarters by their labels
/// (`FY2025`, `Q1`, and `2024-10-01 (FY2025 Q1)` for a quarter's first day) when `labels`.
pub fn cell_text(v: &Value, format: Option<&ColumnFormat>, labels: bool) -> String {
    let decimals = format.and_then(|f| f.decimals);
    let calendar = format.and_then(|f| f.calendar);
    match v {
        Value::Null => "NULL".into(),
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .map(|f| format!("{f:.*}", decimals.unwrap_or(4) as usize))
            .unwrap_or_default(),
        Value::Number(n) if labels => match (calendar, n.as_i64()) {
            (Some(Calendar::FiscalYear), Some(y)) => format!("FY{y}"),
            (Some(Calendar::FiscalQuarter), Some(q)) => format!("Q{q}"),
            _ => n.to_string(),
        },
        Value::String(s) => match calendar {
            Some(Calendar::Date) => as_date(s).to_string(),
            Some(Calendar::Quarter) => {
                let day = as_date(s);
                match fiscal_quarter_label(day) {
                    Some(label) if labels => format!("{day} ({label})"),
                    _ => day.to_string(),
                }
            }
            _ => s.clone(),
        },
        other => other.to_string(),
    }
}

/// Formats a JSON cell for CSV, for machines: full precision unless the query rounded, dates
/// without a time of day, no labels.
fn csv_text(v: &Value, format: Option<&ColumnFormat>) -> String {
    let rounded = format.is_some_and(|f| f.decimals.is_some());
    let dated =
        format.is_some_and(|f| matches!(f.calendar, Some(Calendar::Date | Calendar::Quarter)));
    match v {
        Value::Null => String::new(),
        Value::Number(n) if n.is_f64() && rounded => cell_text(v, format, false),
        Value::String(s) if dated => as_date(s).to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A timestamp at midnight (`2024-10-01T00:00:00`) as its date; anything else unchanged.
fn as_date(s: &str) -> &str {
    match s.split_once('T') {
        Some((day, time)) if time.trim_start_matches(['0', ':', '.']).is_empty() => day,
        _ => s,
    }
}

/// The federal fiscal quarter a date (`YYYY-MM-DD`) falls in, as `FY2025 Q1` (FY N runs
/// Oct 1 N−1 .. Sep 30 N).
pub fn fiscal_quarter_label(day: &str) -> Option<String> {
    let mut parts = day.splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) {
        return None;
    }
    let (fy, q) = if month >= 10 {
        (year + 1, 1)
    } else {
        (year, (month - 1) / 3 + 2)
    };
    Some(format!("FY{fy} Q{q}"))
}

/// A noise interval's half-width for a person: as many decimals as its column's `ROUND`, else
/// by its size.
fn ci_text(ci: f64, format: Option<&ColumnFormat>) -> String {
    match format.and_then(|f| f.decimals) {
        Some(d) => format!("{ci:.*}", d as usize),
        None => round_ci(ci),
    }
}

/// Renders a node's budget report for a steward.
pub fn render_budget(b: &cxfed_protocol::wire::BudgetResponse) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["analyst", "queries", "ε used", "ε left"]);
    for a in &b.analysts {
        t.add_row([
            a.analyst.clone(),
            a.queries.to_string(),
            format!("{:.3}", a.used),
            format!("{:.3}", a.remaining),
        ]);
    }
    match (b.epsilon_per_query, b.budget_epsilon, b.period_days) {
        (Some(e), Some(budget), Some(days)) => format!(
            "node {} · mode dp · ε ≤ {e} per query · {budget} per analyst per {days} days\n{t}\n",
            b.agency
        ),
        _ => format!("node {} · mode {} (no privacy budget)\n", b.agency, b.mode),
    }
}

fn round_ci(ci: f64) -> String {
    if ci >= 100.0 {
        format!("{ci:.0}")
    } else if ci >= 1.0 {
        format!("{ci:.2}")
    } else {
        format!("{ci:.4}")
    }
}

/// Name of the column that lists, per row, the nodes whose part is missing (CSV).
pub const MISSING_PARTS: &str = "missing_parts";

/// The agencies whose part row `r` lacks (they returned nothing for its group).
pub fn missing_parts(resp: &QueryResponse, r: usize) -> &[String] {
    resp.missing_parts.get(r).map_or(&[], Vec::as_slice)
}

/// Name of the column that lists, per row, the columns whose interval is not informative (CSV).
pub const NOT_INFORMATIVE: &str = "not_informative";

/// Whether cell (`r`, column `name`) has a noise interval wider than the column's whole range.
pub fn is_not_informative(resp: &QueryResponse, r: usize, name: &str) -> bool {
    resp.not_informative
        .get(r)
        .is_some_and(|cols| cols.iter().any(|c| c == name))
}

/// How many released values are not informative, and why, for a person. `None` when none is.
pub fn not_informative_note(resp: &QueryResponse) -> Option<String> {
    let n: usize = resp.not_informative.iter().map(Vec::len).sum();
    (n > 0).then(|| {
        format!(
            "{n} value(s) not informative: the noise interval is wider than the measure's whole \
             range (too few people for this ε)"
        )
    })
}

/// What an answer leaves out, for a person: cells released as NULL because a node withheld
/// its part, and rows without some node's part. `None` when nothing is left out.
pub fn incompleteness_note(resp: &QueryResponse) -> Option<String> {
    let mut notes = Vec::new();
    if resp.incomplete_cells > 0 {
        notes.push(format!(
            "{} cell(s) NULL because a node withheld its part (fewer than its k people there; \
             the other nodes' parts alone are not the federation's number)",
            resp.incomplete_cells
        ));
    }
    if resp.incomplete_groups > 0 {
        notes.push(format!(
            "{} row(s) without every node's part (see missing parts: that node has none of the \
             group's rows, or fewer than its k)",
            resp.incomplete_groups
        ));
    }
    (!notes.is_empty()).then(|| notes.join(" · "))
}

/// Renders a response in `format`.
pub fn render(resp: &QueryResponse, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(resp).unwrap_or_default(),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            // Rows without every node's part say whose is missing in a last column.
            let marked = resp.incomplete_groups > 0;
            // So do rows holding a value whose interval is not informative.
            let uninformative = !resp.not_informative.is_empty();
            let mut header = resp.columns.clone();
            if marked {
                header.push(MISSING_PARTS.into());
            }
            if uninformative {
                header.push(NOT_INFORMATIVE.into());
            }
            let _ = w.write_record(&header);
            for (r, row) in resp.rows.iter().enumerate() {
                let mut cells: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(c, v)| csv_text(v, resp.formats.get(c)))
                    .collect();
                if marked {
                    cells.push(missing_parts(resp, r).join(";"));
                }
                if uninformative {
                    cells.push(
                        resp.not_informative
                            .get(r)
                            .map_or(String::new(), |c| c.join(";")),
                    );
                }
                let _ = w.write_record(&cells);
            }
            String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            let marked = resp.incomplete_groups > 0;
            let mut header: Vec<Cell> = resp.columns.iter().map(Cell::new).collect();
            if marked {
                header.push(Cell::new("missing parts"));
            }
            t.set_header(header);
            for (r, row) in resp.rows.iter().enumerate() {
                let mut cells: Vec<Cell> = row
                    .iter()
                    .enumerate()
                    .map(|(c, v)| {
                        let ci = resp
                            .ci95
                            .get(r)
                            .and_then(|row| row.get(c))
                            .copied()
                            .flatten();
                        let format = resp.formats.get(c);
                        let mut text = match ci {
                            Some(ci) => {
                                format!("{} ± {}", cell_text(v, format, true), ci_text(ci, format))
                            }
                            None => cell_text(v, format, true),
                        };
                        if resp
                            .columns
                            .get(c)
                            .is_some_and(|name| is_not_informative(resp, r, name))
                        {
                            text.push_str(" (not informative)");
                        }
                        let cell = Cell::new(text);
                        if v.is_number() {
                            cell.set_alignment(CellAlignment::Right)
                        } else {
                            cell
                        }
                    })
                    .collect();
                if marked {
                    cells.push(Cell::new(missing_parts(resp, r).join(", ")));
                }
                t.add_row(cells);
            }
            let nodes: Vec<String> = resp
                .nodes
                .iter()
                .map(|n| match n.status {
                    NodeState::Ok => format!("{} ok", n.agency),
                    other => format!(
                        "{} {}{}",
                        n.agency,
                        serde_json::to_value(other)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        n.error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                })
                .collect();
            let privacy = if resp.privacy == "dp" {
                let eps: Vec<String> = resp
                    .nodes
                    .iter()
                    .filter_map(|n| n.epsilon.map(|e| format!("{} ε={e}", n.agency)))
                    .collect();
                format!(
                    " · differentially private ({}; ± = 95% noise interval)",
                    eps.join(", ")
                )
            } else {
                String::new()
            };
            let cells = if resp.suppressed_cells > 0 {
                format!(
                    " · {} cell(s) withheld (empty: fewer than k people)",
                    resp.suppressed_cells
                )
            } else {
                String::new()
            };
            let incomplete = incompleteness_note(resp)
                .into_iter()
                .chain(not_informative_note(resp))
                .map(|n| format!(" · {n}"))
                .collect::<String>();
            format!(
                "{t}\n{} row(s) · {} group(s) suppressed{cells}{incomplete}{privacy} · nodes: {}{} · query {}\n",
                resp.rows.len(),
                resp.suppressed_groups,
                nodes.join(", "),
                if resp.complete {
                    ""
                } else {
                    " · PARTIAL FEDERATION ANSWER"
                },
                resp.query_id
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxfed_protocol::wire::NodeStatus;
    use std::sync::Arc;

    #[test]
    fn converts_types_to_json() {
        use arrow::array::{Date32Array, Float64Array, Int64Array, StringArray};
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("s", DataType::Utf8, true),
            arrow::datatypes::Field::new("n", DataType::Int64, true),
            arrow::datatypes::Field::new("f", DataType::Float64, true),
            arrow::datatypes::Field::new("d", DataType::Date32, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("phone"), None])),
                Arc::new(Int64Array::from(vec![Some(3), Some(4)])),
                Arc::new(Float64Array::from(vec![Some(0.5), Some(f64::NAN)])),
                Arc::new(Date32Array::from(vec![Some(20_000), None])),
            ],
        )
        .expect("batch");
        let r = rows(&[b]).expect("rows");
        assert_eq!(
            r[0],
            vec![
                Value::from("phone"),
                Value::from(3),
                Value::from(0.5),
                Value::from("2024-10-04")
            ]
        );
        assert_eq!(
            r[1],
            vec![Value::Null, Value::from(4), Value::Null, Value::Null]
        );
    }

    #[test]
    fn table_names_nodes_and_suppression() {
        let resp = QueryResponse {
            query_id: "q1".into(),
            columns: vec!["channel".into(), "avg".into()],
            rows: vec![vec![Value::from("phone"), Value::from(3.25)]],
            suppressed_groups: 2,
            suppressed_cells: 1,
            incomplete_cells: 0,
            incomplete_groups: 0,
            missing_parts: vec![],
            formats: vec![],
            not_informative: vec![],
            nodes: vec![NodeStatus {
                agency: "SSA".into(),
                status: NodeState::Ok,
                error: None,
                suppressed_groups: 0,
                suppressed_cells: 1,
                groups: 1,
                epsilon: None,
            }],
            complete: true,
            privacy: "k-only".into(),
            ci95: vec![],
            noise_sd: vec![],
            journey: None,
        };
        let t = render(&resp, Format::Table);
        assert!(
            t.contains("3.2500")
                && t.contains("2 group(s) suppressed")
                && t.contains("1 cell(s) withheld")
                && t.contains("SSA ok"),
            "{t}"
        );
        assert_eq!(render(&resp, Format::Csv), "channel,avg\nphone,3.25\n");
    }

    fn dp_response() -> QueryResponse {
        QueryResponse {
            query_id: "q2".into(),
            columns: vec![
                "q".into(),
                "fiscal_year".into(),
                "fiscal_quarter".into(),
                "t".into(),
                "w".into(),
            ],
            rows: vec![vec![
                Value::from("2024-10-01T00:00:00"),
                Value::from(2025),
                Value::from(1),
                Value::from(3.65),
                Value::from(5.0),
            ]],
            suppressed_groups: 0,
            suppressed_cells: 0,
            incomplete_cells: 0,
            incomplete_groups: 0,
            missing_parts: vec![],
            formats: vec![
                ColumnFormat {
                    calendar: Some(Calendar::Quarter),
                    ..ColumnFormat::default()
                },
                ColumnFormat {
                    calendar: Some(Calendar::FiscalYear),
                    ..ColumnFormat::default()
                },
                ColumnFormat {
                    calendar: Some(Calendar::FiscalQuarter),
                    ..ColumnFormat::default()
                },
                ColumnFormat {
                    decimals: Some(2),
                    range: Some(4.0),
                    ..ColumnFormat::default()
                },
                ColumnFormat {
                    range: Some(4.0),
                    ..ColumnFormat::default()
                },
            ],
            not_informative: vec![vec!["w".into()]],
            nodes: vec![],
            complete: true,
            privacy: "dp".into(),
            ci95: vec![vec![None, None, None, Some(0.0251), Some(40.38)]],
            noise_sd: vec![],
            journey: None,
        }
    }

    #[test]
    fn numbers_print_as_the_query_asked_and_dates_as_dates() {
        let resp = dp_response();
        let t = render(&resp, Format::Table);
        for want in [
            "3.65 ± 0.03",
            "2024-10-01 (FY2025 Q1)",
            "FY2025",
            "Q1",
            "5.0000 ± 40.38 (not informative)",
            "1 value(s) not informative",
        ] {
            assert!(t.contains(want), "{want} in\n{t}");
        }
        assert!(!t.contains("T00:00:00") && !t.contains("3.6500"), "{t}");
        assert_eq!(
            render(&resp, Format::Csv),
            "q,fiscal_year,fiscal_quarter,t,w,not_informative\n2024-10-01,2025,1,3.65,5.0,w\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&resp, Format::Json)).expect("json");
        assert_eq!(json["not_informative"], serde_json::json!([["w"]]));
        assert_eq!(json["formats"][3]["decimals"], 2);
        assert_eq!(json["formats"][0]["calendar"], "quarter");
    }

    #[test]
    fn fiscal_quarters_start_in_october() {
        for (day, label) in [
            ("2024-10-01", "FY2025 Q1"),
            ("2024-12-31", "FY2025 Q1"),
            ("2025-01-01", "FY2025 Q2"),
            ("2025-04-01", "FY2025 Q3"),
            ("2025-09-30", "FY2025 Q4"),
        ] {
            assert_eq!(fiscal_quarter_label(day).as_deref(), Some(label), "{day}");
        }
        assert_eq!(fiscal_quarter_label("2025-13-01"), None);
        assert_eq!(as_date("2024-10-01T00:00:00"), "2024-10-01");
        assert_eq!(as_date("2024-10-01T08:30:00"), "2024-10-01T08:30:00");
    }
}
