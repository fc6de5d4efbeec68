//! Fuzz target: parse + plan + validate arbitrary text, and build the partial plans of whatever
//! is accepted. Must never panic, hang or report an internal error.
#![no_main]

use std::sync::OnceLock;

use cxfed_queries::privacy::DpParams;
use cxfed_queries::validate::{QueryError, approve};
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
            q.partial_plan().expect("partial plan of an accepted query");
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
