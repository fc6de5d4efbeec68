//! End-to-end: MEDIAN and the 90th percentile of waits by channel from a real three-node
//! differential-privacy federation — noisy quantiles read off the merged histograms, in the
//! measure's range, close to the pooled truth, each with a 95% interval; and the same SQL
//! refused by a `k-only` federation with its rule code.
#![allow(clippy::unwrap_used, missing_docs)]

use cxfed::client::QueryFailure;
use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;

const SQL: &str = "SELECT channel, MEDIAN(wait_minutes) AS median_wait, \
     PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY wait_minutes) AS p90_wait, COUNT(*) AS n \
     FROM operational GROUP BY channel ORDER BY channel";

/// The p-quantile of `values` (sorted), as PERCENTILE_CONT defines it.
fn percentile(values: &[f64], p: f64) -> f64 {
    let at = p * (values.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    values[lo] + (at - lo as f64) * (values[hi] - values[lo])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn median_and_p90_of_waits_by_channel_from_a_dp_federation() {
    let fed = Fed::start_dp(
        3_000,
        DpSettings {
            budget_epsilon: 10.0,
            ..DpSettings::DEFAULT
        },
    )
    .await;
    let got = fed.query(SQL).await.unwrap();
    assert_eq!(got.privacy, "dp");
    assert!(got.nodes.iter().all(|n| n.epsilon == Some(1.0)));
    assert_eq!(got.columns, ["channel", "median_wait", "p90_wait", "n"]);
    assert!(got.rows.len() >= 4, "{:?}", got.rows);
    let mut compared = 0;

    // The truth from the pooled rows (waits clamped to the DP bound of 240 minutes).
    let pooled = fed.pooled();
    let rows = pooled
        .sql("SELECT channel, wait_minutes FROM operational WHERE wait_minutes IS NOT NULL")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let rows = cxfed::output::rows(&rows).unwrap();
    for (r, row) in got.rows.iter().enumerate() {
        let channel = row[0].as_str().unwrap();
        let mut waits: Vec<f64> = rows
            .iter()
            .filter(|t| t[0].as_str() == Some(channel))
            .map(|t| t[1].as_f64().unwrap().min(240.0))
            .collect();
        waits.sort_by(f64::total_cmp);
        if waits.len() < 100 {
            // Paper and postal mail have no waits: the histogram is noise alone, whatever it
            // says (NULL when it fits to nobody) is not compared.
            for c in [1, 2] {
                let v = row[c].as_f64();
                assert!(
                    v.is_none_or(|v| (0.0..=240.0).contains(&v)),
                    "{channel}: {v:?}"
                );
            }
            continue;
        }
        let median = row[1].as_f64().unwrap();
        let p90 = row[2].as_f64().unwrap();
        let (ci_m, ci_90) = (got.ci95[r][1], got.ci95[r][2]);
        eprintln!(
            "{channel}: median {median:.1} ± {ci_m:?} (pooled {:.1}), p90 {p90:.1} ± {ci_90:?} (pooled {:.1}), {} waits",
            percentile(&waits, 0.5),
            percentile(&waits, 0.9),
            waits.len()
        );
        assert!(
            (0.0..=240.0).contains(&median),
            "{channel}: median {median}"
        );
        assert!((0.0..=240.0).contains(&p90), "{channel}: p90 {p90}");
        assert!(
            median <= p90 + 1e-9,
            "{channel}: median {median} > p90 {p90}"
        );
        let (ci_m, ci_90) = (ci_m.expect("median interval"), ci_90.expect("p90 interval"));
        // 0 only where the whole interval sits at the bound (most email waits exceed 240).
        assert!(
            ci_m >= 0.0 && ci_90 >= 0.0,
            "{channel}: intervals {ci_m}, {ci_90}"
        );
        // Within the interval, plus the grid's resolution there (the answer spreads values
        // evenly inside a bucket: at most 30 minutes wide where a p90 of waits falls) and
        // the bounding's sampling of one case per person.
        for (name, value, ci, p, slack) in [
            ("median", median, ci_m, 0.5, 10.0),
            ("p90", p90, ci_90, 0.9, 30.0),
        ] {
            let truth = percentile(&waits, p);
            assert!(
                (value - truth).abs() <= ci + slack,
                "{channel} {name}: {value} ± {ci} vs pooled {truth}"
            );
        }
        assert_eq!(got.ci95[r][0], None, "group keys are not noised");
        compared += 1;
    }
    assert!(compared >= 4, "{compared} channels compared");

    // A percentile of an expression has no grid: refused, with its rule.
    let r = fed
        .query("SELECT MEDIAN(wait_minutes / 60.0) FROM operational")
        .await;
    assert!(
        matches!(&r, Err(QueryFailure::Refused(b)) if b.code == "CXF-Q019"),
        "{r:?}"
    );
    fed.fed.shutdown().await;

    // A k-only federation refuses every percentile.
    let fed = Fed::start_with(300, std::time::Duration::from_secs(20)).await;
    let r = fed.query(SQL).await;
    assert!(
        matches!(&r, Err(QueryFailure::Refused(b)) if b.code == "CXF-Q021" && b.message.contains("raw value")),
        "{r:?}"
    );
    fed.fed.shutdown().await;
}
