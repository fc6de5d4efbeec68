//! End-to-end: public key sets in `dp` mode. A query grouped only by keys whose values are
//! public (schema vocabularies, or lists the steward declares) gets every group of their cross
//! product, noisy even where nobody is; a data-dependent key keeps partition selection; a
//! public cross product over the steward's cap is refused before any budget is charged.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;

use cxfed::client::QueryFailure;
use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;
use cxfed_queries::keyset::PublicKeys;
use cxfed_queries::schema::{CHANNELS, JOURNEY_STAGES, LIFE_EXPERIENCES};

fn text(row: &[serde_json::Value], i: usize) -> String {
    row[i]
        .as_str()
        .map_or_else(|| row[i].to_string(), String::from)
}

async fn used(fed: &Fed, i: usize) -> f64 {
    fed.budget(i).await.analysts.iter().map(|a| a.used).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_release_every_group_and_data_dependent_keys_do_not() {
    let mut public_keys = PublicKeys::schema_only();
    public_keys
        .declare_text("agency", &["SSA".into(), "CMS".into(), "OPM".into()])
        .unwrap();
    let fed = Fed::start_dp(
        400,
        DpSettings {
            budget_epsilon: 100.0,
            public_keys,
            ..DpSettings::DEFAULT
        },
    )
    .await;

    // Vocabularies: the whole cross product, in the order the SQL asks for, nothing withheld.
    let sql = "SELECT life_experience, journey_stage, channel, COUNT(*) AS n, AVG(trust) AS t \
               FROM experience GROUP BY life_experience, journey_stage, channel \
               ORDER BY life_experience, journey_stage, channel";
    let got = fed.query(sql).await.unwrap();
    let keys: BTreeSet<(String, String, String)> = got
        .rows
        .iter()
        .map(|r| (text(r, 0), text(r, 1), text(r, 2)))
        .collect();
    let mut all = BTreeSet::new();
    for l in LIFE_EXPERIENCES {
        for s in JOURNEY_STAGES {
            for c in CHANNELS {
                all.insert((l.to_string(), s.to_string(), c.to_string()));
            }
        }
    }
    assert_eq!(got.rows.len(), all.len(), "one row per public group");
    assert_eq!(keys, all);
    assert_eq!(got.suppressed_groups, 0);
    assert!(got.complete);
    // Every group the pooled data holds is among them, and most of the product is empty.
    let pooled = fed.pooled();
    let truth = pooled
        .sql("SELECT DISTINCT life_experience, journey_stage, channel FROM experience")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let truth = cxfed::output::rows(&truth).unwrap();
    assert!(!truth.is_empty() && truth.len() < all.len());
    for r in &truth {
        assert!(
            keys.contains(&(text(r, 0), text(r, 1), text(r, 2))),
            "{r:?}"
        );
    }
    // Counts are noisy but never negative, with an interval on every one.
    for (r, row) in got.rows.iter().enumerate() {
        assert!(row[3].as_i64().unwrap() >= 0, "{row:?}");
        assert!(got.ci95[r][3].is_some(), "{row:?}");
    }

    // WHERE narrows the set: only the phone groups.
    let got = fed
        .query("SELECT journey_stage, channel, COUNT(*) FROM experience WHERE channel = 'phone' GROUP BY journey_stage, channel")
        .await
        .unwrap();
    assert_eq!(got.rows.len(), JOURNEY_STAGES.len());
    assert!(got.rows.iter().all(|r| text(r, 1) == "phone"));

    // A key the steward declared public (agency), and one nobody did (service): only groups
    // that pass the noisy threshold, so fewer than the services that exist.
    let got = fed
        .query("SELECT agency, COUNT(*) FROM experience GROUP BY agency ORDER BY agency")
        .await
        .unwrap();
    let agencies: Vec<String> = got.rows.iter().map(|r| text(r, 0)).collect();
    assert_eq!(agencies, ["CMS", "OPM", "SSA"]);
    let tiny = "SELECT service, COUNT(*) FROM experience WHERE life_experience = 'approaching_retirement' AND journey_stage = 'apply' AND channel = 'paper' GROUP BY service";
    let got = fed.query(tiny).await.unwrap();
    let services = pooled
        .sql(&tiny.replace("COUNT(*)", "COUNT(DISTINCT person_id)"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let services = cxfed::output::rows(&services).unwrap();
    assert!(
        got.rows.len() <= services.len(),
        "partition selection never invents a service: {:?} vs {services:?}",
        got.rows
    );

    // Too large a public product: refused by every node before anything is charged.
    let before: Vec<f64> = [
        used(&fed, 0).await,
        used(&fed, 1).await,
        used(&fed, 2).await,
    ]
    .into();
    let huge = "SELECT state, age_band, channel, journey_stage, COUNT(*) FROM experience GROUP BY state, age_band, channel, journey_stage";
    match fed.query(huge).await {
        Err(QueryFailure::Refused(b)) => {
            let all_nodes = b.nodes.iter().all(|n| {
                n.error
                    .as_deref()
                    .is_some_and(|e| e.contains("CXF-P004") && e.contains("public key set"))
            });
            assert!(b.code == "CXF-P004" || all_nodes, "{b:?}");
        }
        other => panic!("{other:?}"),
    }
    let after: Vec<f64> = [
        used(&fed, 0).await,
        used(&fed, 1).await,
        used(&fed, 2).await,
    ]
    .into();
    assert_eq!(before, after, "a refused query charges nothing");
}
