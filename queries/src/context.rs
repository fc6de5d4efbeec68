//! DataFusion sessions configured for the CX schema: the same function set and options on every
//! node, so that every node plans an analyst's SQL the same way.

use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::functions_aggregate::{stddev::stddev_udaf, variance::var_samp_udaf};
use datafusion::logical_expr::AggregateUDF;
use datafusion::logical_expr::planner::ExprPlanner;

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

/// Scalar functions DataFusion's `crypto_expressions` feature adds (cxfed's own build has it
/// off; a build whose other dependencies turn it on must still plan the same way).
const CRYPTO_FUNCTIONS: &[&str] = &["md5", "sha224", "sha256", "sha384", "sha512", "digest"];

/// A session with `config` (and `runtime`, if given) and exactly cxfed's function set, whatever
/// DataFusion features other crates of the build enable (Ballista turns on DataFusion's
/// defaults: nested and crypto functions and their SQL planners). Every node must plan, and
/// refuse, the same SQL the same way, with the same rule codes.
pub fn new_context(config: SessionConfig, runtime: Option<Arc<RuntimeEnv>>) -> SessionContext {
    use datafusion::functions::core::planner::CoreFunctionPlanner;
    use datafusion::functions_aggregate::planner::AggregateFunctionPlanner;
    use datafusion::functions_window::planner::WindowFunctionPlanner;
    let planners: Vec<Arc<dyn ExprPlanner>> = vec![
        Arc::new(CoreFunctionPlanner::default()),
        Arc::new(AggregateFunctionPlanner),
        Arc::new(WindowFunctionPlanner),
    ];
    let scalars = datafusion::functions::all_default_functions()
        .into_iter()
        .filter(|f| !CRYPTO_FUNCTIONS.contains(&f.name()))
        .collect::<Vec<_>>();
    let mut builder = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_expr_planners(planners)
        .with_scalar_functions(scalars);
    if let Some(runtime) = runtime {
        builder = builder.with_runtime_env(runtime);
    }
    let ctx = SessionContext::new_with_state(builder.build());
    register_functions(&ctx);
    ctx
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
    let ctx = new_context(session_config(), None);
    for table in Table::ALL {
        let schema = table.arrow_schema();
        let mem = MemTable::try_new(schema, vec![vec![]])?;
        ctx.register_table(table.name(), Arc::new(mem))?;
    }
    Ok(ctx)
}
