//! Tamper-evident audit logs and signed analyst requests, end to end: every kind of tampering
//! is caught by `verify` with the first bad sequence number; every forged, altered or replayed
//! request is refused and logged (a partial replayed by another node included); role refusals,
//! malformed requests and unknown endpoints are logged; a log cut back to an older checkpoint
//! fails against the head an auditor saw; reconciliation verifies each log and matches
//! fan-outs.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use cxfed::audit::{Decision, Entry, PublicKey, digest, parse_line};
use cxfed::auditor::{reconcile_dir, verify};
use cxfed_e2e::{Fed, signed_partial};
use cxfed_protocol::wire::{ErrorBody, QueryRequest};

const SQL: &str = "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency";

fn key_of(fed: &Fed, agency: &str) -> PublicKey {
    let text =
        std::fs::read_to_string(fed.data_dir(agency).join(cxfed::audit::PUBLIC_KEY_FILE)).unwrap();
    PublicKey::parse(&text).unwrap()
}

fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split_inclusive(|b| *b == b'\n')
        .map(|l| l.to_vec())
        .collect()
}

/// Recomputes a line's own hash after an edit, as a forger would.
fn reseal(line: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(line).unwrap().trim_end();
    let cut = text.rfind(",\"hash\":\"").unwrap();
    let body = format!("{}}}", &text[..cut]);
    format!(
        "{},\"hash\":\"{}\"}}\n",
        &text[..cut],
        digest(body.as_bytes())
    )
    .into_bytes()
}

fn seq_of_first_problem(bytes: &[u8], key: &PublicKey) -> u64 {
    verify(bytes, key, 0, None).unwrap_err().seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_every_kind_of_tampering() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    for _ in 0..3 {
        fed.query(SQL).await.unwrap();
    }
    fed.query("SELECT person_id FROM experience")
        .await
        .unwrap_err();
    let bytes = fed.audit_bytes(0).await;
    let key = key_of(&fed, "SSA");
    let clean = verify(&bytes, &key, 0, None).unwrap();
    assert_eq!(clean.node, "SSA");
    let ls = lines(&bytes);
    assert!(ls.len() >= 8, "{} lines", ls.len());
    assert_eq!(clean.last_seq, ls.len() as u64);
    let join = |ls: &[Vec<u8>]| ls.concat();

    // Edited: the line's own hash no longer matches.
    let mut edited = ls.clone();
    edited[2] = String::from_utf8(edited[2].clone())
        .unwrap()
        .replacen("COUNT(*)", "COUNT(1)", 1)
        .into_bytes();
    assert_ne!(edited[2], ls[2]);
    assert_eq!(seq_of_first_problem(&join(&edited), &key), 3);

    // Edited and re-hashed: the next entry no longer chains to it.
    let mut resealed = edited.clone();
    resealed[2] = reseal(&resealed[2]);
    let p = verify(&join(&resealed), &key, 0, None).unwrap_err();
    assert_eq!(p.seq, 4, "{p}");
    assert!(p.message.contains("chain"), "{p}");

    // Deleted.
    let mut deleted = ls.clone();
    deleted.remove(2);
    assert_eq!(seq_of_first_problem(&join(&deleted), &key), 3);
    let mut first_deleted = ls.clone();
    first_deleted.remove(0);
    assert_eq!(seq_of_first_problem(&join(&first_deleted), &key), 1);

    // Inserted: a forged entry that chains to seq 2 and claims seq 3.
    let mut inserted = ls.clone();
    let prev: Entry = parse_line(ls[1].trim_ascii_end()).unwrap();
    let mut forged: Entry = parse_line(ls[2].trim_ascii_end()).unwrap();
    forged.sql = Some("SELECT 'nothing to see'".into());
    forged.prev_hash = prev.hash.clone();
    forged.hash.clear();
    let mut forged_line = serde_json::to_vec(&forged).unwrap();
    forged_line.pop();
    forged_line.extend_from_slice(b",\"hash\":\"");
    forged_line.extend_from_slice(&[b'0'; 64]);
    forged_line.extend_from_slice(b"\"}\n");
    inserted.insert(2, reseal(&forged_line));
    assert_eq!(seq_of_first_problem(&join(&inserted), &key), 3);

    // Reordered.
    let mut reordered = ls.clone();
    reordered.swap(2, 3);
    assert_eq!(seq_of_first_problem(&join(&reordered), &key), 3);

    // Truncated: the tail after the last checkpoint (here, the final checkpoint) is gone.
    let truncated = join(&ls[..ls.len() - 2]);
    let p = verify(&truncated, &key, 0, None).unwrap_err();
    assert!(
        p.message.contains("not covered by a signed checkpoint"),
        "{p}"
    );
    // Torn mid-line.
    let torn = &bytes[..bytes.len() - 10];
    assert_eq!(seq_of_first_problem(torn, &key), ls.len() as u64);

    // An unsigned field slipped into the final checkpoint, re-hashed.
    let mut padded = ls.clone();
    let last = padded.len() - 1;
    let text = String::from_utf8(padded[last].clone()).unwrap();
    padded[last] = reseal(
        text.replacen("\"kind\"", "\"sql\":\"DROP\",\"kind\"", 1)
            .as_bytes(),
    );
    let p = verify(&join(&padded), &key, 0, None).unwrap_err();
    assert_eq!(p.seq, ls.len() as u64, "{p}");

    // A checkpoint signed by another key, and the wrong key for a clean log.
    let other = key_of(&fed, "CMS");
    let p = verify(&bytes, &other, 0, None).unwrap_err();
    assert!(p.message.contains("signature"), "{p}");

    // The CLI agrees: exit 0 only for the clean log, and the failure names the seq.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&good, &bytes).unwrap();
    std::fs::write(&bad, join(&reordered)).unwrap();
    let key_file = fed.data_dir("SSA").join(cxfed::audit::PUBLIC_KEY_FILE);
    let run = |file: &std::path::Path| {
        use clap::Parser;
        let cli = cxfed::cli::Cli::parse_from([
            "cxfed",
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ]);
        cxfed::cli::run(cli)
    };
    assert_eq!(
        format!("{:?}", run(&good).await),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
    assert_eq!(
        format!("{:?}", run(&bad).await),
        format!("{:?}", std::process::ExitCode::FAILURE)
    );

    // `audit fetch` keeps the head it saw. A log cut back to an older checkpoint still verifies
    // on its own, but not against the head an auditor saw later.
    let key_arg = key_file.to_str().unwrap().to_string();
    let auditor = fed.fed.tls("SSA", "auditor");
    let fetch = |out: &std::path::Path, extra: Vec<String>| {
        let mut args: Vec<String> = [
            "audit",
            "fetch",
            "--node",
            &fed.fed.url(0),
            "--ca",
            auditor.ca.to_str().unwrap(),
            "--cert",
            auditor.cert.to_str().unwrap(),
            "--key",
            auditor.key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra);
        cli(args)
    };
    let first = dir.path().join("first.jsonl");
    assert!(fetch(&first, vec![]).await);
    let head_of = |log: &std::path::Path| {
        std::fs::read_to_string(cxfed::cli::head_file(log))
            .unwrap()
            .trim()
            .to_string()
    };
    let head1 = head_of(&first);
    fed.query(SQL).await.unwrap();
    let second = dir.path().join("second.jsonl");
    assert!(fetch(&second, vec!["--prev".into(), head1.clone()]).await);
    let head2 = head_of(&second);
    let verify_cli = |file: &std::path::Path, extra: &[&str]| {
        let mut args: Vec<String> = ["audit", "verify", file.to_str().unwrap(), "--key"]
            .map(String::from)
            .to_vec();
        args.push(key_arg.clone());
        args.extend(extra.iter().map(|s| s.to_string()));
        cli(args)
    };
    assert!(
        verify_cli(&second, &["--prev", &head1]).await,
        "grew from head 1"
    );
    assert!(
        verify_cli(&first, &[]).await,
        "alone, the older log is valid"
    );
    assert!(
        !verify_cli(&first, &["--prev", &head2]).await,
        "cut back to the checkpoint of head 1"
    );
    let p = cxfed::auditor::verify_with(
        &std::fs::read(&first).unwrap(),
        &key,
        &cxfed::auditor::Options {
            prev: Some(&head2.parse().unwrap()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(p.message.contains("cut back"), "{p}");
    // A fetch since head 1 continues it.
    let seq1 = head1.split(':').next().unwrap().to_string();
    let third = dir.path().join("third.jsonl");
    let since = vec![
        "--since".into(),
        seq1.clone(),
        "--prev".into(),
        head1.clone(),
    ];
    assert!(fetch(&third, since).await);
    assert!(verify_cli(&third, &["--since", &seq1, "--prev", &head1]).await);
    let forged_head = format!("{seq1}:{}", "0".repeat(64));
    assert!(!verify_cli(&third, &["--since", &seq1, "--prev", &forged_head]).await);
    fed.fed.shutdown().await;
}

/// Runs the `cxfed` command line in-process; true on exit status 0.
async fn cli(args: Vec<String>) -> bool {
    use clap::Parser;
    let cli = cxfed::cli::Cli::parse_from(std::iter::once("cxfed".to_string()).chain(args));
    format!("{:?}", cxfed::cli::run(cli).await) == format!("{:?}", std::process::ExitCode::SUCCESS)
}

async fn post_partial(
    client: &reqwest::Client,
    url: &str,
    req: &cxfed_protocol::wire::PartialRequest,
) -> (u16, ErrorBody) {
    let resp = client
        .post(format!("{url}/v1/partial"))
        .json(req)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_and_replayed_requests_are_refused_and_logged() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let url = fed.fed.url(0);
    // A coordinator (CMS's node certificate) acting on its own.
    let hostile = fed.client("CMS", "node");

    let mut unsigned = fed.signed_partial("forge-1", SQL, None);
    unsigned.signature = None;
    let (status, b) = post_partial(&hostile, &url, &unsigned).await;
    assert_eq!(
        (status, b.code.as_str(), b.kind.as_str()),
        (401, "CXF-A401", "unsigned-request")
    );

    let mut altered = fed.signed_partial("forge-2", SQL, None);
    altered.sql =
        "SELECT agency, COUNT(*) AS n FROM experience WHERE trust = 1 GROUP BY agency".into();
    let (status, b) = post_partial(&hostile, &url, &altered).await;
    assert_eq!((status, b.kind.as_str()), (401, "bad-signature"));

    let mut more_epsilon = fed.signed_partial("forge-3", SQL, Some(0.1));
    more_epsilon.epsilon = Some(1.0);
    let (_, b) = post_partial(&hostile, &url, &more_epsilon).await;
    assert_eq!(b.kind, "bad-signature");

    // Acting in the SSA analyst's name with the CMS analyst's signature.
    let cms = fed.analyst_of("CMS");
    let mut impersonated = signed_partial(&cms, "CMS", "forge-4", SQL, None);
    impersonated.analyst = fed.analyst.signer.identity().to_string();
    let (_, b) = post_partial(&hostile, &url, &impersonated).await;
    assert_eq!(b.kind, "bad-signature");
    assert!(b.message.contains("signed by"), "{}", b.message);

    // A node key cannot sign as an analyst.
    let node_signer = cxfed::client::signer(&fed.fed.tls("CMS", "node")).unwrap();
    let sig = node_signer.sign("CMS", SQL, None, true).unwrap();
    let mut by_node = fed.signed_partial("forge-5", SQL, None);
    by_node.signature = Some(sig);
    by_node.analyst = node_signer.identity().to_string();
    let (_, b) = post_partial(&hostile, &url, &by_node).await;
    assert_eq!(b.kind, "not-an-analyst");

    // Stale.
    let stale_sig = fed
        .analyst
        .signer
        .sign_at(
            "CMS",
            SQL,
            None,
            true,
            cxfed_protocol::signing::unix_now() - 3600,
        )
        .unwrap();
    let mut stale = fed.signed_partial("forge-6", SQL, None);
    stale.signature = Some(stale_sig);
    let (_, b) = post_partial(&hostile, &url, &stale).await;
    assert_eq!(b.kind, "stale-request");

    // Replayed: the first is answered, the second refused.
    let once = fed.signed_partial("replay", SQL, None);
    let resp = hostile
        .post(format!("{url}/v1/partial"))
        .json(&once)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, b) = post_partial(&hostile, &url, &once).await;
    assert_eq!(b.kind, "replayed-request");

    // An analyst replaying a signed query, or sending another analyst's.
    let req = QueryRequest::new(SQL)
        .sign(&fed.analyst.signer, "SSA")
        .unwrap();
    let send = |client: reqwest::Client, req: QueryRequest| {
        let url = url.clone();
        async move {
            let resp = client
                .post(format!("{url}/v1/query"))
                .json(&req)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap())
        }
    };
    assert_eq!(send(fed.analyst.http.clone(), req.clone()).await.0, 200);
    let (status, body) = send(fed.analyst.http.clone(), req.clone()).await;
    let b: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, b.kind.as_str()), (401, "replayed-request"));
    let fresh = QueryRequest::new(SQL)
        .sign(&fed.analyst.signer, "SSA")
        .unwrap();
    let (status, body) = send(cms.http.clone(), fresh).await;
    let b: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, b.kind.as_str()), (401, "bad-signature"));
    // A query the analyst signed for CMS's node, sent to SSA's instead.
    let for_cms = QueryRequest::new(SQL)
        .sign(&fed.analyst.signer, "CMS")
        .unwrap();
    let (status, body) = send(fed.analyst.http.clone(), for_cms).await;
    let b: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, b.kind.as_str()), (401, "wrong-coordinator"));

    // Every refusal is in the log with its code; answered requests keep the signature.
    let log = fed.audit_log(0).await;
    let refused_401 = log
        .iter()
        .filter(|e| e.code.as_deref() == Some("CXF-A401"))
        .count();
    assert_eq!(refused_401, 10);
    // The log verifies: no replayed or stale request was executed.
    verify(&fed.audit_bytes(0).await, &key_of(&fed, "SSA"), 0, None).unwrap();
    let answered = log
        .iter()
        .find(|e| e.query_id == "replay" && e.decision == Some(Decision::Executed))
        .unwrap();
    assert_eq!(answered.request, once.signature);
    assert_eq!(answered.analyst, fed.analyst.signer.identity().to_string());

    // A restarted node still refuses a nonce it answered before the restart.
    let ssa = fed_restart_first(fed).await;
    let (status, b) = post_partial(&ssa.1, &ssa.0, &once).await;
    assert_eq!((status, b.kind.as_str()), (401, "replayed-request"));
    ssa.2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_replayed_by_another_node_is_refused_and_logged() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let (cms_url, opm_url) = (fed.fed.url(1), fed.fed.url(2));
    // SSA's node forwards the analyst's query (signed for coordinator SSA) to CMS's node...
    let forwarded = signed_partial(&fed.analyst, "SSA", "relayed", SQL, None);
    let ssa_node = fed.client("SSA", "node");
    let resp = ssa_node
        .post(format!("{cms_url}/v1/partial"))
        .json(&forwarded)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // ...and CMS's node replays it to OPM's, which has not seen the nonce.
    let cms_node = fed.client("CMS", "node");
    let (status, b) = post_partial(&cms_node, &opm_url, &forwarded).await;
    assert_eq!(
        (status, b.code.as_str(), b.kind.as_str()),
        (401, "CXF-A401", "wrong-coordinator")
    );
    assert!(b.message.contains("coordinator SSA"), "{}", b.message);
    // The refusal did not use the nonce up: SSA's own forwarding to OPM is answered.
    let resp = ssa_node
        .post(format!("{opm_url}/v1/partial"))
        .json(&forwarded)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let log = fed.audit_log(2).await;
    let refusal = log
        .iter()
        .find(|e| e.query_id == "relayed" && e.decision == Some(Decision::Refused))
        .unwrap();
    assert_eq!(refusal.code.as_deref(), Some("CXF-A401"));
    assert!(refusal.peer.contains("/CMS/node/"), "{}", refusal.peer);
    assert_eq!(refusal.request, forwarded.signature);
    assert!(refusal.received_at.is_some());
    verify(&fed.audit_bytes(2).await, &key_of(&fed, "OPM"), 0, None).unwrap();
    fed.fed.shutdown().await;
}

/// Shuts SSA's node down and starts it again on the same data; returns its URL, the CMS node
/// client, and the node.
async fn fed_restart_first(mut fed: Fed) -> (String, reqwest::Client, cxfed::server::RunningNode) {
    let hostile = fed.client("CMS", "node");
    let first = fed.fed.nodes.remove(0);
    let mut config = first.node.config.clone();
    first.shutdown().await;
    config.listen = "127.0.0.1:0".parse().unwrap();
    let node = cxfed::server::start(config, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", node.addr.port());
    fed.fed.shutdown().await;
    (url, hostile, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_malformed_request_refusals_are_logged() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let url = fed.fed.url(0);
    for (agency, role) in [("SSA", "analyst"), ("SSA", "steward"), ("CMS", "node")] {
        let resp = fed
            .client(agency, role)
            .get(format!("{url}/v1/audit"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{agency} {role}");
    }
    // Malformed requests from authorized callers, and unknown endpoints, are refused and
    // logged with who sent them.
    let node = fed.client("CMS", "node");
    let resp = node
        .post(format!("{url}/v1/partial"))
        .header("content-type", "application/json")
        .body("{\"query_id\": \"bad-json\", ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<ErrorBody>().await.unwrap().code, "CXF-A400");
    let mut old = fed.signed_partial("old-protocol", SQL, None);
    old.protocol = 1;
    let (status, b) = post_partial(&node, &url, &old).await;
    assert_eq!((status, b.code.as_str()), (400, "CXF-A400"));
    assert!(b.message.contains("protocol 1"), "{}", b.message);
    let analyst = fed.client("SSA", "analyst");
    for (path, body) in [("/v1/query", "[]"), ("/v1/explain", "{}")] {
        let resp = analyst
            .post(format!("{url}{path}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
    }
    let resp = fed
        .client("SSA", "auditor")
        .get(format!("{url}/v1/audit?since=yesterday"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = fed
        .client("SSA", "steward")
        .get(format!("{url}/v1/activity?limit=-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    for (method, path) in [("GET", "/v1/nope"), ("GET", "/v1/query")] {
        let resp = analyst
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{method} {path}");
        assert_eq!(resp.json::<ErrorBody>().await.unwrap().code, "CXF-A404");
    }

    let log = fed.audit_log(0).await;
    let refusals: Vec<&Entry> = log
        .iter()
        .filter(|e| e.endpoint == "/v1/audit" && e.code.as_deref() == Some("CXF-A403"))
        .collect();
    assert_eq!(refusals.len(), 3);
    assert!(refusals.iter().any(|e| e.peer.contains("/SSA/steward/")));
    // The auditor's own read is logged too.
    assert!(
        log.iter()
            .any(|e| e.endpoint == "/v1/audit" && e.decision == Some(Decision::Executed))
    );
    let logged = |endpoint: &str, code: &str| {
        log.iter()
            .filter(|e| {
                e.endpoint == endpoint
                    && e.code.as_deref() == Some(code)
                    && e.decision == Some(Decision::Refused)
            })
            .map(|e| (e.peer.clone(), e.query_id.clone()))
            .collect::<Vec<_>>()
    };
    let bad_partials = logged("/v1/partial", "CXF-A400");
    assert_eq!(bad_partials.len(), 2, "{bad_partials:?}");
    assert!(bad_partials.iter().all(|(p, _)| p.contains("/CMS/node/")));
    assert!(bad_partials.iter().any(|(_, q)| q == "old-protocol"));
    assert_eq!(logged("/v1/query", "CXF-A400").len(), 1);
    assert_eq!(logged("/v1/explain", "CXF-A400").len(), 1);
    assert_eq!(logged("/v1/audit", "CXF-A400").len(), 1);
    assert_eq!(logged("/v1/activity", "CXF-A400").len(), 1);
    let not_found = logged("/v1/nope", "CXF-A404");
    assert_eq!(not_found.len(), 1);
    assert!(not_found[0].0.contains("/SSA/analyst/"), "{not_found:?}");
    assert_eq!(logged("/v1/query", "CXF-A404").len(), 1, "wrong method");
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_matches_fanouts_and_lists_mismatches() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    for i in 0..3 {
        fed.query_at(i, SQL, true).await.unwrap();
    }
    // A hidden query: CMS's node asks SSA's in the analyst's name (validly signed) but its own
    // log never records a coordinated query.
    let hostile = fed.client("CMS", "node");
    let resp = hostile
        .post(format!("{}/v1/partial", fed.fed.url(0)))
        .json(&fed.signed_partial("unrecorded", SQL, None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let dir = tempfile::tempdir().unwrap();
    let ca = fed.fed.certs.join("ca.pem");
    for (i, agency) in cxfed_e2e::AGENCIES.iter().enumerate() {
        let bytes = fed.audit_bytes(i).await;
        let checker = cxfed::auditor::checker_for(&bytes, &ca).unwrap().unwrap();
        let v = verify(&bytes, &key_of(&fed, agency), 0, Some(&checker)).unwrap();
        assert!(v.signatures_checked >= 3, "{agency}: {v:?}");
        std::fs::write(dir.path().join(format!("{agency}.jsonl")), bytes).unwrap();
    }
    let keys = cxfed_e2e::AGENCIES
        .iter()
        .map(|a| (a.to_string(), key_of(&fed, a)))
        .collect();
    let r = cxfed::auditor::reconcile_dir_with(dir.path(), &keys).unwrap();
    assert_eq!(r.logs.len(), 3);
    assert!(
        r.logs
            .iter()
            .all(|l| matches!(l.status, cxfed::auditor::LogStatus::Verified(_))),
        "{:?}",
        r.logs
    );
    assert_eq!(r.queries, 3);
    assert_eq!(r.matched, 9);
    assert_eq!(r.mismatches.len(), 1, "{:?}", r.mismatches);
    let m = &r.mismatches[0];
    assert_eq!(
        (m.query_id.as_str(), m.coordinator.as_str(), m.node.as_str()),
        ("unrecorded", "CMS", "SSA")
    );

    // A node that drops a query from its log, and one that logs a different digest.
    let opm = dir.path().join("OPM.jsonl");
    let text = std::fs::read_to_string(&opm).unwrap();
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| {
            let e = parse_line(l.trim_end().as_bytes()).unwrap();
            !(e.endpoint == "/v1/partial" && e.peer.contains("/SSA/node/"))
        })
        .collect();
    std::fs::write(&opm, kept).unwrap();
    let cms = dir.path().join("CMS.jsonl");
    let text = std::fs::read_to_string(&cms).unwrap();
    let changed: String = text
        .split_inclusive('\n')
        .map(|l| {
            let e = parse_line(l.trim_end().as_bytes()).unwrap();
            match (&e.digest, e.endpoint.as_str()) {
                (Some(d), "/v1/partial") if e.peer.contains("/OPM/node/") => {
                    String::from_utf8(reseal(l.replace(d.as_str(), &"0".repeat(64)).as_bytes()))
                        .unwrap()
                }
                _ => l.to_string(),
            }
        })
        .collect();
    std::fs::write(&cms, changed).unwrap();
    let r = reconcile_dir(dir.path()).unwrap();
    let problems: Vec<String> = r.mismatches.iter().map(|m| m.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("coordinator SSA, node OPM") && p.contains("no record")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("coordinator OPM, node CMS") && p.contains("digests differ")),
        "{problems:#?}"
    );
    fed.fed.shutdown().await;
}
