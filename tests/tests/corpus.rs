//! End-to-end over the query corpora (`queries/tests/corpus/`): every hostile query is refused
//! with its rule code by the coordinator *and* by a node receiving it straight from a hostile
//! coordinator; every allowed query's federated answer equals the pooled DataFusion answer
//! (k = 1, so suppression removes nothing and the comparison is exact).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use cxfed::client::{QueryFailure, send_query};
use cxfed_e2e::{AGENCIES, assert_rows_match, pooled_context, signed_partial};
use cxfed_protocol::wire::{ErrorBody, QueryRequest};

fn blocks(text: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let mut code = None;
    let mut sql: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("-- expect: ") {
            code = Some(c.trim().to_string());
        } else if line == ";;" {
            out.push((code.take(), sql.join("\n")));
            sql.clear();
        } else if sql.is_empty() && (line.starts_with("-- ") || line.is_empty()) {
            continue;
        } else {
            sql.push(line);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpora_hold_at_coordinator_and_node() {
    let dir = tempfile::tempdir().unwrap();
    let fed = cxfed::demo::start_federation(dir.path(), &AGENCIES, 300, 1, Duration::from_secs(20))
        .await
        .unwrap();
    // The rate limit is not what this test is about: the corpus is 369 queries.
    for n in &fed.nodes {
        let mut policy = (*n.node.policy()).clone();
        policy.rate_limit_per_minute = 0;
        n.node.set_policy(policy);
    }
    let analysts: Vec<cxfed::client::AnalystClient> = AGENCIES
        .iter()
        .map(|a| {
            cxfed::client::AnalystClient::new(&fed.tls(a, "analyst"), Duration::from_secs(60))
                .unwrap()
        })
        .collect();
    let hostile =
        cxfed::client::http_client(&fed.tls("CMS", "node"), Duration::from_secs(60)).unwrap();
    let coordinator = fed.url(0);
    let node = format!("{}/v1/partial", fed.url(2));

    let refused = blocks(include_str!("../../queries/tests/corpus/refused.sql"));
    let mut wrong = Vec::new();
    for (i, (code, sql)) in refused.iter().enumerate() {
        let code = code.as_deref().unwrap();
        let who = i % 3;
        match send_query(
            &analysts[who],
            &coordinator,
            &QueryRequest::new(sql.as_str()),
        )
        .await
        {
            Err(QueryFailure::Refused(b)) if b.code == code => {}
            other => wrong.push(format!(
                "coordinator: expected {code}, got {:?}: {sql:.120}",
                other.map(|_| "answer")
            )),
        }
        // A coordinator forwarding the analyst's signed (but hostile) query.
        let req = signed_partial(&analysts[who], "CMS", &format!("hostile-{i}"), sql, None);
        let resp = hostile.post(&node).json(&req).send().await.unwrap();
        let status = resp.status();
        let body: Result<ErrorBody, _> = resp.json().await;
        match body {
            Ok(b) if b.code == code && status == 400 => {}
            other => wrong.push(format!(
                "node: expected {code}, got {status} {:?}: {sql:.120}",
                other.map(|b| b.code)
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        refused.len(),
        wrong.join("\n")
    );

    let allowed = blocks(include_str!("../../queries/tests/corpus/allowed.sql"));
    let pooled = pooled_context(dir.path());
    for (i, (k_only_refusal, sql)) in allowed.iter().enumerate() {
        // Percentiles: answered by a dp federation only (tests/tests/percentiles.rs); this
        // k-only one refuses them with their code.
        if let Some(code) = k_only_refusal {
            match send_query(
                &analysts[i % 3],
                &coordinator,
                &QueryRequest::new(sql.as_str()),
            )
            .await
            {
                Err(QueryFailure::Refused(b)) if b.code == *code => continue,
                other => panic!(
                    "{sql}: expected {code} from a k-only federation, got {:?}",
                    other.map(|_| "answer")
                ),
            }
        }
        let got = send_query(
            &analysts[i % 3],
            &coordinator,
            &QueryRequest::new(sql.as_str()),
        )
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = pooled.sql(sql).await.unwrap().collect().await.unwrap();
        let want = cxfed::output::rows(&want).unwrap();
        assert_rows_match(sql, &got.rows, &want);
        assert_eq!(got.suppressed_groups, 0, "{sql}");
    }
    fed.shutdown().await;
}
