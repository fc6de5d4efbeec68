//! Fuzz target: parse + plan + validate arbitrary text, and build the partial plans of whatever
//! is accepted (each mode may still refuse one with a rule). Must never panic, hang or report an
//! internal error.
#![no_main]

use std::sync::OnceLock;

use cxfed_queries::privacy::DpParams;
use cxfed_queries::rules::QueryError;
use cxfed_queries::validate::approve;
use datafusion::prelude::SessionContext;
use libfuzzer_sys::fuzz_target;

fn context() -> &'static SessionContext {
    static CTX: OnceLock<SessionContext> = OnceLock::new();
    CTX.get_or_init(|| cxfed_queries::context::planning_context().expect("context"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    match rt.block_on(approve(&context().state(), sql)) {
        Ok(q) => {
            // A mode can refuse what validation accepts (an exact percentile in k-only mode,
            // CXF-Q021), with a rule: never with an internal error.
            match q.partial_plan() {
                Ok(_) | Err(QueryError::Rejected(_)) => {}
                Err(e) => panic!("internal error building the k-only plan: {e}"),
            }
            let dp = DpParams { epsilon: 1.0, delta: 1e-6, max_groups_per_person: 1, max_rows_per_person: 1, k: 10 };
            match q.dp_partial(&dp) {
                Ok(_) | Err(QueryError::Rejected(_)) => {}
                Err(e) => panic!("internal error building the DP plan: {e}"),
            }
        }
        Err(QueryError::Rejected(_)) => {}
        Err(e) => panic!("internal error: {e}"),
    }
});
