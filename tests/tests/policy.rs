//! End-to-end: the steward's policy, enforced by each node on its own part of every query,
//! reloaded without a restart; a flood of bad queries; and the differencing attack that
//! k-anonymity alone cannot stop.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use cxfed::client::QueryFailure;
use cxfed_e2e::Fed;
use cxfed_protocol::wire::NodeState;
use serde_json::Value;

/// Replaces the `[policy]` table of node `i`'s config file (atomically, as an editor would
/// with a rename) and waits until `ready` says the node took it.
async fn set_policy(fed: &Fed, i: usize, policy: &str) {
    let path = &fed.fed.configs[i];
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("[policy]").unwrap();
    let end = text[start + 1..]
        .find("\n[")
        .map(|e| start + 1 + e)
        .unwrap_or(text.len());
    let new = format!("{}[policy]\n{policy}\n{}", &text[..start], &text[end..]);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn refused_code(r: &Result<cxfed_protocol::wire::QueryResponse, QueryFailure>) -> Option<String> {
    match r {
        Err(QueryFailure::Refused(b)) => Some(b.code.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steward_policy_is_enforced_by_each_node_and_reloads_live() {
    let fed = Fed::start_with(600, Duration::from_secs(20)).await;
    let by_state = "SELECT state, COUNT(*) FROM experience GROUP BY state ORDER BY state";

    // CMS hides `state`: its node refuses its part, so the whole query fails by default...
    set_policy(&fed, 1, "hidden_dimensions = [\"state\"]").await;
    eventually("CMS hides state", || async {
        match fed.query(by_state).await {
            Err(QueryFailure::Refused(b)) => b.nodes.iter().any(|n| {
                n.agency == "CMS"
                    && n.status == NodeState::Refused
                    && n.error.as_deref().unwrap_or("").contains("CXF-P002")
            }),
            _ => false,
        }
    })
    .await;
    // ... and with --allow-partial the others answer, marked incomplete.
    let partial = fed.query_at(0, by_state, false).await.unwrap();
    assert!(!partial.complete);
    // Queries that do not touch `state` still run everywhere.
    assert!(
        fed.query("SELECT channel, COUNT(*) FROM experience GROUP BY channel")
            .await
            .unwrap()
            .complete
    );

    // A broken policy file is refused; the policy in force stays.
    set_policy(&fed, 1, "hidden_dimensions = [\"nosuch_column\"]").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        fed.query(by_state).await.is_err(),
        "old policy must stay in force"
    );

    // Queried as coordinator, CMS refuses outright with the policy code.
    let r = fed.query_at(1, by_state, true).await;
    assert_eq!(refused_code(&r).as_deref(), Some("CXF-P002"));

    // OPM only serves its own analysts: the SSA analyst is refused there.
    set_policy(&fed, 2, "allowed_agencies = [\"OPM\"]").await;
    eventually("OPM refuses SSA analysts", || async {
        let r = fed.query_at(0, "SELECT COUNT(*) FROM experience", true).await;
        matches!(&r, Err(QueryFailure::Refused(b)) if b.nodes.iter().any(|n| n.agency == "OPM" && n.error.as_deref().unwrap_or("").contains("CXF-P001")))
    })
    .await;
    set_policy(&fed, 2, "").await;
    eventually("OPM serves SSA again", || async {
        fed.query("SELECT COUNT(*) FROM experience").await.is_ok()
    })
    .await;

    // A k floor: OPM withholds every group below 1,000 people.
    let q = "SELECT agency, journey_stage, COUNT(*) FROM experience GROUP BY agency, journey_stage ORDER BY agency, journey_stage";
    let before = fed.query(q).await.unwrap();
    set_policy(&fed, 2, "min_k = 1000").await;
    eventually("OPM k floor", || async {
        match fed.query(q).await {
            Ok(r) => {
                !r.rows.iter().any(|row| row[0] == "OPM")
                    && r.suppressed_groups > before.suppressed_groups
            }
            Err(_) => false,
        }
    })
    .await;

    // Too many groups.
    set_policy(&fed, 0, "max_groups = 3").await;
    eventually("SSA max groups", || async {
        match fed
            .query("SELECT channel, COUNT(*) FROM experience GROUP BY channel")
            .await
        {
            Err(QueryFailure::Refused(b)) => {
                b.code == "CXF-P004"
                    || b.nodes.iter().any(|n| {
                        n.agency == "SSA"
                            && n.error.as_deref().unwrap_or("").starts_with("CXF-P004")
                    })
            }
            _ => false,
        }
    })
    .await;

    // Rate limit per analyst: 429 with CXF-P003, other analysts unaffected.
    set_policy(&fed, 0, "rate_limit_per_minute = 3").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(refused_code(
            &fed.query("SELECT COUNT(*) FROM experience").await,
        ));
    }
    assert!(
        codes.iter().any(|c| c.as_deref() == Some("CXF-P003")),
        "{codes:?}"
    );
    // Another analyst, through the same coordinator, is not held back by SSA's analyst.
    let cms = fed.analyst_of("CMS");
    let r = cxfed::client::send_query(
        &cms,
        &fed.fed.url(0),
        &cxfed_protocol::wire::QueryRequest::new("SELECT COUNT(*) FROM experience"),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_answering_good_queries_under_a_flood() {
    let fed = Fed::start_with(3_000, Duration::from_secs(60)).await;
    // No rate limit: the flood must be held by the in-flight limit and the validator alone.
    for i in 0..3 {
        set_policy(&fed, i, "rate_limit_per_minute = 0").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let url = fed.fed.url(0);
    let attacker = fed.analyst_of("CMS");
    let bad = [
        "SELECT * FROM experience",
        "SELECT person_id, COUNT(*) FROM experience GROUP BY person_id",
        // Expensive but allowed: the heaviest join with distinct counts over five dimensions.
        "SELECT e.state, e.age_band, e.channel, e.service, o.outcome, COUNT(DISTINCT e.person_id), STDDEV(o.processing_days) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY e.state, e.age_band, e.channel, e.service, o.outcome",
        "SELECT COUNT(*) FROM experience WHERE ((((((((((((trust > 1))))))))))))",
        "not sql at all",
    ];
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let client = attacker.clone();
            let url = url.clone();
            let sql = bad[i % bad.len()].to_string();
            tokio::spawn(async move {
                let req = cxfed_protocol::wire::QueryRequest::new(sql);
                match cxfed::client::send_query(&client, &url, &req).await {
                    Ok(_) => (true, false),
                    Err(QueryFailure::Refused(b)) => (
                        false,
                        b.code == "CXF-P003"
                            || b.nodes
                                .iter()
                                .any(|n| n.error.as_deref().unwrap_or("").starts_with("CXF-P003")),
                    ),
                    Err(_) => (false, false),
                }
            })
        })
        .collect();
    // Meanwhile the SSA analyst's queries keep being answered.
    let mut answered = 0;
    for _ in 0..10 {
        let r = fed
            .query("SELECT channel, AVG(trust) FROM experience GROUP BY channel ORDER BY channel")
            .await;
        assert!(r.is_ok(), "good query failed during flood: {r:?}");
        answered += 1;
    }
    let (mut flood_ok, mut held) = (0, 0);
    for f in flood {
        let (ok, in_flight) = f.await.unwrap();
        flood_ok += usize::from(ok);
        held += usize::from(in_flight);
    }
    assert_eq!(answered, 10);
    // Only the two allowed shapes can succeed, and not all at once: the attacker's parallel
    // heavy queries beyond its in-flight limit are refused (CXF-P003).
    assert!(flood_ok <= 80, "{flood_ok}");
    assert!(held > 0, "the in-flight limit never held the flood back");
    fed.fed.shutdown().await;
}

/// In k-only mode (all this build has), two allowed queries whose difference isolates one
/// person reveal that person's answer: the classic tracker attack. Differential privacy is
/// what closes it; this test documents the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_attack_recovers_one_person_under_k_anonymity_alone() {
    let fed = Fed::start_with(600, Duration::from_secs(20)).await;
    let pooled = fed.pooled();
    // Find a single person singled out by a combination of dimensions, inside the state with
    // the most people.
    let top = pooled
        .sql("SELECT state FROM experience WHERE agency = 'SSA' GROUP BY state ORDER BY COUNT(DISTINCT person_id) DESC, state LIMIT 1")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let top = cxfed::output::rows(&top).unwrap()[0][0]
        .as_str()
        .unwrap()
        .to_string();
    let target = pooled
        .sql(&format!(
            "SELECT state, age_band, channel, journey_stage, service, COUNT(*) AS n, SUM(trust) AS t \
             FROM experience WHERE agency = 'SSA' AND trust IS NOT NULL AND state = '{top}' \
             GROUP BY state, age_band, channel, journey_stage, service \
             HAVING COUNT(DISTINCT person_id) = 1 ORDER BY age_band, channel, journey_stage, service LIMIT 1"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let rows = cxfed::output::rows(&target).unwrap();
    let t = &rows[0];
    let s = |v: &Value| v.as_str().unwrap().replace('\'', "''");
    let base = format!(
        "agency = 'SSA' AND trust IS NOT NULL AND state = '{}'",
        s(&t[0])
    );
    let isolate = format!(
        "age_band = '{}' AND channel = '{}' AND journey_stage = '{}' AND service = '{}'",
        s(&t[1]),
        s(&t[2]),
        s(&t[3]),
        s(&t[4])
    );
    let q1 = format!("SELECT COUNT(*), SUM(trust) FROM experience WHERE {base}");
    let q2 =
        format!("SELECT COUNT(*), SUM(trust) FROM experience WHERE {base} AND NOT ({isolate})");
    let a = fed.query(&q1).await.unwrap();
    let b = fed.query(&q2).await.unwrap();
    assert_eq!(a.rows.len(), 1, "the state must pass k");
    assert_eq!(b.rows.len(), 1, "the state minus one person must pass k");
    let n = a.rows[0][0].as_i64().unwrap() - b.rows[0][0].as_i64().unwrap();
    let trust = a.rows[0][1].as_i64().unwrap() - b.rows[0][1].as_i64().unwrap();
    assert_eq!(n, t[5].as_i64().unwrap());
    assert_eq!(
        trust,
        t[6].as_i64().unwrap(),
        "the difference reveals the person's trust answers"
    );
    fed.fed.shutdown().await;
}

/// The per-query limits: a node whose time limit is shorter than a query refuses it with
/// CXF-P005, a node whose memory pool is too small for a query refuses it with CXF-P006, and
/// both keep answering what fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_memory_limits_refuse_with_their_codes() {
    let mut fed = Fed::start_with(3_000, Duration::from_secs(20)).await;
    let heavy = "SELECT e.state, e.age_band, e.channel, o.outcome, COUNT(DISTINCT e.person_id) AS people, \
                 STDDEV(o.processing_days) AS sd FROM experience e JOIN operational o ON e.case_id = o.case_id \
                 GROUP BY e.state, e.age_band, e.channel, o.outcome";
    let light = "SELECT COUNT(*) FROM experience";

    // Time: the steward's limit (live policy) is shorter than the query takes.
    let node = &fed.fed.nodes[0].node;
    let mut policy = (*node.policy()).clone();
    policy.query_timeout = Duration::from_micros(1);
    node.set_policy(policy);
    let r = fed.query(heavy).await;
    let Err(QueryFailure::Refused(b)) = &r else {
        panic!("{r:?}")
    };
    let ssa = b.nodes.iter().find(|n| n.agency == "SSA").unwrap();
    assert_eq!(ssa.status, NodeState::Refused);
    assert!(
        ssa.error.as_deref().unwrap().starts_with("CXF-P005"),
        "{ssa:?}"
    );

    // Memory: restart node 0 with a 64 KiB pool (the pool is sized at start).
    let first = fed.fed.nodes.remove(0);
    let mut config = first.node.config.clone();
    first.shutdown().await;
    config.policy.memory_limit_bytes = 64 * 1024;
    config.listen = "127.0.0.1:0".parse().unwrap();
    let small = cxfed::server::start(config, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", small.addr.port());
    let ask = |sql: &str| cxfed_protocol::wire::QueryRequest::new(sql).require_all(false);
    let r = cxfed::client::send_query(&fed.analyst, &url, &ask(heavy))
        .await
        .unwrap();
    let ssa = r.nodes.iter().find(|n| n.agency == "SSA").unwrap();
    assert!(!r.complete);
    assert_eq!(ssa.status, NodeState::Refused);
    assert!(
        ssa.error.as_deref().unwrap().starts_with("CXF-P006"),
        "{ssa:?}"
    );
    let r = cxfed::client::send_query(&fed.analyst, &url, &ask(light))
        .await
        .unwrap();
    assert!(r.rows[0][0].as_i64().unwrap() > 0);
    small.shutdown().await;
    fed.fed.shutdown().await;
}
