//! Rendering results: Arrow batches to JSON rows (the wire format of `/v1/query`), and a
//! [`QueryResponse`] to a person-readable table, JSON or CSV.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

use cxfed_protocol::wire::{NodeState, QueryResponse};

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

/// Formats a JSON cell for a person: floats to 4 decimals.
fn cell_text(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Number(n) if n.is_f64() => n.as_f64().map(|f| format!("{f:.4}")).unwrap_or_default(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
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

/// Renders a response in `format`.
pub fn render(resp: &QueryResponse, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(resp).unwrap_or_default(),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let _ = w.write_record(&resp.columns);
            for row in &resp.rows {
                let cells: Vec<String> = row
                    .iter()
                    .map(|v| match v {
                        Value::Null => String::new(),
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                let _ = w.write_record(&cells);
            }
            String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(resp.columns.iter().map(Cell::new));
            for (r, row) in resp.rows.iter().enumerate() {
                t.add_row(row.iter().enumerate().map(|(c, v)| {
                    let ci = resp
                        .ci95
                        .get(r)
                        .and_then(|row| row.get(c))
                        .copied()
                        .flatten();
                    let text = match ci {
                        Some(ci) => format!("{} ± {}", cell_text(v), round_ci(ci)),
                        None => cell_text(v),
                    };
                    let cell = Cell::new(text);
                    if v.is_number() {
                        cell.set_alignment(CellAlignment::Right)
                    } else {
                        cell
                    }
                }));
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
            format!(
                "{t}\n{} row(s) · {} group(s) suppressed{cells}{privacy} · nodes: {}{} · query {}\n",
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
}
