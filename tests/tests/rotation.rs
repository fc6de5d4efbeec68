//! Certificate rotation and revocation without downtime, on a three-node federation over
//! loopback mTLS (certificates from `certs dev`, data from `synth` + `ingest`):
//!
//! - every node's certificate and key replaced under a stream of queries, then SIGHUP: new
//!   handshakes present the new certificates (by serial), the coordinator's peers accept its
//!   new client certificate even once the old ones are revoked, and no query fails or is lost
//!   from any audit log;
//! - a bad replacement (a key that is not the certificate's) refused naming the files, the old
//!   certificate still served, queries still answered;
//! - a replacement with no SIGHUP at all: picked up by the node's poll of its files once they
//!   have settled;
//! - an analyst's certificate revoked (`certs revoke`), the CRL added to every node's `[tls]`,
//!   SIGHUP: that analyst is refused at the handshake by every node, another analyst's queries
//!   are answered in full.
//!
//! The three nodes share this test process, so one SIGHUP reloads all of them (as it would
//! reload one node process). Timings are printed as `figure:` lines.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cxfed::client::AnalystClient;
use cxfed::tls::TlsFiles;
use cxfed_e2e::{AGENCIES, Fed};
use cxfed_protocol::wire::QueryRequest;
use cxfed_protocol::{Identity, Role};

const SQL: &str = "SELECT agency, COUNT(*) FROM experience GROUP BY agency";

/// SIGHUP to this process: every node in it reloads.
fn sighup() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The serial of the certificate node `url` presents to a new connection of `tls`.
async fn presented_serial(url: &str, tls: &TlsFiles) -> Result<String, String> {
    let client = cxfed::client::http_client(tls, Duration::from_secs(10)).unwrap();
    let resp = client
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .map_err(|e| cxfed::client::error_chain(&e))?;
    let leaf = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .ok_or("no peer certificate")?;
    Ok(cxfed::tls::serial_of(leaf))
}

/// Issues a new certificate and key for the node of `agency` (same identity, same CA) and
/// writes them over its files; returns the new serial.
fn renew_node(fed: &Fed, agency: &str) -> String {
    let certs = &fed.fed.certs;
    let lower = agency.to_lowercase();
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(certs.join("ca.key")).unwrap();
    let id = Identity::new(
        cxfed::demo::FEDERATION,
        agency,
        Role::Node,
        &format!("{lower}-node"),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = cxfed::certs::issue(
        &ca,
        &ca_key,
        &id,
        &["localhost", "127.0.0.1", &lower],
        now - time::Duration::hours(1),
        now + time::Duration::days(30),
    )
    .unwrap();
    let dir = certs.join(&lower);
    cxfed::storage::write_atomic(&dir.join("node.key"), key.as_bytes(), true).unwrap();
    cxfed::storage::write_atomic(&dir.join("node.pem"), cert.as_bytes(), false).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    cxfed::tls::serial_of(&der)
}

use rustls::pki_types::pem::PemObject;

/// Adds `crl = "<crl>"` to the `[tls]` section of every node's configuration file, and lifts
/// the rate limit (a stream of queries would hit the default 120 per minute).
fn configure(fed: &Fed, crl: Option<&Path>) {
    for (i, path) in fed.fed.configs.iter().enumerate() {
        let mut text = std::fs::read_to_string(path).unwrap();
        text = text.replace("rate_limit_per_minute = 120", "rate_limit_per_minute = 0");
        if let Some(crl) = crl
            && !text.contains("\ncrl = ")
        {
            let key_line = text
                .lines()
                .find(|l| l.starts_with("key = "))
                .unwrap()
                .to_string();
            text = text.replacen(
                &key_line,
                &format!("{key_line}\ncrl = {:?}", crl.display().to_string()),
                1,
            );
        }
        std::fs::write(path, text).unwrap();
        let node = &fed.fed.nodes[i].node;
        let mut policy = (*node.policy()).clone();
        policy.rate_limit_per_minute = 0;
        node.set_policy(policy);
    }
}

/// Queries sent one after another until stopped, by one analyst to node 0.
struct Stream {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<String>, Vec<String>, Duration)>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Stream {
    fn start(analyst: AnalystClient, url: String) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut failures = Vec::new();
            let mut slowest = Duration::ZERO;
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                match cxfed::client::send_query(
                    &analyst,
                    &url,
                    &QueryRequest::new(SQL).require_all(true),
                )
                .await
                {
                    Ok(r) if r.complete => {
                        ids.push(r.query_id);
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures.push(format!("incomplete answer {}", r.query_id)),
                    Err(e) => failures.push(e.to_string()),
                }
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ids, failures, slowest)
        });
        Stream {
            stop,
            task,
            answered,
        }
    }

    async fn wait_for(&self, n: usize) {
        let start = Instant::now();
        while self.answered.load(Ordering::SeqCst) < n {
            assert!(start.elapsed() < Duration::from_secs(60), "stream stalled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> (Vec<String>, Vec<String>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Every id in `ids` is in every node's audit log.
async fn assert_logged(fed: &Fed, ids: &[String]) {
    for (i, agency) in AGENCIES.iter().enumerate() {
        let logged: std::collections::BTreeSet<String> = fed
            .audit_log(i)
            .await
            .into_iter()
            .map(|e| e.query_id)
            .collect();
        for id in ids {
            assert!(
                logged.contains(id),
                "{agency}'s audit log lacks answered query {id}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_node_certificate_under_a_query_stream_loses_nothing() {
    let fed = Fed::start().await;
    configure(&fed, None);
    let urls: Vec<String> = (0..AGENCIES.len()).map(|i| fed.fed.url(i)).collect();
    let probe = fed.fed.tls("CMS", "steward");
    let mut old_serials = Vec::new();
    for url in &urls {
        old_serials.push(presented_serial(url, &probe).await.unwrap());
    }
    // Keep the old node certificates, to revoke them once rotated.
    let keep = fed.dir.path().join("old-node-certs");
    std::fs::create_dir_all(&keep).unwrap();
    let mut old_files: Vec<PathBuf> = Vec::new();
    for a in AGENCIES {
        let lower = a.to_lowercase();
        let to = keep.join(format!("{lower}-node.pem"));
        std::fs::copy(fed.fed.certs.join(&lower).join("node.pem"), &to).unwrap();
        std::fs::copy(
            fed.fed.certs.join(&lower).join("node.key"),
            keep.join(format!("{lower}-node.key")),
        )
        .unwrap();
        old_files.push(to);
    }

    let stream = Stream::start(fed.analyst.clone(), urls[0].clone());
    stream.wait_for(3).await;

    let new_serials: Vec<String> = AGENCIES.iter().map(|a| renew_node(&fed, a)).collect();
    let hup = Instant::now();
    sighup();
    for (i, url) in urls.iter().enumerate() {
        loop {
            let s = presented_serial(url, &probe).await.unwrap();
            if s == new_serials[i] {
                break;
            }
            assert_eq!(s, old_serials[i], "node {i} presents a third certificate");
            assert!(
                hup.elapsed() < Duration::from_secs(10),
                "node {i} still presents the old certificate"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let rotated_after = hup.elapsed();
    let n = stream.answered.load(Ordering::SeqCst);
    stream.wait_for(n + 3).await;
    for (i, node) in fed.fed.nodes.iter().enumerate() {
        assert_eq!(node.node.tls.served().serial, new_serials[i]);
    }

    // Revoke the old node certificates everywhere: the coordinator's new connections to its
    // peers present the new certificate, so answers stay complete.
    let crl = fed.fed.certs.join(cxfed::certs::CRL_FILE);
    cxfed::certs::revoke(&fed.fed.certs, &crl, &old_files, None, 30).unwrap();
    configure(&fed, Some(&crl));
    let revoked_at = Instant::now();
    sighup();
    // The old SSA node certificate, as a client, is refused by CMS from then on.
    let old_ssa = TlsFiles::new(
        fed.fed.certs.join("ca.pem"),
        old_files[0].clone(),
        keep.join("ssa-node.key"),
    );
    let refused_after = loop {
        if presented_serial(&urls[1], &old_ssa).await.is_err() {
            break revoked_at.elapsed();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "CMS still accepts the revoked SSA node certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let n = stream.answered.load(Ordering::SeqCst);
    stream.wait_for(n + 3).await;
    // A fresh analyst connection, and a query coordinated by each node: complete.
    for (i, url) in urls.iter().enumerate() {
        let analyst = fed.analyst_of(AGENCIES[i]);
        let r = cxfed::client::send_query(&analyst, url, &QueryRequest::new(SQL).require_all(true))
            .await
            .unwrap();
        assert!(r.complete, "{url}");
    }
    let (ids, failures, slowest) = stream.finish().await;
    assert!(
        failures.is_empty(),
        "queries failed during the rotation: {failures:?}"
    );
    assert_logged(&fed, &ids).await;
    println!(
        "figure: rotation: every node presents its new certificate {:.0} ms after SIGHUP; old node certificates refused {:.0} ms after revocation + SIGHUP; {} queries answered in full, 0 failed, slowest {:.0} ms; all in every audit log",
        rotated_after.as_secs_f64() * 1e3,
        refused_after.as_secs_f64() * 1e3,
        ids.len(),
        slowest.as_secs_f64() * 1e3,
    );
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replacement_is_refused_and_the_old_certificate_stays() {
    let fed = Fed::start().await;
    configure(&fed, None);
    let url = fed.fed.url(1);
    let probe = fed.fed.tls("SSA", "steward");
    let before = presented_serial(&url, &probe).await.unwrap();
    let stream = Stream::start(fed.analyst.clone(), fed.fed.url(0));
    stream.wait_for(2).await;

    // A new certificate for CMS's node with the key of OPM's: not a pair.
    let cms = fed.fed.certs.join("cms");
    let bad = fed.dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let id = Identity::new(cxfed::demo::FEDERATION, "CMS", Role::Node, "cms-node").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, _key) = cxfed::certs::issue(
        &std::fs::read_to_string(fed.fed.certs.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(fed.fed.certs.join("ca.key")).unwrap(),
        &id,
        &["localhost", "127.0.0.1", "cms"],
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    std::fs::write(bad.join("node.pem"), cert).unwrap();
    std::fs::copy(
        fed.fed.certs.join("opm").join("node.key"),
        bad.join("node.key"),
    )
    .unwrap();
    let node = &fed.fed.nodes[1].node;
    let mut files = node.tls.files();
    files.cert = bad.join("node.pem");
    files.key = bad.join("node.key");
    let err = node.reload_tls(files.clone()).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
    assert!(
        err.contains("bad/node.key") && err.contains("bad/node.pem"),
        "{err}"
    );

    // A certificate of another agency is refused too.
    let mut other = node.tls.files();
    other.cert = fed.fed.certs.join("opm").join("node.pem");
    other.key = fed.fed.certs.join("opm").join("node.key");
    let err = node.reload_tls(other).unwrap_err().to_string();
    assert!(err.contains("cannot change agency"), "{err}");

    // The same mismatch written over the node's own files, then SIGHUP: refused the same way.
    let saved = (
        std::fs::read(cms.join("node.pem")).unwrap(),
        std::fs::read(cms.join("node.key")).unwrap(),
    );
    std::fs::copy(bad.join("node.pem"), cms.join("node.pem")).unwrap();
    sighup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(presented_serial(&url, &probe).await.unwrap(), before);
    assert_eq!(node.tls.served().serial, before);
    // Put back; the node keeps serving throughout.
    std::fs::write(cms.join("node.pem"), &saved.0).unwrap();
    std::fs::write(cms.join("node.key"), &saved.1).unwrap();
    let n = stream.answered.load(Ordering::SeqCst);
    stream.wait_for(n + 3).await;
    let (ids, failures, _) = stream.finish().await;
    assert!(failures.is_empty(), "queries failed: {failures:?}");
    assert_logged(&fed, &ids).await;
    assert_eq!(presented_serial(&url, &probe).await.unwrap(), before);
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_without_sighup_is_picked_up_once_the_files_settle() {
    // (Another test of this binary running at the same time may send a SIGHUP; run alone for
    // the figure: `--test-threads=1`.)
    let fed = Fed::start().await;
    configure(&fed, None);
    let url = fed.fed.url(2);
    let probe = fed.fed.tls("SSA", "steward");
    let before = presented_serial(&url, &probe).await.unwrap();
    let new = renew_node(&fed, "OPM");
    let written = Instant::now();
    loop {
        let s = presented_serial(&url, &probe).await.unwrap();
        if s == new {
            break;
        }
        assert_eq!(s, before);
        assert!(
            written.elapsed() < Duration::from_secs(15),
            "OPM never picked up its new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = written.elapsed();
    let r = fed.query_at(0, SQL, true).await.unwrap();
    assert!(r.complete);
    println!(
        "figure: rotation without SIGHUP: OPM presents its new certificate {:.1} s after the files were written (poll every 2 s, one more poll to settle)",
        took.as_secs_f64()
    );
    fed.fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_analyst_is_refused_at_the_handshake_while_another_answers() {
    let fed = Fed::start().await;
    configure(&fed, None);
    let urls: Vec<String> = (0..AGENCIES.len()).map(|i| fed.fed.url(i)).collect();
    let revoked = fed.analyst_of("SSA");
    let other = fed.analyst_of("CMS");
    let stream = Stream::start(other.clone(), urls[0].clone());
    stream.wait_for(2).await;
    let r = cxfed::client::send_query(&revoked, &urls[0], &QueryRequest::new(SQL)).await;
    assert!(r.is_ok(), "{r:?}");

    let crl = fed.fed.certs.join(cxfed::certs::CRL_FILE);
    let written = cxfed::certs::revoke(
        &fed.fed.certs,
        &crl,
        &[fed.fed.tls("SSA", "analyst").cert],
        Some(rcgen::RevocationReason::KeyCompromise),
        30,
    )
    .unwrap();
    assert_eq!(written.revoked, 1);
    configure(&fed, Some(&crl));
    let hup = Instant::now();
    sighup();
    let ssa_analyst = fed.fed.tls("SSA", "analyst");
    let mut refused = Vec::new();
    for url in &urls {
        loop {
            if presented_serial(url, &ssa_analyst).await.is_err() {
                refused.push(hup.elapsed());
                break;
            }
            assert!(
                hup.elapsed() < Duration::from_secs(10),
                "{url} still accepts the revoked analyst"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for node in &fed.fed.nodes {
        assert_eq!(node.node.tls.served().revoked, 1);
    }
    // The revoked analyst's client from before (its pooled connection, if still open, was
    // verified before the revocation): refused either at a new handshake or, on the old
    // connection, by the coordinator's check of the request's signing certificate.
    let e = cxfed::client::send_query(&revoked, &urls[0], &QueryRequest::new(SQL))
        .await
        .unwrap_err();
    let how = match &e {
        cxfed::client::QueryFailure::Refused(b) => {
            assert_eq!(b.kind, "untrusted-certificate", "{e:?}");
            "request signature refused on the old connection"
        }
        cxfed::client::QueryFailure::Transport(_) => "handshake refused",
    };
    println!("revoked analyst's old client: {how}");
    // A new client of the revoked analyst cannot query any node ...
    let fresh = fed.analyst_of("SSA");
    for url in &urls {
        let e = cxfed::client::send_query(&fresh, url, &QueryRequest::new(SQL))
            .await
            .unwrap_err();
        assert!(
            matches!(e, cxfed::client::QueryFailure::Transport(_)),
            "{url}: {e:?}"
        );
    }
    // ... while the other analyst's stream goes on, and a fresh client of theirs is answered.
    let n = stream.answered.load(Ordering::SeqCst);
    stream.wait_for(n + 3).await;
    let fresh_other = fed.analyst_of("CMS");
    let r = cxfed::client::send_query(
        &fresh_other,
        &urls[2],
        &QueryRequest::new(SQL).require_all(true),
    )
    .await
    .unwrap();
    assert!(r.complete);
    let (ids, failures, _) = stream.finish().await;
    assert!(
        failures.is_empty(),
        "the other analyst's queries failed: {failures:?}"
    );
    assert_logged(&fed, &ids).await;
    let slowest = refused.iter().max().copied().unwrap_or_default();
    println!(
        "figure: revocation: the revoked analyst refused at the handshake by all {} nodes {:.0} ms after SIGHUP; the other analyst's {} queries answered in full, 0 failed",
        urls.len(),
        slowest.as_secs_f64() * 1e3,
        ids.len()
    );
    fed.fed.shutdown().await;
}
