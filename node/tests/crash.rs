//! Crash safety of the audit log with a real process: `cxfed serve` is killed with SIGKILL in
//! the middle of a storm of queries, restarted, and its log still verifies, holds every query
//! that was answered, and records the repair of a torn last line.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cxfed::audit::{AUDIT_FILE, Decision, Kind, PUBLIC_KEY_FILE, PublicKey, parse_line};
use cxfed::client::AnalystClient;
use cxfed_protocol::wire::QueryRequest;
use cxfed_queries::schema::Table;

fn setup(dir: &Path) -> (std::path::PathBuf, u16) {
    let certs = dir.join("certs");
    cxfed::certs::dev("cx-crash", &["SSA".into()], &certs, 1, false).unwrap();
    let synth = dir.join("synth");
    let opts = cxfed::synth::SynthOptions {
        agency: "SSA".into(),
        people: 300,
        seed: 7,
    };
    cxfed::synth::write(&opts, &synth).unwrap();
    for t in Table::ALL {
        cxfed::ingest::ingest(
            &dir.join("data"),
            t,
            &synth.join(format!("{}.csv", t.name())),
            false,
        )
        .unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "federation = \"cx-crash\"\nagency = \"SSA\"\nlisten = \"127.0.0.1:{port}\"\n\
             data_dir = \"data\"\n\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/ssa/node.pem\"\n\
             key = \"certs/ssa/node.key\"\n\n[privacy]\nk = 5\nmode = \"k-only\"\n\n\
             [policy]\nrate_limit_per_minute = 100000\n\n[audit]\ncheckpoint_every = 7\n"
        ),
    )
    .unwrap();
    (config, port)
}

fn serve(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cxfed"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

async fn wait_ready(client: &reqwest::Client, url: &str) {
    let started = Instant::now();
    while client.get(format!("{url}/v1/health")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_query_storm_leaves_a_log_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (config, port) = setup(dir.path());
    let url = format!("https://127.0.0.1:{port}");
    let tls = |role: &str| cxfed::tls::TlsFiles {
        ca: dir.path().join("certs/ca.pem"),
        cert: dir.path().join(format!("certs/ssa/{role}.pem")),
        key: dir.path().join(format!("certs/ssa/{role}.key")),
        crl: Vec::new(),
    };
    let analyst = AnalystClient::new(&tls("analyst"), Duration::from_secs(10)).unwrap();
    let auditor = cxfed::client::http_client(&tls("auditor"), Duration::from_secs(10)).unwrap();

    let mut child = serve(&config);
    wait_ready(&analyst.http, &url).await;
    let storm: Vec<_> = (0..4)
        .map(|w| {
            let analyst = analyst.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for i in 0.. {
                    let sql = if (i + w) % 5 == 0 {
                        "SELECT person_id FROM experience"
                    } else {
                        "SELECT channel, COUNT(*) FROM experience GROUP BY channel"
                    };
                    match cxfed::client::send_query(&analyst, &url, &QueryRequest::new(sql)).await {
                        Ok(r) => answered.push(r.query_id),
                        Err(cxfed::client::QueryFailure::Refused(_)) => {}
                        Err(_) => break, // the node is gone
                    }
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut answered = Vec::new();
    for t in storm {
        answered.extend(t.await.unwrap());
    }
    assert!(answered.len() >= 3, "only {} answered", answered.len());

    // SIGKILL cannot tear one write(2) to a regular file on Linux; a power cut can. Leave the
    // torn line such a cut would.
    let log_path = dir.path().join("data").join(AUDIT_FILE);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":1000,\"ti").unwrap();
    drop(f);

    let mut child = serve(&config);
    wait_ready(&analyst.http, &url).await;
    let bytes = auditor
        .get(format!("{url}/v1/audit"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let key = PublicKey::parse(
        &std::fs::read_to_string(dir.path().join("data").join(PUBLIC_KEY_FILE)).unwrap(),
    )
    .unwrap();
    let verified = cxfed::auditor::verify(&bytes, &key, 0, None).unwrap();
    assert!(verified.checkpoints >= 2, "{verified:?}");
    let entries: Vec<_> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| parse_line(l).unwrap())
        .collect();
    let repairs: Vec<_> = entries.iter().filter(|e| e.kind == Kind::Repair).collect();
    assert_eq!(repairs.len(), 1);
    assert_eq!(repairs[0].dropped_bytes, Some(15));
    // Nothing that was answered is missing: the log is synced before an answer leaves.
    for q in &answered {
        assert!(
            entries.iter().any(|e| &e.query_id == q
                && e.endpoint == "/v1/query"
                && e.decision == Some(Decision::Executed)),
            "answered query {q} is not in the log"
        );
    }

    // A graceful stop closes the log on disk with a signed checkpoint after the last query.
    let sql = "SELECT COUNT(*) FROM experience";
    cxfed::client::send_query(&analyst, &url, &QueryRequest::new(sql))
        .await
        .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    let on_disk = std::fs::read(&log_path).unwrap();
    let v = cxfed::auditor::verify(&on_disk, &key, 0, None).unwrap();
    assert!(v.last_seq >= verified.last_seq + 3, "{v:?}");

    // Without its audit key, the node will not start on its log (a new key would sign
    // whatever the log now holds).
    let key_path = dir.path().join("data").join(cxfed::audit::KEY_FILE);
    std::fs::rename(&key_path, dir.path().join("key.aside")).unwrap();
    let out = run_to_exit(&config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("audit-signing.key is missing") && stderr.contains("has entries"),
        "{stderr}"
    );
    assert!(!key_path.exists(), "no new key was made");
    // Nor on a log with an edited line.
    std::fs::rename(dir.path().join("key.aside"), &key_path).unwrap();
    let text = String::from_utf8(on_disk).unwrap();
    let edited = text.replacen("GROUP BY channel", "GROUP BY state", 1);
    assert_ne!(edited, text);
    std::fs::write(&log_path, edited).unwrap();
    let out = run_to_exit(&config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the node will not append"), "{stderr}");
}

/// Runs `cxfed serve` expecting it to refuse to start; its output once it exits (at most 60 s).
fn run_to_exit(config: &Path) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cxfed"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("cxfed serve started on a log it must refuse");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
