//! Rows in memory for unit tests: a table's batch from a few named columns given as text
//! (cast to the column's type; every other column null), and a context serving them.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;

use crate::schema::Table;

/// A batch of `table` with `columns` (name, one text value per row; `None` is null).
pub(crate) fn batch(table: Table, columns: &[(&str, Vec<Option<&str>>)]) -> RecordBatch {
    let rows = columns.first().map_or(0, |c| c.1.len());
    let schema = table.arrow_schema();
    let arrays: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match columns.iter().find(|c| c.0 == f.name()) {
            Some((_, values)) => {
                let text: ArrayRef = Arc::new(StringArray::from(values.clone()));
                arrow::compute::cast(&text, f.data_type()).expect("castable test value")
            }
            None if f.is_nullable() => new_null_array(f.data_type(), rows),
            None => {
                // A required column the test does not care about: a distinct text per row, or
                // a plain value of its type.
                let text: Vec<String> = (0..rows)
                    .map(|r| match f.data_type() {
                        arrow::datatypes::DataType::Utf8 => format!("{}{r}", f.name()),
                        arrow::datatypes::DataType::Date32 => "2025-01-01".to_string(),
                        _ => "0".to_string(),
                    })
                    .collect();
                let text: ArrayRef = Arc::new(StringArray::from(text));
                arrow::compute::cast(&text, f.data_type()).expect("castable default")
            }
        })
        .collect();
    RecordBatch::try_new(schema, arrays).expect("test batch")
}

/// A context like a node's, serving `experience` and `operational` from memory.
pub(crate) fn context(
    experience: Vec<RecordBatch>,
    operational: Vec<RecordBatch>,
) -> SessionContext {
    let ctx = crate::context::new_context(crate::context::session_config(), None);
    for (table, batches) in [
        (Table::Experience, experience),
        (Table::Operational, operational),
    ] {
        let mem = MemTable::try_new(table.arrow_schema(), vec![batches]).expect("mem table");
        ctx.register_table(table.name(), Arc::new(mem))
            .expect("register");
    }
    ctx
}

/// `Some(value)` for each value: shorthand for columns without nulls.
pub(crate) fn all<'a>(values: &[&'a str]) -> Vec<Option<&'a str>> {
    values.iter().map(|v| Some(*v)).collect()
}
