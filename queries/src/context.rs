//! DataFusion sessions configured for the CX schema: the same function set and options on every
//! node, so that every node plans an analyst's SQL the same way.

use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::functions_aggregate::{stddev::stddev_udaf, variance::var_samp_udaf};
use datafusion::logical_expr::AggregateUDF;

use crate::schema::Table;

/// The session configuration every cxfed node and coordinator uses.
pub fn session_config() -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(true);
    let options = config.options_mut();
    // Identifiers are case-insensitive, as analysts expect from SQL.
    options.sql_parser.enable_ident_normalization = true;
    options.sql_parser.map_string_types_to_utf8view = false;
    options.execution.parquet.pushdown_filters = false;
    // File statistics would be recomputed from Parquet footers on every query (the file list
    // is not cached, so that new files are seen at once); no cxfed plan uses them.
    options.execution.collect_statistics = false;
    config
}

/// The aggregate functions cxfed registers beyond DataFusion's defaults (its own spellings of
/// DataFusion's). Whatever runs a node's plans must know them too: [`register_functions`]
/// adds them to a session, and a node's Ballista scheduler and executors add them to theirs.
pub fn aggregate_functions() -> Vec<AggregateUDF> {
    // DESIGN.md names STDDEV / VARIANCE; DataFusion spells the sample variance `var`.
    let var = AggregateUDF::clone(&var_samp_udaf()).with_aliases(["variance"]);
    let stddev = AggregateUDF::clone(&stddev_udaf()).with_aliases(["stddev_samp"]);
    vec![var, stddev]
}

/// Registers the cxfed function set on `ctx` (every node must plan the same SQL the same way).
pub fn register_functions(ctx: &SessionContext) {
    for f in aggregate_functions() {
        ctx.register_udaf(f);
    }
}

/// A context with both tables registered empty: enough to plan, validate and explain queries
/// (and to merge partials) without any data.
pub fn planning_context() -> Result<SessionContext> {
    let ctx = SessionContext::new_with_config(session_config());
    register_functions(&ctx);
    for table in Table::ALL {
        let schema = table.arrow_schema();
        let mem = MemTable::try_new(schema, vec![vec![]])?;
        ctx.register_table(table.name(), Arc::new(mem))?;
    }
    Ok(ctx)
}
