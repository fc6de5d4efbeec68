//! End-to-end: a node reuses a query's exact partial while its data files are unchanged
//! (`[query] cache_mb`), and nothing a user could see changes but the time: new data is
//! answered at once, every dp answer carries fresh noise, and every node still charges every
//! query to the analyst's budget.
#![allow(clippy::unwrap_used, missing_docs)]

use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;
use cxfed_queries::schema::Table;
use serde_json::Value;

const BY_AGENCY: &str =
    "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency ORDER BY agency";

fn count_of(rows: &[Vec<Value>], agency: &str) -> i64 {
    rows.iter()
        .find(|r| r[0] == agency)
        .and_then(|r| r[1].as_i64())
        .unwrap_or_else(|| panic!("{agency} missing from {rows:?}"))
}

/// Adds a copy of one of `agency`'s experience files (written aside, then renamed, as ingest
/// does): every row of that file is counted twice from then on.
fn add_copy_of_a_file(fed: &Fed, agency: &str) -> std::path::PathBuf {
    let dir = cxfed::storage::table_dir(&fed.data_dir(agency), Table::Experience);
    let first = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .unwrap();
    let temp = dir.join(".copy.parquet.tmp");
    std::fs::copy(&first, &temp).unwrap();
    let copy = dir.join("9999999999999999999-copy.parquet");
    std::fs::rename(&temp, &copy).unwrap();
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_only_answers_repeat_and_new_files_are_read_at_once() {
    let fed = Fed::start().await;
    let first = fed.query(BY_AGENCY).await.unwrap();
    let again = fed.query(BY_AGENCY).await.unwrap();
    assert_eq!(
        first.rows, again.rows,
        "the same files, the same exact answer"
    );

    // The truth for SSA after the copy: its rows plus the copied file's rows.
    let copied = add_copy_of_a_file(&fed, "SSA");
    let ctx = datafusion::prelude::SessionContext::new();
    let extra = ctx
        .read_parquet(
            copied.to_str().unwrap(),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .unwrap()
        .count()
        .await
        .unwrap() as i64;
    assert!(extra > 0);
    let after = fed.query(BY_AGENCY).await.unwrap();
    assert_eq!(
        count_of(&after.rows, "SSA"),
        count_of(&first.rows, "SSA") + extra,
        "a new file is read by the next query: {:?}",
        after.rows
    );
    for other in ["CMS", "OPM"] {
        assert_eq!(count_of(&after.rows, other), count_of(&first.rows, other));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_repeats_get_fresh_noise_and_are_charged_every_time() {
    let dp = DpSettings {
        budget_epsilon: 100.0,
        ..DpSettings::DEFAULT
    };
    let fed = Fed::start_dp(400, dp.clone()).await;
    let sql = "SELECT channel, COUNT(*) AS n, AVG(trust) AS t FROM experience GROUP BY channel";
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(fed.used_by_ssa_analyst(i).await);
    }
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(fed.query(sql).await.unwrap().rows);
    }
    let mut after = Vec::new();
    for i in 0..3 {
        after.push(fed.used_by_ssa_analyst(i).await);
    }
    for i in 0..3 {
        let spent = after[i] - before[i];
        assert!(
            (spent - 4.0 * dp.epsilon_per_query).abs() < 1e-9,
            "node {i} charged {spent} for four queries of ε {}",
            dp.epsilon_per_query
        );
    }
    // Exact partials are reused, noise is not: four answers, four different noisy counts.
    let counts: Vec<String> = answers
        .iter()
        .map(|rows| format!("{:?}", rows.iter().map(|r| &r[1]).collect::<Vec<_>>()))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = counts.iter().collect();
    assert_eq!(distinct.len(), 4, "fresh noise every time: {counts:?}");
}
