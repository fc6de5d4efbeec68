//! End-to-end: three real nodes on loopback with mTLS, certificates from `certs dev`, data from
//! `synth` + `ingest`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use cxfed::client::QueryFailure;
use cxfed_e2e::{AGENCIES, Case, Fed, assert_rows_match};
use cxfed_protocol::wire::{NodeState, PartialRequest};
use cxfed_protocol::{Identity, Role};

/// Query shapes whose federated answer must equal the pooled one.
const CASES: &[Case] = &[
    Case::new("COUNT(*) AS n, AVG(trust) AS t", &[]),
    Case::new("agency, COUNT(*) AS n, AVG(trust), AVG(satisfaction)", &["agency"]).order("agency"),
    Case::new("life_experience, journey_stage, channel, COUNT(DISTINCT person_id) AS people, AVG(trust), AVG(satisfaction)", &["life_experience", "journey_stage", "channel"])
        .order("life_experience, journey_stage, channel"),
    Case::new("journey_stage, channel, AVG(trust), AVG(satisfaction)", &["journey_stage", "channel"])
        .filter("life_experience = 'approaching_retirement'")
        .order("journey_stage, channel"),
    Case::new("state, COUNT(*), AVG(ease)", &["state"]).order("state"),
    Case::new("state, channel, COUNT(*) AS n, SUM(trust)", &["state", "channel"]).order("state, channel"),
    Case::new("age_band, STDDEV(trust), VARIANCE(satisfaction), STDDEV_POP(ease), VAR_POP(efficiency)", &["age_band"]).order("age_band"),
    Case::new("channel, AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END) AS trust_share", &["channel"]).order("channel"),
    Case::new("agency, COUNT(*) FILTER (WHERE trust >= 4) AS agree, COUNT(trust) AS answered", &["agency"]).order("agency"),
    Case::new("date_trunc('quarter', response_date) AS q, COUNT(*), AVG(trust)", &["date_trunc('quarter', response_date)"]).order("q"),
    Case::new("date_trunc('month', response_date) AS m, agency, AVG(satisfaction)", &["date_trunc('month', response_date)", "agency"])
        .order("m, agency"),
    Case::new("service, COUNT(*), AVG(employee_helpfulness)", &["service"]).order("service"),
    Case::new("channel, COUNT(*) AS n", &["channel"]).having("COUNT(*) > 500").order("n DESC, channel"),
    Case::new("journey_stage, AVG(trust) AS t", &["journey_stage"]).order("t DESC, journey_stage").limit(3),
    Case::new("outcome, COUNT(*), AVG(processing_days), STDDEV(processing_days)", &["outcome"]).on("operational").order("outcome"),
    Case::new("channel, AVG(wait_minutes), SUM(wait_minutes), COUNT(wait_minutes)", &["channel"]).on("operational").order("channel"),
    Case::new("first_contact_resolved, abandoned, COUNT(*)", &["first_contact_resolved", "abandoned"])
        .on("operational")
        .order("first_contact_resolved, abandoned"),
    Case::new("agency, life_experience, COUNT(DISTINCT person_id)", &["agency", "life_experience"]).on("operational").order("agency, life_experience"),
    Case::new("o.channel, AVG(o.wait_minutes), AVG(e.satisfaction), STDDEV(e.trust)", &["o.channel"]).joined().order("o.channel"),
    Case::new("o.outcome, e.journey_stage, COUNT(*), AVG(e.trust)", &["o.outcome", "e.journey_stage"])
        .joined()
        .order("o.outcome, e.journey_stage"),
    Case::new("e.agency, AVG(e.satisfaction) FILTER (WHERE o.wait_minutes > 60) AS slow, AVG(e.satisfaction) FILTER (WHERE o.wait_minutes <= 15) AS fast", &["e.agency"])
        .joined()
        .filter("o.wait_minutes IS NOT NULL")
        .order("e.agency"),
    Case::new("agency, ROUND(AVG(trust), 2) AS t, COUNT(*) * 2 AS doubled", &["agency"])
        .filter("response_date >= DATE '2025-04-01' AND channel IN ('phone', 'in_person')")
        .order("agency"),
    Case::new("age_band, AVG(trust)", &["age_band"]).filter("state = 'WY' AND channel = 'email'").order("age_band"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_answers_equal_pooled_answers() {
    let fed = Fed::start().await;
    let pooled = fed.pooled();
    let mut suppressed_total = 0;
    let mut cells_total = 0;
    let mut incomplete_total = 0;
    for case in CASES {
        let sql = case.sql();
        let got = fed
            .query(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(got.complete, "{sql}");
        assert_eq!(got.nodes.len(), 3);
        assert!(
            got.nodes.iter().all(|n| n.status == NodeState::Ok),
            "{sql}: {:?}",
            got.nodes
        );
        let reference = case.pooled_reference(&pooled).await;
        let (want, suppressed, cells) = (
            &reference.rows,
            reference.suppressed_groups,
            reference.withheld_cells,
        );
        assert_rows_match(&sql, &got.rows, want);
        assert_eq!(
            got.suppressed_groups, suppressed,
            "{sql}: suppressed groups"
        );
        assert_eq!(got.suppressed_cells, cells, "{sql}: withheld cells");
        assert_eq!(
            got.incomplete_cells, reference.incomplete_cells,
            "{sql}: cells NULL for a node's missing part"
        );
        suppressed_total += suppressed;
        cells_total += cells;
        incomplete_total += reference.incomplete_cells;
    }
    assert!(CASES.len() >= 20);
    assert!(suppressed_total > 0, "some case must exercise suppression");
    assert!(cells_total > 0, "some case must exercise cell suppression");
    assert!(
        incomplete_total > 0,
        "some case must exercise a cell NULL for a node's missing part"
    );
    // Any node can coordinate, with the same answer.
    let sql = CASES[2].sql();
    let a = fed.query_at(0, &sql, true).await.unwrap();
    let b = fed.query_at(2, &sql, true).await.unwrap();
    assert_rows_match("coordinator OPM vs SSA", &b.rows, &a.rows);
    fed.fed.shutdown().await;
}

/// (SQL, expected rule code).
const REFUSED: &[(&str, &str)] = &[
    ("SELECT * FROM experience", "CXF-Q005"),
    ("SELECT trust, satisfaction FROM experience", "CXF-Q005"),
    ("SELECT agency FROM experience WHERE trust = 1", "CXF-Q005"),
    (
        "SELECT person_id, AVG(trust) FROM experience GROUP BY person_id",
        "CXF-Q012",
    ),
    (
        "SELECT COUNT(*) FROM experience WHERE person_id = 'SSA-P-1'",
        "CXF-Q012",
    ),
    (
        "SELECT COUNT(*) FROM experience WHERE response_id LIKE 'SSA%'",
        "CXF-Q012",
    ),
    (
        "SELECT COUNT(*) FROM experience GROUP BY case_id",
        "CXF-Q012",
    ),
    (
        "SELECT COUNT(DISTINCT case_id) FROM operational",
        "CXF-Q012",
    ),
    (
        "SELECT SUM(CASE WHEN person_id = 'x' THEN trust END) FROM experience",
        "CXF-Q012",
    ),
    (
        "SELECT agency, COUNT(*) FROM experience GROUP BY agency ORDER BY MAX(person_id)",
        "CXF-Q012",
    ),
    (
        "SELECT COUNT(*) FROM experience WHERE CAST(person_id AS VARCHAR) = 'x'",
        "CXF-Q012",
    ),
    ("SELECT MAX(trust) FROM experience", "CXF-Q011"),
    (
        "SELECT agency, MIN(wait_minutes) FROM operational GROUP BY agency",
        "CXF-Q011",
    ),
    ("SELECT ARRAY_AGG(trust) FROM experience", "CXF-Q011"),
    // A k-only federation answers no percentile (a dp one does: tests/tests/percentiles.rs).
    ("SELECT MEDIAN(trust) FROM experience", "CXF-Q021"),
    ("SELECT APPROX_MEDIAN(trust) FROM experience", "CXF-Q011"),
    (
        "SELECT trust, COUNT(*) FROM experience GROUP BY trust",
        "CXF-Q013",
    ),
    (
        "SELECT wait_minutes, COUNT(*) FROM operational GROUP BY wait_minutes",
        "CXF-Q013",
    ),
    (
        "SELECT response_date, COUNT(*) FROM experience GROUP BY response_date",
        "CXF-Q013",
    ),
    (
        "SELECT date_trunc('day', response_date), COUNT(*) FROM experience GROUP BY 1",
        "CXF-Q013",
    ),
    (
        "SELECT agency, COUNT(*) OVER () FROM experience",
        "CXF-Q010",
    ),
    (
        "SELECT COUNT(*) FROM (SELECT * FROM experience) t",
        "CXF-Q007",
    ),
    (
        "WITH t AS (SELECT * FROM experience) SELECT COUNT(*) FROM t",
        "CXF-Q007",
    ),
    (
        "SELECT COUNT(*) FROM experience WHERE trust > (SELECT AVG(trust) FROM experience)",
        "CXF-Q007",
    ),
    (
        "SELECT COUNT(*) FROM experience WHERE case_id IN (SELECT case_id FROM operational)",
        "CXF-Q007",
    ),
    (
        "SELECT COUNT(*) FROM experience UNION ALL SELECT COUNT(*) FROM operational",
        "CXF-Q008",
    ),
    (
        "SELECT COUNT(*) FROM experience a JOIN experience b ON a.case_id = b.case_id",
        "CXF-Q009",
    ),
    (
        "SELECT COUNT(*) FROM experience e JOIN operational o ON e.agency = o.agency",
        "CXF-Q009",
    ),
    (
        "SELECT COUNT(*) FROM experience e LEFT JOIN operational o ON e.case_id = o.case_id",
        "CXF-Q009",
    ),
    ("DROP TABLE experience", "CXF-Q003"),
    (
        "INSERT INTO experience SELECT * FROM experience",
        "CXF-Q003",
    ),
    ("COPY experience TO '/tmp/x.csv'", "CXF-Q003"),
    ("SET datafusion.execution.batch_size = 1", "CXF-Q003"),
    (
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "CXF-Q003",
    ),
    (
        "SELECT COUNT(*) FROM experience; DROP TABLE experience",
        "CXF-Q002",
    ),
    ("SELEC COUNT(*) FROM experience", "CXF-Q001"),
    ("SELECT COUNT(*) FROM secrets", "CXF-Q006"),
    ("SELECT COUNT(DISTINCT agency) FROM experience", "CXF-Q015"),
    ("SELECT DISTINCT agency FROM experience", "CXF-Q015"),
    (
        "SELECT agency, COUNT(*) FROM experience GROUP BY ROLLUP(agency)",
        "CXF-Q017",
    ),
    ("SELECT 1", "CXF-Q006"),
    ("SELECT COUNT(nosuch) FROM experience", "CXF-Q004"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_hostile_queries_at_coordinator_and_node() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    assert!(REFUSED.len() >= 30);
    // A node certificate lets the test act as a hostile coordinator sending bad SQL straight
    // to another node's /v1/partial.
    let hostile = fed.client("CMS", "node");
    let partial_url = format!("{}/v1/partial", fed.fed.url(0));
    for (sql, code) in REFUSED {
        match fed.query(sql).await {
            Err(QueryFailure::Refused(body)) => {
                assert_eq!(&body.code, code, "{sql}: {}", body.message)
            }
            other => panic!("{sql}: expected refusal {code}, got {other:?}"),
        }
        let req = fed.signed_partial("hostile", sql, None);
        let resp = hostile.post(&partial_url).json(&req).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{sql}: node must refuse");
        let body: cxfed_protocol::wire::ErrorBody = resp.json().await.unwrap();
        assert_eq!(&body.code, code, "{sql}: node-side rule");
    }
    // The node is still serving, and every refusal is in its audit log.
    assert!(fed.query("SELECT COUNT(*) FROM experience").await.is_ok());
    let entries = fed.audit_log(0).await;
    let refused = entries
        .iter()
        .filter(|e| e.decision == Some(cxfed::audit::Decision::Refused) && e.query_id == "hostile")
        .count();
    assert_eq!(refused, REFUSED.len());
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_names_rule_and_position() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let Err(QueryFailure::Refused(body)) = fed
        .query("SELECT agency, COUNT(*)\nFROM experience\nWHERE person_id = 'p' GROUP BY agency")
        .await
    else {
        panic!("must be refused")
    };
    assert_eq!(
        (body.code.as_str(), body.kind.as_str()),
        ("CXF-Q012", "identifier-not-allowed")
    );
    assert_eq!((body.line, body.column), (Some(3), Some(7)));
    assert!(body.query_id.is_some());
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_role_refusals() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let url = fed.fed.url(1);
    let ca_pem = std::fs::read(fed.fed.certs.join("ca.pem")).unwrap();
    let ca = reqwest::Certificate::from_pem(&ca_pem).unwrap();

    // No client certificate: the handshake fails.
    let anonymous = cxfed::client::http_client_without_identity(
        &fed.fed.certs.join("ca.pem"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        anonymous
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .is_err(),
        "refuses_client_without_certificate"
    );
    drop(ca);

    // A certificate from a foreign CA, with a valid-looking identity.
    let (foreign_ca, foreign_key) = cxfed::certs::new_ca("cx-demo").unwrap();
    let id = Identity::new("cx-demo", "SSA", Role::Analyst, "mallory").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = cxfed::certs::issue(
        &foreign_ca,
        &foreign_key,
        &id,
        &[],
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    let client = client_with(&fed, &cert, &key);
    assert!(
        client.get(format!("{url}/v1/health")).send().await.is_err(),
        "refuses_client_from_foreign_ca"
    );

    // Our CA, but expired.
    let real_ca = std::fs::read_to_string(fed.fed.certs.join("ca.pem")).unwrap();
    let real_key = std::fs::read_to_string(fed.fed.certs.join("ca.key")).unwrap();
    let (cert, key) = cxfed::certs::issue(
        &real_ca,
        &real_key,
        &id,
        &[],
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    )
    .unwrap();
    assert!(
        client_with(&fed, &cert, &key)
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .is_err(),
        "refuses_expired_certificate"
    );

    // Our CA, another federation.
    let other = Identity::new("other-fed", "SSA", Role::Analyst, "eve").unwrap();
    let (cert, key) = cxfed::certs::issue(
        &real_ca,
        &real_key,
        &other,
        &[],
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    assert!(
        client_with(&fed, &cert, &key)
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .is_err(),
        "refuses_other_federation"
    );

    // Right CA, wrong role for the endpoint: 403.
    let analyst = fed.client("SSA", "analyst");
    let req = PartialRequest {
        protocol: 1,
        query_id: "q".into(),
        sql: "SELECT COUNT(*) FROM experience".into(),
        analyst: "x".into(),
        ..Default::default()
    };
    let resp = analyst
        .post(format!("{url}/v1/partial"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "refuses_analyst_on_partial");
    let steward = fed.client("CMS", "steward");
    let resp = steward
        .post(format!("{url}/v1/query"))
        .json(&serde_json::json!({"sql": "SELECT COUNT(*) FROM experience"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "refuses_steward_on_query");
    let resp = analyst.get(format!("{url}/v1/audit")).send().await.unwrap();
    assert_eq!(resp.status(), 403, "refuses_analyst_on_audit");
    // Garbage body: 400 with a clear message, node keeps serving.
    let resp = analyst
        .post(format!("{url}/v1/query"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(
        fed.query_at(1, "SELECT COUNT(*) FROM experience", true)
            .await
            .is_ok()
    );
    fed.fed.shutdown().await;
}

fn client_with(fed: &Fed, cert: &str, key: &str) -> reqwest::Client {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("c.pem"), cert).unwrap();
    std::fs::write(dir.join("c.key"), key).unwrap();
    let files = cxfed::tls::TlsFiles {
        ca: fed.fed.certs.join("ca.pem"),
        cert: dir.join("c.pem"),
        key: dir.join("c.key"),
        crl: Vec::new(),
    };
    cxfed::client::http_client(&files, Duration::from_secs(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_is_named_and_partial_answers_are_marked() {
    let mut fed = Fed::start_with(300, Duration::from_secs(3)).await;
    let sql = "SELECT agency, COUNT(*) FROM experience GROUP BY agency ORDER BY agency";
    let full = fed.query(sql).await.unwrap();
    assert_eq!(full.rows.len(), 3);
    // Kill OPM as if the process died.
    let opm = fed.fed.nodes.pop().unwrap();
    opm.kill();
    match fed.query(sql).await {
        Err(QueryFailure::Refused(body)) => {
            assert_eq!(body.code, "CXF-A502");
            let opm = body.nodes.iter().find(|n| n.agency == "OPM").unwrap();
            assert_eq!(opm.status, NodeState::Unreachable);
            assert!(opm.error.is_some());
        }
        other => panic!("require_all must fail: {other:?}"),
    }
    let partial = fed.query_at(0, sql, false).await.unwrap();
    assert!(!partial.complete);
    assert_eq!(partial.rows.len(), 2);
    let without_opm: Vec<_> = full
        .rows
        .iter()
        .filter(|r| r[0] != "OPM")
        .cloned()
        .collect();
    assert_eq!(partial.rows, without_opm);
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_node_times_out() {
    // A "node" that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut fed =
        cxfed::demo::start_federation(dir.path(), &AGENCIES[..2], 200, 10, Duration::from_secs(2))
            .await
            .unwrap();
    // Point SSA at the hanging peer by restarting it with one more peer.
    let first = fed.nodes.remove(0);
    let mut config = first.node.config.clone();
    first.shutdown().await;
    config.peers.push(cxfed::config::Peer {
        agency: "OPM".into(),
        url: format!("https://127.0.0.1:{port}"),
    });
    config.listen = "127.0.0.1:0".parse().unwrap();
    let node = cxfed::server::start(config, None).await.unwrap();
    let client =
        cxfed::client::AnalystClient::new(&fed.tls("SSA", "analyst"), Duration::from_secs(30))
            .unwrap();
    let url = format!("https://127.0.0.1:{}", node.addr.port());
    let started = std::time::Instant::now();
    let req = cxfed_protocol::wire::QueryRequest::new("SELECT COUNT(*) FROM experience")
        .require_all(false);
    let resp = cxfed::client::send_query(&client, &url, &req)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    let opm = resp.nodes.iter().find(|n| n.agency == "OPM").unwrap();
    assert_eq!(opm.status, NodeState::Unreachable);
    assert!(!resp.complete);
    node.shutdown().await;
    fed.shutdown().await;
    hang.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_errors_leave_data_untouched_and_new_data_is_served_without_restart() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let sql = "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency ORDER BY agency";
    let before = fed.query(sql).await.unwrap();
    let data = fed.data_dir("CMS");
    let listing = |d: &std::path::Path| {
        let mut v: Vec<_> = walk(d);
        v.sort();
        v
    };
    let files_before = listing(&data);

    // A malformed file: bad rows on lines 3 and 5.
    let good = std::fs::read_to_string(fed.dir.path().join("synth/cms/experience.csv")).unwrap();
    let mut lines: Vec<String> = good.lines().take(8).map(String::from).collect();
    lines[2] = lines[2].replacen(",CMS,", ",cms!,", 1);
    let cols: Vec<&str> = lines[4].split(',').collect();
    let n = cols.len();
    let mut bad5: Vec<String> = cols.iter().map(|s| s.to_string()).collect();
    bad5[n - 7] = "9".into(); // trust
    lines[4] = bad5.join(",");
    let bad = fed.dir.path().join("bad.csv");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let err = cxfed::ingest::ingest(&data, cxfed_queries::schema::Table::Experience, &bad, false)
        .unwrap_err()
        .to_string();
    let bad_s = bad.display().to_string();
    assert!(err.contains(&format!("{bad_s}:3:4:")), "{err}");
    assert!(err.contains(&format!("{bad_s}:5:{}:", n - 6)), "{err}");
    assert_eq!(listing(&data), files_before, "nothing written");

    // A good file ingested while the node serves is visible to the next query.
    let extra = fed.dir.path().join("extra");
    cxfed::synth::write(
        &cxfed::synth::SynthOptions {
            agency: "CMS".into(),
            people: 50,
            seed: 99,
        },
        &extra,
    )
    .unwrap();
    let added = std::fs::read_to_string(extra.join("experience.csv"))
        .unwrap()
        .lines()
        .count() as i64
        - 1;
    cxfed::ingest::ingest(
        &data,
        cxfed_queries::schema::Table::Experience,
        &extra.join("experience.csv"),
        false,
    )
    .unwrap();
    let after = fed.query(sql).await.unwrap();
    let cms = |r: &cxfed_protocol::wire::QueryResponse| {
        r.rows.iter().find(|row| row[0] == "CMS").unwrap()[1]
            .as_i64()
            .unwrap()
    };
    assert_eq!(cms(&after), cms(&before) + added);
    fed.fed.shutdown().await;
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != "audit.jsonl") {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_refuses_a_peer_presenting_another_agencys_certificate() {
    let mut fed = Fed::start_with(200, Duration::from_secs(5)).await;
    // Restart SSA with its peers' URLs swapped: "CMS" now points at OPM's node and vice versa.
    let ssa = fed.fed.nodes.remove(0);
    let mut config = ssa.node.config.clone();
    ssa.shutdown().await;
    let urls: Vec<String> = config.peers.iter().map(|p| p.url.clone()).collect();
    config.peers[0].url = urls[1].clone();
    config.peers[1].url = urls[0].clone();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let node = cxfed::server::start(config, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", node.addr.port());
    let req = cxfed_protocol::wire::QueryRequest::new("SELECT COUNT(*) FROM experience")
        .require_all(false);
    let resp = cxfed::client::send_query(&fed.analyst, &url, &req)
        .await
        .unwrap();
    for agency in ["CMS", "OPM"] {
        let n = resp.nodes.iter().find(|n| n.agency == agency).unwrap();
        assert_eq!(n.status, NodeState::Unreachable, "{n:?}");
    }
    assert!(!resp.complete);
    node.shutdown().await;
    fed.fed.shutdown().await;
}

/// A row some node returned nothing for names that node, exactly as the pooled data says:
/// the nodes holding fewer than k of the group's people (none included) — never silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_a_nodes_part_name_it_as_the_pooled_data_says() {
    use std::collections::{BTreeMap, BTreeSet};
    let fed = Fed::start().await;
    let sql = "SELECT life_experience, channel, COUNT(*) AS n, AVG(trust) AS t, COUNT(trust) AS nt \
               FROM experience GROUP BY life_experience, channel ORDER BY life_experience, channel";
    let got = fed.query(sql).await.unwrap();
    // People per (group, agency), from the pooled data.
    let pooled = fed.pooled();
    let batches = pooled
        .sql(
            "SELECT life_experience, channel, agency, COUNT(DISTINCT person_id) AS p \
             FROM experience GROUP BY 1, 2, 3",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut people: BTreeMap<(String, String), BTreeMap<String, i64>> = BTreeMap::new();
    for row in cxfed::output::rows(&batches).unwrap() {
        let text = |i: usize| row[i].as_str().unwrap().to_string();
        people
            .entry((text(0), text(1)))
            .or_default()
            .insert(text(2), row[3].as_i64().unwrap());
    }
    let mut marked = 0;
    for (r, row) in got.rows.iter().enumerate() {
        let key = (
            row[0].as_str().unwrap().to_string(),
            row[1].as_str().unwrap().to_string(),
        );
        let want: BTreeSet<&str> = AGENCIES
            .iter()
            .copied()
            .filter(|a| people[&key].get(*a).copied().unwrap_or(0) < cxfed_e2e::K as i64)
            .collect();
        let missing: BTreeSet<&str> = got
            .missing_parts
            .get(r)
            .map(|m| m.iter().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(missing, want, "{key:?}: {people:?}");
        marked += usize::from(!want.is_empty());
    }
    assert!(marked > 0, "some released row must lack a node's part");
    assert_eq!(got.incomplete_groups, marked as u64);
    // Every output says so: the table and CSV name the missing nodes per row.
    let table = cxfed::output::render(&got, cxfed::output::Format::Table);
    assert!(table.contains("missing parts") && table.contains("without every node's part"));
    let csv = cxfed::output::render(&got, cxfed::output::Format::Csv);
    assert!(
        csv.lines().next().unwrap().ends_with(",missing_parts"),
        "{csv}"
    );
    fed.fed.shutdown().await;
}
