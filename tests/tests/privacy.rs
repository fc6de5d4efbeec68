//! End-to-end: differential privacy enforced by every node — noisy answers with intervals,
//! per-analyst budgets that run out and survive a crash, and the differencing attack no longer
//! recovering a person.
#![allow(clippy::unwrap_used, missing_docs)]

use cxfed::client::QueryFailure;
use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;

fn settings(budget: f64) -> DpSettings {
    DpSettings {
        budget_epsilon: budget,
        ..DpSettings::DEFAULT
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_answers_are_noisy_but_close_and_carry_intervals() {
    let fed = Fed::start_dp(2_000, settings(10.0)).await;
    let sql = "SELECT agency, COUNT(*) AS n, AVG(trust) AS t FROM experience GROUP BY agency ORDER BY agency";
    let got = fed.query(sql).await.unwrap();
    assert_eq!(got.privacy, "dp");
    assert!(
        got.nodes.iter().all(|n| n.epsilon == Some(1.0)),
        "{:?}",
        got.nodes
    );
    assert_eq!(got.ci95.len(), got.rows.len());
    for (ci, sd) in got.ci95.iter().flatten().zip(got.noise_sd.iter().flatten()) {
        let (ci, sd) = (ci.unwrap_or(0.0), sd.unwrap_or(0.0));
        assert!(
            (ci / 1.96 - sd).abs() <= 1e-12 * ci,
            "noise_sd is the interval's σ"
        );
    }
    // The truth, from the pooled data (R = G = 1: one row per person and group counts).
    let pooled = fed.pooled();
    let truth = pooled
        .sql("SELECT agency, COUNT(DISTINCT person_id), AVG(trust) FROM experience GROUP BY agency ORDER BY agency")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let truth = cxfed::output::rows(&truth).unwrap();
    assert_eq!(got.rows.len(), 3);
    for (r, (row, t)) in got.rows.iter().zip(&truth).enumerate() {
        assert_eq!(row[0], t[0]);
        let n = row[1].as_i64().unwrap() as f64;
        let persons = t[1].as_i64().unwrap() as f64;
        let ci_n = got.ci95[r][1].expect("count interval");
        assert!(
            ci_n > 0.0 && (n - persons).abs() <= 5.0 * ci_n,
            "count {n} vs {persons} ± {ci_n}"
        );
        let avg = row[2].as_f64().unwrap();
        let ci_t = got.ci95[r][2].expect("avg interval");
        // Bounding keeps one answer per person, so compare loosely with the row average.
        assert!(
            (avg - t[2].as_f64().unwrap()).abs() < 0.25,
            "avg {avg} vs {}",
            t[2]
        );
        assert!(ci_t > 0.0 && ci_t < 0.2, "avg interval {ci_t}");
        assert_eq!(got.ci95[r][0], None, "group keys are not noised");
    }
    // Unbounded arguments are refused in DP mode.
    let r = fed
        .query("SELECT SUM(date_part('year', response_date)) FROM experience")
        .await;
    assert!(
        matches!(&r, Err(QueryFailure::Refused(b)) if b.code == "CXF-Q019"),
        "{r:?}"
    );
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_runs_out_survives_a_crash_and_is_reported_to_stewards() {
    let mut fed = Fed::start_dp(300, settings(3.0)).await;
    let sql = "SELECT COUNT(*) FROM experience";
    for _ in 0..3 {
        fed.query(sql).await.unwrap();
    }
    let r = fed.query(sql).await;
    let Err(QueryFailure::Refused(body)) = r else {
        panic!("fourth query must be refused: {r:?}")
    };
    assert_eq!(body.code, "CXF-P007", "{body:?}");
    assert!(
        body.message.contains("0.000 of 3"),
        "the refusal says what is left: {}",
        body.message
    );
    let steward = fed.client("SSA", "steward");
    let b: cxfed_protocol::wire::BudgetResponse = steward
        .get(format!("{}/v1/budget", fed.fed.url(0)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b.mode, "dp");
    let ssa = b
        .analysts
        .iter()
        .find(|a| a.analyst.contains("/SSA/analyst/"))
        .unwrap();
    assert!(
        (ssa.used - 3.0).abs() < 1e-9 && ssa.remaining < 1e-9,
        "{ssa:?}"
    );
    // Analysts may not read the ledger.
    let resp = fed
        .analyst
        .http
        .get(format!("{}/v1/budget", fed.fed.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Kill SSA's node as if the process died, restart it on the same data: spent stays spent.
    let ssa_node = fed.fed.nodes.remove(0);
    let mut config = ssa_node.node.config.clone();
    ssa_node.kill();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let restarted = cxfed::server::start(config, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", restarted.addr.port());
    let r = cxfed::client::send_query(
        &fed.analyst,
        &url,
        &cxfed_protocol::wire::QueryRequest::new(sql),
    )
    .await;
    assert!(
        matches!(&r, Err(QueryFailure::Refused(b)) if b.code == "CXF-P007"),
        "{r:?}"
    );
    // Another analyst still has budget.
    let cms = fed.analyst_of("CMS");
    let r =
        cxfed::client::send_query(&cms, &url, &cxfed_protocol::wire::QueryRequest::new(sql)).await;
    assert!(r.is_ok(), "{r:?}");
    restarted.shutdown().await;
    fed.fed.shutdown().await;
}

/// The tracker attack of the policy tests, repeated under DP: the budget runs out long before
/// averaging could pin one person's answer, and each difference is far noisier than the
/// 1–5 scale the answer lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_attack_fails_under_differential_privacy() {
    let fed = Fed::start_dp(600, settings(10.0)).await;
    let q1 =
        "SELECT COUNT(*), SUM(trust) FROM experience WHERE agency = 'SSA' AND trust IS NOT NULL";
    let q2 = "SELECT COUNT(*), SUM(trust) FROM experience WHERE agency = 'SSA' AND trust IS NOT NULL AND NOT (age_band = '65_74' AND channel = 'phone' AND journey_stage = 'apply')";
    let mut diffs = Vec::new();
    let mut refused = false;
    for _ in 0..20 {
        match (fed.query(q1).await, fed.query(q2).await) {
            (Ok(a), Ok(b)) => {
                let v = |r: &cxfed_protocol::wire::QueryResponse| {
                    r.rows
                        .first()
                        .map(|row| row[1].as_f64().unwrap_or(0.0))
                        .unwrap_or(0.0)
                };
                diffs.push(v(&a) - v(&b));
                let ci = a.ci95[0][1].unwrap();
                assert!(
                    ci > 5.0,
                    "a single sum's interval ({ci}) must dwarf one person's 1–5 answer"
                );
            }
            _ => {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "the budget (ε = 10, 1 per query) must run out");
    assert!(diffs.len() <= 5, "{}", diffs.len());
    fed.fed.shutdown().await;
}

/// A value whose 95% noise interval is wider than its measure's whole range says nothing: the
/// answer names it (per row, by column), and the table and CSV mark it — and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_whose_interval_exceeds_the_range_are_marked_not_informative() {
    let fed = Fed::start_dp(600, settings(10.0)).await;
    // A few dozen people per channel answer trust = 1 (or satisfaction = 1): those averages
    // are mostly noise (yet rarely without any value), while the plain averages are not.
    let sql = "SELECT channel, AVG(trust) AS t, \
               AVG(ease) FILTER (WHERE trust = 1) AS rare, \
               ROUND(AVG(satisfaction), 2) AS s, \
               AVG(ease) FILTER (WHERE satisfaction = 1) AS rare2 \
               FROM experience GROUP BY channel ORDER BY channel";
    let got = fed.query(sql).await.unwrap();
    let ranges: Vec<Option<f64>> = got.formats.iter().map(|f| f.range).collect();
    assert_eq!(
        ranges,
        vec![None, Some(4.0), Some(4.0), Some(4.0), Some(4.0)]
    );
    assert_eq!(got.formats[3].decimals, Some(2));
    let mut marked = 0;
    for (r, row_ci) in got.ci95.iter().enumerate() {
        for (c, ci) in row_ci.iter().enumerate() {
            let wide = matches!((ci, ranges[c]), (Some(ci), Some(range)) if 2.0 * ci > range);
            let listed = got
                .not_informative
                .get(r)
                .is_some_and(|cols| cols.contains(&got.columns[c]));
            assert_eq!(wide, listed, "row {r} column {c}: ± {ci:?}");
            marked += usize::from(listed);
        }
    }
    assert!(
        marked > 0,
        "the rare average must be marked: {:?}",
        got.ci95
    );
    let table = cxfed::output::render(&got, cxfed::output::Format::Table);
    assert_eq!(
        table.matches("(not informative)").count(),
        marked,
        "{table}"
    );
    assert!(
        table.contains("not informative: the noise interval is wider"),
        "{table}"
    );
    let csv = cxfed::output::render(&got, cxfed::output::Format::Csv);
    assert!(
        csv.lines().next().unwrap().ends_with(",not_informative"),
        "{csv}"
    );
    fed.fed.shutdown().await;
}
