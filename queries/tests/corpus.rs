//! The hostile-query corpus (`corpus/refused.sql`) and the allowed corpus (`corpus/allowed.sql`)
//! against the validator: every refused query with exactly its rule code, every allowed query
//! approved and its partial plan built (k-only and DP).
#![allow(missing_docs, clippy::unwrap_used)]

use cxfed_queries::context::planning_context;
use cxfed_queries::privacy::DpParams;
use cxfed_queries::rules::QueryError;
use cxfed_queries::validate::approve;

/// Parses a corpus file into (expected code, SQL) blocks.
pub fn blocks(text: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let mut code = None;
    let mut sql = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("-- expect: ") {
            code = Some(c.trim().to_string());
        } else if line == ";;" {
            out.push((code.take(), sql.join("\n")));
            sql.clear();
        } else if sql.is_empty() && line.starts_with("-- ") {
            continue;
        } else if !(sql.is_empty() && line.is_empty()) {
            sql.push(line);
        }
    }
    out
}

#[tokio::test]
async fn every_refused_query_is_refused_with_its_rule() {
    let cases = blocks(include_str!("corpus/refused.sql"));
    assert!(cases.len() >= 200, "{} refused cases", cases.len());
    let ctx = planning_context().unwrap();
    let mut wrong = Vec::new();
    for (code, sql) in &cases {
        let code = code.as_deref().unwrap();
        // k-only argument rules are checked by the k-only partial plan, not by the validator.
        let verdict = match approve(&ctx.state(), sql).await {
            Ok(q) if code == "CXF-Q020" => q.k_partial().map(|_| ()),
            other => other.map(|_| ()),
        };
        match verdict {
            Ok(_) => wrong.push(format!("ACCEPTED (expected {code}): {sql}")),
            Err(QueryError::Rejected(r)) => {
                if r.rule.code() != code {
                    wrong.push(format!(
                        "{} (expected {code}): {sql} — {}",
                        r.rule.code(),
                        r.reason
                    ));
                } else if code == "CXF-Q012" && r.position.is_none() {
                    wrong.push(format!("no position for identifier refusal: {sql}"));
                }
            }
            Err(e) => wrong.push(format!("INTERNAL {e}: {sql}")),
        }
    }
    let shown: Vec<String> = wrong
        .iter()
        .map(|w| w.chars().take(300).collect())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} mismatched:\n{}",
        wrong.len(),
        cases.len(),
        shown.join("\n")
    );
}

#[tokio::test]
async fn every_allowed_query_is_approved_and_has_partial_plans() {
    let cases = blocks(include_str!("corpus/allowed.sql"));
    assert!(cases.len() >= 100, "{} allowed cases", cases.len());
    let ctx = planning_context().unwrap();
    let dp = DpParams {
        epsilon: 1.0,
        delta: 1e-6,
        max_groups_per_person: 1,
        max_rows_per_person: 1,
        k: 10,
    };
    let mut wrong = Vec::new();
    let mut dp_only = 0;
    for (k_only_refusal, sql) in &cases {
        match approve(&ctx.state(), sql).await {
            Ok(q) => {
                // Percentiles (`-- expect: CXF-Q021`): the k-only partial refuses them with
                // that code; the DP partial answers them.
                match (q.partial_plan(), k_only_refusal) {
                    (Ok(_), None) => {}
                    (Err(QueryError::Rejected(r)), Some(code)) if r.rule.code() == code => {
                        dp_only += 1;
                    }
                    (Err(e), _) => wrong.push(format!("partial plan failed ({e}): {sql}")),
                    (Ok(_), Some(code)) => {
                        wrong.push(format!("k-only partial built, expected {code}: {sql}"))
                    }
                }
                if let Err(e) = q.dp_partial(&dp) {
                    wrong.push(format!("dp plan failed ({e}): {sql}"));
                }
            }
            Err(e) => wrong.push(format!("REFUSED {e}: {sql}")),
        }
    }
    assert!(dp_only >= 10, "{dp_only} dp-only (percentile) cases");
    assert!(
        wrong.is_empty(),
        "{} of {} failed:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// Inputs the fuzzer (`queries/fuzz`) found, kept as files: each must be refused or planned
/// (k-only and DP) without an internal error — the fuzz target's own invariant. `timeout-*`
/// and `slow-*` inputs once made the SQL parser backtrack for minutes (2^N speculative parses);
/// they must now be refused as too large. A watchdog turns a hang into a failure (a bound on
/// "finishes at all", not a speed target: the patched parser answers in milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzer_findings_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/fuzz-crashes");
    let ctx = planning_context().unwrap();
    let mut seen = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let Ok(sql) = String::from_utf8(std::fs::read(&path).unwrap()) else {
            continue;
        };
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let state = ctx.state();
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), async move {
            approve(&state, &sql).await
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: still parsing after 60 s"));
        match outcome {
            Err(QueryError::Rejected(r)) => {
                if name.starts_with("timeout-") || name.starts_with("slow-") {
                    assert_eq!(r.rule.code(), "CXF-Q018", "{name}: {r:?}");
                }
            }
            Err(e) => panic!("{name}: internal error {e}"),
            Ok(q) => {
                q.partial_plan().unwrap();
                let dp = DpParams {
                    epsilon: 1.0,
                    delta: 1e-6,
                    max_groups_per_person: 1,
                    max_rows_per_person: 1,
                    k: 10,
                };
                match q.dp_partial(&dp) {
                    Ok(_) | Err(QueryError::Rejected(_)) => {}
                    Err(e) => panic!("{name}: internal error in the DP plan {e}"),
                }
            }
        }
    }
    assert!(seen >= 6);
}
