//! A cache of validated queries, keyed by their SQL text, so that a query a node has already
//! approved is not parsed, planned, checked and hardened again (≈ 10 ms of CPU per query per
//! node for a small query, which dominated small queries under load).
//!
//! Approval is a pure function of the SQL and the node's DataFusion session, whose tables (the
//! fixed CX schema, as listing tables over the data directory) and options are set once at
//! start and never change while the node runs: new data files are picked up when a plan is
//! executed, not when it is approved. So the approved plan for a given SQL text is the same
//! every time, and reusing it changes nothing. Only approvals are cached (a refused query is
//! checked afresh each time, and says why each time); the steward's policy is not part of an
//! approval and is checked on every query, so a policy reload takes effect at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::execution::context::SessionContext;

use cxfed_queries::query::ApprovedQuery;
use cxfed_queries::rules::QueryError;
use cxfed_queries::validate::approve;

/// Approved queries held at most (the cache is emptied when full: simple, and bounded).
pub const CAPACITY: usize = 512;

/// Longest SQL text cached (longer queries are approved every time).
pub const MAX_CACHED_SQL: usize = 16 * 1024;

/// The cache of one node's approvals.
#[derive(Debug, Default)]
pub struct Approvals {
    cache: Mutex<HashMap<String, Arc<ApprovedQuery>>>,
}

impl Approvals {
    /// The approval of `sql` in `ctx`: cached, or computed (and cached if approved).
    pub async fn approve(
        &self,
        ctx: &SessionContext,
        sql: &str,
    ) -> Result<Arc<ApprovedQuery>, QueryError> {
        if let Some(hit) = self.lock().get(sql) {
            return Ok(Arc::clone(hit));
        }
        let approved = Arc::new(approve(&ctx.state(), sql).await?);
        if sql.len() <= MAX_CACHED_SQL {
            let mut cache = self.lock();
            if cache.len() >= CAPACITY {
                cache.clear();
            }
            cache.insert(sql.to_string(), Arc::clone(&approved));
        }
        Ok(approved)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ApprovedQuery>>> {
        // The map holds no invariant a panicking holder could break.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn caches_approvals_and_not_refusals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = crate::engine::node_context(dir.path(), 64 << 20).expect("context");
        let a = Approvals::default();
        let sql = "SELECT channel, COUNT(*) FROM experience GROUP BY channel";
        let first = a.approve(&ctx, sql).await.expect("approved");
        let second = a.approve(&ctx, sql).await.expect("approved");
        assert!(Arc::ptr_eq(&first, &second), "the second is the cached one");
        assert_eq!(second.sql(), sql);
        for _ in 0..2 {
            a.approve(&ctx, "SELECT person_id FROM experience")
                .await
                .expect_err("refused, every time");
        }
        assert_eq!(a.lock().len(), 1);
    }

    #[tokio::test]
    async fn a_comment_makes_another_text_with_the_same_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = crate::engine::node_context(dir.path(), 64 << 20).expect("context");
        let a = Approvals::default();
        let sql = "SELECT channel, COUNT(*) FROM experience GROUP BY channel";
        let plain = a.approve(&ctx, sql).await.expect("approved");
        let commented = a
            .approve(&ctx, &format!("{sql}\n-- bench run 7"))
            .await
            .expect("a comment is allowed");
        assert!(!Arc::ptr_eq(&plain, &commented), "cached by text");
        assert_eq!(
            plain
                .k_partial()
                .expect("partial")
                .exact
                .display_indent()
                .to_string(),
            commented
                .k_partial()
                .expect("partial")
                .exact
                .display_indent()
                .to_string()
        );
    }
}
