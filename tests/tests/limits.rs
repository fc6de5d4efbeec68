//! Request size limits against a running node over real mTLS sockets: an oversized body gets an
//! HTTP answer (413, `CXF-A413`, the limit named), is audited, and the node keeps serving.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use cxfed::audit::Decision;
use cxfed::client::QueryFailure;
use cxfed::server::{BODY_TOO_LARGE, MAX_BODY_BYTES};
use cxfed_e2e::Fed;
use cxfed_protocol::wire::{ErrorBody, QueryRequest};

const SQL: &str = "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency";

/// A syntactically valid `/v1/query` body of about `bytes` bytes (the SQL carries a long
/// comment), so only its size is wrong.
fn big_query_body(bytes: usize) -> Vec<u8> {
    let sql = format!("{SQL} -- {}", "x".repeat(bytes));
    serde_json::to_vec(&QueryRequest::new(&sql)).unwrap()
}

/// The SSA analyst's client speaking only HTTP/1.1 (the default client negotiates h2).
fn http1_analyst(fed: &Fed) -> reqwest::Client {
    let mut config = fed.fed.tls("SSA", "analyst").client_config().unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .https_only(true)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_query_body_is_answered_413_audited_and_the_node_keeps_serving() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let url = fed.fed.url(0);
    let body = big_query_body(3_000_000);
    assert!(body.len() > MAX_BODY_BYTES);

    for (proto, client) in [
        ("h2", fed.client("SSA", "analyst")),
        ("http/1.1", http1_analyst(&fed)),
    ] {
        let resp = client
            .post(format!("{url}/v1/query"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{proto}: no HTTP answer to a 3 MB body: {e:?}"));
        assert_eq!(resp.status(), 413, "{proto}");
        let err: ErrorBody = resp.json().await.unwrap();
        assert_eq!(err.code, BODY_TOO_LARGE, "{proto}");
        assert_eq!(err.kind, "body-too-large", "{proto}");
        assert!(
            err.message.contains(&MAX_BODY_BYTES.to_string()),
            "{proto}: the message names the limit: {}",
            err.message
        );
    }

    // What `cxfed query` shows for a signed 3 MB query: the refusal, with its code and limit.
    let huge = format!("{SQL} -- {}", "x".repeat(3_000_000));
    match fed.query(&huge).await {
        Err(QueryFailure::Refused(b)) => {
            assert_eq!(b.code, BODY_TOO_LARGE);
            assert!(b.message.contains("2 MiB"), "{}", b.message);
        }
        other => panic!("expected the 413 refusal, got {other:?}"),
    }

    // The three refusals are in the node's audit log, with the analyst as the TLS peer.
    let log = fed.audit_log(0).await;
    let refused: Vec<_> = log
        .iter()
        .filter(|e| e.endpoint == "/v1/query" && e.code.as_deref() == Some(BODY_TOO_LARGE))
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    for e in &refused {
        assert_eq!(e.decision, Some(Decision::Refused));
        assert!(e.peer.contains("/SSA/analyst/"), "{}", e.peer);
        assert!(e.sql.is_none(), "nothing of the body is logged");
    }

    // The limit is exact: a body of exactly MAX_BODY_BYTES is read (and refused only because it
    // is unsigned), one byte more is not read.
    for (proto, client) in [
        ("h2", fed.client("SSA", "analyst")),
        ("http/1.1", http1_analyst(&fed)),
    ] {
        let mut at_limit = big_query_body(MAX_BODY_BYTES - 100);
        at_limit.resize(MAX_BODY_BYTES, b' '); // JSON may end in white space
        for (body, want) in [
            (at_limit.clone(), 401),
            ([at_limit, vec![b' ']].concat(), 413),
        ] {
            let len = body.len();
            let resp = client
                .post(format!("{url}/v1/query"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), want, "{proto}: {len} bytes");
        }
    }
    // A journey step may be larger, but only from a node's certificate: an analyst's 3 MB
    // body to /v1/journey is refused unread; a node's is read (and then refused as a
    // malformed step, 400, not 413).
    for (who, want) in [("analyst", 413), ("node", 400)] {
        let resp = fed
            .client("CMS", who)
            .post(format!("{url}/v1/journey"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{who}");
    }
    // And a normal query still gets its answer.
    let answer = fed.query(SQL).await.unwrap();
    assert!(!answer.rows.is_empty());
    fed.fed.shutdown().await;
}
