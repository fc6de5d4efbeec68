//! End-to-end: an ε no node can spend (0, 1e-9, negative, NaN, ±∞) is refused with CXF-A400
//! `bad-epsilon`, naming ε, the value and the range accepted — at the analyst's client, at
//! `/v1/query` (a signed request that skipped the client's check), at `/v1/partial` (a hostile
//! coordinator forwarding a signed NaN) and by `report a11-quarterly` — before any budget is
//! charged, and every node's refusal is in its audit log.
#![allow(clippy::unwrap_used, missing_docs)]

use cxfed::client::QueryFailure;
use cxfed::policy::DpSettings;
use cxfed_e2e::{Fed, signed_partial};
use cxfed_protocol::wire::{ErrorBody, QueryRequest};

const SQL: &str = "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency";

/// ε values nobody can spend, as `cxfed query --epsilon` would read them.
const BAD: [f64; 6] = [0.0, 1e-9, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY];

fn assert_bad_epsilon(body: &ErrorBody, value: f64, context: &str) {
    assert_eq!(
        (body.code.as_str(), body.kind.as_str()),
        ("CXF-A400", "bad-epsilon"),
        "{context}: {body:?}"
    );
    assert!(
        body.message.starts_with(&format!("epsilon (ε) = {value} ")),
        "{context}: the message names ε and the value: {}",
        body.message
    );
    assert!(
        body.message.contains("from 0.001 up"),
        "{context}: the message names the range: {}",
        body.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epsilon_no_node_can_spend_is_refused_everywhere_and_charges_nothing() {
    let fed = Fed::start_dp(
        300,
        DpSettings {
            budget_epsilon: 10.0,
            ..DpSettings::DEFAULT
        },
    )
    .await;
    let url = fed.fed.url(0);

    // 1. The analyst's client (what `cxfed query`, the console and the report call).
    fed.query(SQL).await.unwrap();
    for eps in BAD {
        let r = cxfed::client::send_query(
            &fed.analyst,
            &url,
            &QueryRequest::new(SQL).epsilon(Some(eps)),
        )
        .await;
        let Err(QueryFailure::Refused(body)) = r else {
            panic!("ε = {eps} must be refused: {r:?}")
        };
        assert_bad_epsilon(&body, eps, "client");
    }
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(fed.used_by_ssa_analyst(i).await);
    }
    assert!(
        before.iter().all(|u| *u > 0.0),
        "the good queries charged: {before:?}"
    );

    // 2. `/v1/query` itself, for a signed request that skipped the client's check (NaN and
    //    ±∞ travel as strings, so they are not read as "no ε").
    for eps in BAD {
        let req = QueryRequest::new(SQL)
            .epsilon(Some(eps))
            .sign(&fed.analyst.signer, "SSA")
            .unwrap();
        let resp = fed
            .analyst
            .http
            .post(format!("{url}/v1/query"))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "ε = {eps}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert_bad_epsilon(&body, eps, "/v1/query");
        assert!(
            body.message.contains("up to 1 "),
            "the node's maximum: {}",
            body.message
        );
    }

    // 3. `/v1/partial`: a hostile coordinator (CMS's node certificate) forwarding the
    //    analyst's signed NaN; the node re-checks what the signature covers.
    let hostile = fed.client("CMS", "node");
    for (i, eps) in BAD.into_iter().enumerate() {
        let req = signed_partial(&fed.analyst, "CMS", &format!("bad-eps-{i}"), SQL, Some(eps));
        let resp = hostile
            .post(format!("{url}/v1/partial"))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "ε = {eps}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert_bad_epsilon(&body, eps, "/v1/partial");
    }

    // 4. The A-11 report refuses it before asking anything.
    let r = cxfed::report::a11_quarterly(&fed.analyst, &url, 2025, 3, Some(f64::NAN)).await;
    let Err(QueryFailure::Refused(body)) = r else {
        panic!("the report must be refused: {r:?}")
    };
    assert_bad_epsilon(&body, f64::NAN, "report a11-quarterly");

    // Nothing was charged anywhere.
    let mut after = Vec::new();
    for i in 0..3 {
        after.push(fed.used_by_ssa_analyst(i).await);
    }
    assert_eq!(before, after, "a refused ε charges no budget");

    // Every refusal that reached SSA's node is in its log, refused with the code.
    let log = fed.audit_log(0).await;
    let refused: Vec<_> = log
        .iter()
        .filter(|e| e.code.as_deref() == Some("CXF-A400"))
        .filter(|e| matches!(e.decision, Some(cxfed::audit::Decision::Refused)))
        .collect();
    let at = |endpoint: &str| refused.iter().filter(|e| e.endpoint == endpoint).count();
    assert_eq!(at("/v1/query"), BAD.len(), "{refused:#?}");
    assert_eq!(at("/v1/partial"), BAD.len(), "{refused:#?}");
    assert!(
        refused
            .iter()
            .any(|e| e.requested_epsilon.is_some_and(f64::is_nan)),
        "the audited ε is the NaN received, not 'none'"
    );
    // The node still serves.
    fed.query(SQL).await.unwrap();
    fed.fed.shutdown().await;
}
