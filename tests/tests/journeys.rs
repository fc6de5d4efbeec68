//! End-to-end: journey queries, the same people at two agencies. Three real mTLS nodes (SSA,
//! CMS, OPM) on linked synthetic populations with a shared linkage key; the answers are checked
//! against an oracle that joins the agencies' own tables on the clear SSNs of the synth files:
//! exact in `k-only` mode (k applied to the intersection), within the stated noise in `dp`
//! mode; malformed journeys are refused and the nodes keep serving; no SSN appears in any
//! node's audit log.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use cxfed::client::QueryFailure;
use cxfed_e2e::{Fed, K, agency_context};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Float64Type;
use serde_json::Value;

/// Each person of an agency's side: (SSN, group, value), from the agency's own tables and
/// its linkage file, one record per person as the journey protocol defines it (the smallest
/// group value of the person's rows, the mean of their values).
async fn side(
    fed: &Fed,
    agency: &str,
    sql: &str,
) -> HashMap<String, (Option<String>, Option<f64>)> {
    let ssn: HashMap<String, String> = {
        let path = fed
            .dir
            .path()
            .join("synth")
            .join(agency)
            .join("linkage.csv");
        let mut r = csv::Reader::from_path(path).unwrap();
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                (rec[0].to_string(), rec[1].replace('-', ""))
            })
            .collect()
    };
    let ctx = agency_context(fed.dir.path(), agency);
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = HashMap::new();
    for b in &batches {
        let cast = |c: &dyn Array| {
            datafusion::arrow::compute::cast(c, &datafusion::arrow::datatypes::DataType::Utf8)
                .unwrap()
        };
        let persons = cast(b.column(0));
        let persons = persons.as_string::<i32>();
        let groups = b.column_by_name("g").map(|g| cast(g.as_ref()));
        let values = b.column_by_name("v").map(|v| {
            datafusion::arrow::compute::cast(v, &datafusion::arrow::datatypes::DataType::Float64)
                .unwrap()
        });
        for r in 0..b.num_rows() {
            let Some(s) = ssn.get(persons.value(r)) else {
                continue;
            };
            let g = groups
                .as_ref()
                .and_then(|g| (!g.is_null(r)).then(|| g.as_string::<i32>().value(r).to_string()));
            let v = values.as_ref().and_then(|v| {
                let v = v.as_primitive::<Float64Type>();
                (!v.is_null(r)).then(|| v.value(r))
            });
            out.insert(s.clone(), (g, v));
        }
    }
    out
}

/// The oracle's cells: (value-side group, membership-side group) → (people, sum of values).
/// `left`: people at A but not at B land in the membership side's NULL group.
fn join(
    a: &HashMap<String, (Option<String>, Option<f64>)>,
    b: &HashMap<String, (Option<String>, Option<f64>)>,
    left: bool,
    with_measure: bool,
) -> HashMap<(Option<String>, Option<String>), (u64, f64)> {
    let mut cells: HashMap<(Option<String>, Option<String>), (u64, f64)> = HashMap::new();
    for (ssn, (ga, v)) in a {
        if with_measure && v.is_none() {
            continue;
        }
        let gb = match b.get(ssn) {
            Some((gb, _)) => gb.clone(),
            None if left => None,
            None => continue,
        };
        let e = cells.entry((ga.clone(), gb)).or_default();
        e.0 += 1;
        e.1 += v.unwrap_or(0.0).clamp(1.0, 5.0);
    }
    cells
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

const INNER: &str = "SELECT a.channel AS channel, COUNT(*) AS people, AVG(a.trust) AS trust \
    FROM ssa.experience a JOIN cms.operational b USING (person_id) \
    WHERE a.life_experience = 'approaching_retirement' GROUP BY a.channel";
const INNER_A: &str = "SELECT person_id, MIN(channel) AS g, AVG(CAST(trust AS DOUBLE)) AS v \
    FROM experience WHERE life_experience = 'approaching_retirement' GROUP BY person_id";
const ANY_B: &str = "SELECT person_id FROM operational GROUP BY person_id";

const LEFT: &str = "SELECT b.outcome AS outcome, COUNT(*) AS people, AVG(a.trust) AS trust \
    FROM ssa.experience a LEFT JOIN cms.operational b USING (person_id) \
    WHERE a.life_experience = 'approaching_retirement' \
    AND b.life_experience = 'approaching_retirement' GROUP BY b.outcome";
const LEFT_A: &str = "SELECT person_id, AVG(CAST(trust AS DOUBLE)) AS v FROM experience \
    WHERE life_experience = 'approaching_retirement' GROUP BY person_id";
const LEFT_B: &str = "SELECT person_id, MIN(outcome) AS g FROM operational \
    WHERE life_experience = 'approaching_retirement' GROUP BY person_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_match_a_clear_join_exactly_in_k_only_mode() {
    let fed = Fed::start_journeys(1_500, 0.5, None).await;

    // INNER JOIN grouped by the value side, asked at the value node itself.
    let got = fed.query_at(0, INNER, true).await.unwrap();
    assert_eq!(got.privacy, "k-only");
    assert_eq!(got.columns, ["channel", "people", "trust"]);
    let a = side(&fed, "SSA", INNER_A).await;
    let b = side(&fed, "CMS", ANY_B).await;
    let want = join(&a, &b, false, true);
    let shared: u64 = want.values().map(|c| c.0).sum();
    assert!(
        shared > 100,
        "the synthetic overlap gives a real intersection: {shared}"
    );
    let mut released = 0;
    for row in &got.rows {
        let key = (text(&row[0]), None);
        let (n, s) = want.get(&key).copied().unwrap_or_default();
        assert!(n >= K, "{key:?}: a cell of {n} < k people was released");
        assert_eq!(row[1].as_u64(), Some(n), "{key:?} people");
        let t = row[2].as_f64().unwrap();
        // Values travel in thousandths (rounded at random): exact to that.
        assert!(
            (t - s / n as f64).abs() < 2e-3,
            "{key:?}: {t} vs {}",
            s / n as f64
        );
        released += 1;
    }
    let withheld = want.values().filter(|c| c.0 < K).count() as u64;
    assert_eq!(released + withheld as usize, want.len());
    assert!(got.suppressed_groups >= withheld, "{got:?}");
    assert!(released >= 3, "{got:?}");

    // LEFT JOIN grouped by the membership side, asked at a third node (OPM): the people at SSA
    // and not at CMS (on this journey) read NULL.
    let got = fed.query_at(2, LEFT, true).await.unwrap();
    let a = side(&fed, "SSA", LEFT_A).await;
    let b = side(&fed, "CMS", LEFT_B).await;
    let want = join(&a, &b, true, true);
    let nulls = want.get(&(None, None)).map(|c| c.0).unwrap_or_default();
    assert!(nulls > 100, "people at SSA only: {nulls}");
    let mut seen_null = false;
    for row in &got.rows {
        let key = (None, text(&row[0]));
        let (n, s) = want.get(&key).copied().unwrap_or_default();
        assert_eq!(row[1].as_u64(), Some(n), "{key:?} people");
        let t = row[2].as_f64().unwrap();
        assert!(
            (t - s / n as f64).abs() < 2e-3,
            "{key:?}: {t} vs {}",
            s / n as f64
        );
        seen_null |= key.1.is_none();
    }
    assert!(seen_null, "{got:?}");

    // Refusals name the rule; the nodes keep serving.
    for (sql, code) in [
        (
            "SELECT a.channel, COUNT(*) FROM ssa.experience a JOIN cms.operational b USING (person_id) WHERE a.channel = b.channel GROUP BY a.channel",
            "CXF-Q022",
        ),
        (
            "SELECT a.channel, COUNT(*) FROM ssa.experience a RIGHT JOIN cms.operational b USING (person_id) GROUP BY a.channel",
            "CXF-Q022",
        ),
        (
            "SELECT a.channel, COUNT(*) FROM ssa.experience a JOIN fema.operational b USING (person_id) GROUP BY a.channel",
            "CXF-Q022",
        ),
    ] {
        match fed.query_at(1, sql, true).await {
            Err(QueryFailure::Refused(b)) => assert_eq!(b.code, code, "{sql}: {b:?}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
    assert!(fed.query_at(1, INNER, true).await.is_ok());

    // A hostile coordinator (SSA's node certificate) sending CMS malformed or out-of-order
    // steps is refused with a clear error each time, and CMS keeps serving.
    let hostile = fed.client("SSA", "node");
    let cms = format!("{}/v1/journey", fed.fed.url(1));
    let step = |query_id: &str, step: serde_json::Value| {
        serde_json::json!({
            "protocol": cxfed_protocol::wire::PROTOCOL_VERSION,
            "query_id": query_id,
            "sql": INNER,
            "analyst": "spiffe://cx-demo/SSA/analyst/ssa-analyst",
            "step": step,
        })
    };
    let empty_values =
        serde_json::json!({"a_groups": 1, "b_groups": 1, "members": [], "records": []});
    for (body, want, says) in [
        (b"{not json".to_vec(), 400, "request body"),
        (
            serde_json::to_vec(&step("never-started", serde_json::json!({"step": "sums", "values": empty_values}))).unwrap(),
            400,
            "no journey run",
        ),
        (
            serde_json::to_vec(&step("unsigned", serde_json::json!({"step": "values", "result_key": "00".repeat(32), "members": {"b_groups": 1, "members": []}}))).unwrap(),
            401,
            "",
        ),
        (
            serde_json::to_vec(&step("bad-step", serde_json::json!({"step": "unmask"}))).unwrap(),
            400,
            "",
        ),
    ] {
        let resp = hostile
            .post(&cms)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{says}");
        let err: cxfed_protocol::wire::ErrorBody = resp.json().await.unwrap();
        assert!(err.message.contains(says), "{err:?}");
    }
    assert!(fed.query_at(1, INNER, true).await.is_ok(), "CMS serves on");

    // Both nodes logged their step with the analyst's signature and the digest of what they
    // sent; no SSN appears in any node's log.
    let ssa = fed.audit_log(0).await;
    let cms = fed.audit_log(1).await;
    assert!(
        ssa.iter()
            .any(|e| e.endpoint == "/v1/journey" && e.digest.is_some() && e.request.is_some())
    );
    assert!(
        cms.iter()
            .any(|e| e.endpoint == "/v1/journey" && e.digest.is_some() && e.request.is_some())
    );
    assert!(cms.iter().any(|e| e.endpoint == "/v1/journey/members"));
    let ssns: Vec<String> = a.keys().take(200).cloned().collect();
    for i in 0..3 {
        let log = String::from_utf8(fed.audit_bytes(i).await).unwrap();
        for s in &ssns {
            assert!(!log.contains(s.as_str()), "an SSN in node {i}'s log");
        }
    }
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_in_dp_mode_are_within_their_noise_and_charge_both_nodes() {
    let fed = Fed::start_journeys(1_500, 0.5, Some(cxfed::policy::DpSettings::DEFAULT)).await;
    // Both nodes spend the same ε, so the analyst names it, at most each node's maximum.
    for epsilon in [None, Some(2.0)] {
        let req = cxfed_protocol::wire::QueryRequest::new(INNER).epsilon(epsilon);
        match cxfed::client::send_query(&fed.analyst, &fed.fed.url(0), &req).await {
            Err(QueryFailure::Refused(b)) => {
                assert_eq!(b.code, "CXF-Q022", "{b:?}");
                assert!(b.message.contains('ε'), "{b:?}");
            }
            other => panic!("{epsilon:?}: {other:?}"),
        }
    }
    let req = cxfed_protocol::wire::QueryRequest::new(INNER).epsilon(Some(1.0));
    let got = cxfed::client::send_query(&fed.analyst, &fed.fed.url(0), &req)
        .await
        .unwrap();
    assert_eq!(got.privacy, "dp");
    let a = side(&fed, "SSA", INNER_A).await;
    let b = side(&fed, "CMS", ANY_B).await;
    let want = join(&a, &b, false, true);
    // Every cell of the public vocabulary is released, noisy even where nobody is.
    assert!(
        got.rows.len() >= cxfed_queries::schema::CHANNELS.len(),
        "{got:?}"
    );
    let mut outside = 0;
    for (row, ci) in got.rows.iter().zip(&got.ci95) {
        let key = (text(&row[0]), None);
        let (n, _) = want.get(&key).copied().unwrap_or_default();
        let half = ci[1].unwrap();
        assert!(half > 0.0);
        let people = row[1].as_f64().unwrap();
        // 95% intervals: allow about one cell in twenty outside, none far outside.
        if (people - n as f64).abs() > half {
            outside += 1;
        }
        assert!(
            (people - n as f64).abs() < 3.0 * half,
            "{key:?}: {people} vs {n} ± {half}"
        );
    }
    assert!(
        outside <= 2,
        "{outside} of {} counts outside their 95% interval",
        got.rows.len()
    );
    // An average whose interval is wider than the 1–5 range is marked, as in any dp answer.
    assert_eq!(got.formats.len(), got.columns.len());
    for (r, ci) in got.ci95.iter().enumerate() {
        let wide = ci[2].is_some_and(|c| 2.0 * c > 4.0);
        let marked = got
            .not_informative
            .get(r)
            .is_some_and(|cols| cols.iter().any(|c| c == "trust"));
        assert_eq!(wide, marked, "row {r}: {:?} {:?}", got.rows[r], ci);
    }
    for status in &got.nodes {
        assert!(status.epsilon.is_some_and(|e| e > 0.0), "{status:?}");
    }
    // Each node charged its own ledger for the analyst.
    for i in [0, 1] {
        let log = fed.audit_log(i).await;
        assert!(
            log.iter()
                .any(|e| e.endpoint == "/v1/journey" && e.epsilon_spent.is_some_and(|x| x > 0.0)),
            "node {i}"
        );
    }
    fed.fed.shutdown().await;
}
