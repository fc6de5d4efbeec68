//! The docker-compose federation as stewards run it: the image built FROM scratch
//! (`node/compose/scratch-image.sh` with the test build of `cxfed`), `docker-compose.yml` and the
//! configs under `node/compose/` as shipped, queried from the host with `cxfed query`, and
//! faults across containers: a node killed mid-query, a node cut off the network, restarts, a
//! rolling restart under a stream of queries, a node's certificate rotated mid-stream (SIGHUP),
//! an analyst revoked (CRL, SIGHUP); after each, the audit logs verify, reconcile and the budget
//! ledgers have lost nothing.
//!
//! Needs a Docker engine with Compose. Without one the test says so and passes, except under
//! `CI` (then it fails). Each run uses its own compose project, image tag and ports, and
//! removes its containers, network, volumes and image at the end (also when it fails).
//! Figures (time to first answer, image size, recovery times) are printed as `figure:` lines.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cxfed");
const AGENCIES: [&str; 3] = ["ssa", "cms", "opm"];
/// `[query] timeout_secs` in node/compose/*.toml.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
const SQL: &str = "SELECT agency, COUNT(*) FROM experience GROUP BY agency";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever works; `None` without an engine.
fn compose_command() -> Option<Vec<String>> {
    let engine = Command::new("docker").arg("info").output().ok()?;
    if !engine.status.success() {
        return None;
    }
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    if v2.is_ok_and(|o| o.status.success()) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    let v1 = Command::new("docker-compose").arg("version").output();
    if v1.is_ok_and(|o| o.status.success()) {
        return Some(vec!["docker-compose".into()]);
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One compose project of this test run; `down -v` and the image removed on drop.
struct Project {
    compose: Vec<String>,
    name: String,
    image: String,
    ports: [u16; 3],
    dir: tempfile::TempDir,
}

impl Project {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(repo().join("docker-compose.yml"))
            .env("CXFED_IMAGE", &self.image)
            .env("CXFED_PEOPLE", "2000")
            .env("CXFED_BIND", "127.0.0.1")
            .env("CXFED_SSA_PORT", self.ports[0].to_string())
            .env("CXFED_CMS_PORT", self.ports[1].to_string())
            .env("CXFED_OPM_PORT", self.ports[2].to_string());
        c
    }

    fn container(&self, service: &str) -> String {
        let out = ok(self.cmd().args(["ps", "-a", "-q", service]));
        let id = out.trim().to_string();
        assert!(!id.is_empty(), "no container for service {service}");
        id
    }

    fn network(&self) -> String {
        format!("{}_federation", self.name)
    }

    fn url(&self, agency: &str) -> String {
        let i = AGENCIES.iter().position(|a| *a == agency).unwrap();
        format!("https://127.0.0.1:{}", self.ports[i])
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn tls_args(&self, agency: &str, role: &str) -> Vec<String> {
        let p = self.pki();
        vec![
            "--ca".into(),
            p.join("ca.pem").display().to_string(),
            "--cert".into(),
            p.join(agency)
                .join(format!("{role}.pem"))
                .display()
                .to_string(),
            "--key".into(),
            p.join(agency)
                .join(format!("{role}.key"))
                .display()
                .to_string(),
        ]
    }

    /// `docker inspect` health status of a service's container.
    fn health(&self, service: &str) -> String {
        let out = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.State.Health.Status}}",
            &self.container(service),
        ]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_healthy(&self, services: &[&str], limit: Duration) {
        let start = Instant::now();
        loop {
            let states: Vec<String> = services.iter().map(|s| self.health(s)).collect();
            if states.iter().all(|s| s == "healthy") {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "not healthy after {limit:?}: {services:?} = {states:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn logs(&self) -> String {
        let out = run(self.cmd().args(["logs", "--no-color", "--tail", "30"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything the services have logged, without terminal colour codes.
    fn all_logs(&self, services: &[&str]) -> String {
        let out = run(self.cmd().args(["logs", "--no-color"]).args(services));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// The analyst of SSA asks the SSA node (coordinator).
    fn query(&self, allow_partial: bool) -> Result<Value, String> {
        query_at(
            &self.url("ssa"),
            &self.tls_args("ssa", "analyst"),
            allow_partial,
        )
    }

    /// Polls until a complete answer comes back; returns the time it took.
    fn until_complete(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            match self.query(false) {
                Ok(v) if v["complete"] == Value::Bool(true) => return start.elapsed(),
                other => assert!(
                    start.elapsed() < limit,
                    "no complete answer within {limit:?}: last {other:?}\n{}",
                    self.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Queries charged to the SSA analyst on `agency`'s node (its steward asks).
    fn charged(&self, agency: &str) -> (u64, f64) {
        let mut c = Command::new(BIN);
        c.args(["budget", "--json", "--node", &self.url(agency)])
            .args(self.tls_args(agency, "steward"));
        let b: Value = serde_json::from_str(&ok(&mut c)).unwrap();
        b["analysts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["analyst"] == "spiffe://cx-demo/SSA/analyst/ssa-analyst")
            .map(|a| (a["queries"].as_u64().unwrap(), a["used"].as_f64().unwrap()))
            .unwrap_or((0, 0.0))
    }

    /// The node's audit public key, copied out of its data volume.
    fn audit_key(&self, agency: &str) -> PathBuf {
        let to = self.dir.path().join(format!("{agency}-audit-signing.pub"));
        ok(Command::new("docker")
            .arg("cp")
            .arg(format!(
                "{}:/data/{}",
                self.container(agency),
                cxfed::audit::PUBLIC_KEY_FILE
            ))
            .arg(&to));
        to
    }

    /// Fetches `agency`'s log as the SSA auditor, verifies it with the node's key and returns
    /// its entries.
    fn verified_log(&self, agency: &str, into: &Path) -> Vec<cxfed::audit::Entry> {
        std::fs::create_dir_all(into).unwrap();
        let file = into.join(format!("{}.jsonl", agency.to_uppercase()));
        let mut c = Command::new(BIN);
        c.args(["audit", "fetch", "--node", &self.url(agency)])
            .args(self.tls_args("ssa", "auditor"))
            .arg("--out")
            .arg(&file);
        ok(&mut c);
        let key = self.audit_key(agency);
        ok(Command::new(BIN)
            .args(["audit", "verify"])
            .arg(&file)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(self.pki().join("ca.pem")));
        std::fs::read(&file)
            .unwrap()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| cxfed::audit::parse_line(l).unwrap())
            .collect()
    }

    fn docker(&self, args: &[&str]) -> String {
        ok(Command::new("docker").args(args))
    }

    /// `docker compose run --rm --no-deps [-u USER] seed ARGS` (the seed service has the PKI and
    /// every node's TLS volume mounted read-write).
    fn seed_run(&self, user: Option<&str>, args: &[&str]) -> String {
        let mut c = self.cmd();
        c.args(["run", "--rm", "--no-deps"]);
        if let Some(u) = user {
            c.args(["-u", u]);
        }
        ok(c.arg("seed").args(args))
    }

    /// The serial of the certificate `agency`'s node presents to a new connection of the SSA
    /// steward; `Err` when the handshake fails.
    fn presented_serial(&self, agency: &str, role_of: (&str, &str)) -> Result<String, String> {
        let p = self.pki();
        let files = cxfed::tls::TlsFiles::new(
            p.join("ca.pem"),
            p.join(role_of.0).join(format!("{}.pem", role_of.1)),
            p.join(role_of.0).join(format!("{}.key", role_of.1)),
        );
        let url = format!("{}/v1/health", self.url(agency));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = cxfed::client::http_client(&files, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let resp = client
                .get(&url)
                .send()
                .await
                .map_err(|e| cxfed::client::error_chain(&e))?;
            let leaf = resp
                .extensions()
                .get::<reqwest::tls::TlsInfo>()
                .and_then(|t| t.peer_certificate())
                .ok_or("no peer certificate")?;
            Ok(cxfed::tls::serial_of(leaf))
        })
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let down = run(self
            .cmd()
            .args(["down", "-v", "--remove-orphans", "-t", "5"]));
        if !down.status.success() {
            eprintln!(
                "warning: compose down of {} failed: {}",
                self.name,
                String::from_utf8_lossy(&down.stderr)
            );
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// Pause between a stream's answered queries.
const STREAM_PACE: Duration = Duration::from_millis(250);

fn query_at(url: &str, tls: &[String], allow_partial: bool) -> Result<Value, String> {
    let mut c = Command::new(BIN);
    c.args([
        "query",
        "--format",
        "json",
        "--epsilon",
        "0.05",
        "--timeout",
        "40",
        "--node",
        url,
    ])
    .args(tls);
    if allow_partial {
        c.arg("--allow-partial");
    }
    let out = run(c.arg(SQL));
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| format!("not JSON: {e}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn node_state(answer: &Value, agency: &str) -> String {
    answer["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["agency"] == agency)
        .map(|n| n["status"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn query_ids(log: &[cxfed::audit::Entry]) -> BTreeSet<String> {
    log.iter()
        .filter(|e| !e.query_id.is_empty())
        .map(|e| e.query_id.clone())
        .collect()
}

/// Queries sent one after another from a thread until stopped: the ids answered in full.
struct Stream {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<u64>>,
    thread: std::thread::JoinHandle<()>,
}

impl Stream {
    fn start(url: String, tls: Vec<String>) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let (s, a, f) = (stop.clone(), answered.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match query_at(&url, &tls, false) {
                    Ok(v) => {
                        a.lock()
                            .unwrap()
                            .push(v["query_id"].as_str().unwrap().to_string());
                        // Paced, so that however fast the machine the whole test stays within
                        // each node's default budget (10 per analyst, 0.05 a query): a budget
                        // refusal is not a fault under test.
                        std::thread::sleep(STREAM_PACE);
                    }
                    Err(e) => {
                        let mut failed = f.lock().unwrap();
                        if *failed == 0 {
                            eprintln!("first failed query of the stream: {e}");
                        }
                        *failed += 1;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
        Stream {
            stop,
            answered,
            failed,
            thread,
        }
    }

    fn answered(&self) -> usize {
        self.answered.lock().unwrap().len()
    }

    fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        let a = self.answered.lock().unwrap().clone();
        let f = *self.failed.lock().unwrap();
        (a, f)
    }
}

#[test]
fn compose_federation_answers_and_survives_faults() {
    let Some(compose) = compose_command() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no Docker engine with Compose is reachable: the container tests cannot run"
        );
        eprintln!(
            "SKIPPED containers: no Docker engine with Compose reachable (docker info / docker compose version failed)"
        );
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("cxfedtest{}x{nanos}", std::process::id());
    let p = Project {
        compose,
        image: format!("cxfed-test:{name}"),
        name,
        ports: [free_port(), free_port(), free_port()],
        dir: tempfile::tempdir().unwrap(),
    };

    // The image, from nothing.
    ok(Command::new("bash")
        .arg(repo().join("node/compose/scratch-image.sh"))
        .arg(BIN)
        .arg(&p.image));
    let size: u64 = p
        .docker(&["image", "inspect", "-f", "{{.Size}}", &p.image])
        .trim()
        .parse()
        .unwrap();
    println!(
        "figure: image size {:.0} MB (debug binary)",
        size as f64 / 1e6
    );

    // `up` to the first answered query.
    let up = Instant::now();
    ok(p.cmd().args(["up", "-d", "--no-build"]));
    ok(Command::new("docker")
        .arg("cp")
        .arg(format!("{}:/pki", p.container("seed")))
        .arg(p.pki()));
    let first = loop {
        match p.query(false) {
            Ok(v) => break v,
            Err(e) => assert!(
                up.elapsed() < Duration::from_secs(120),
                "no answer within 120 s of up: {e}\n{}",
                p.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!(
        "figure: docker compose up to first answered query {:.1} s",
        up.elapsed().as_secs_f64()
    );
    assert_eq!(first["complete"], Value::Bool(true), "{first}");
    let agencies: BTreeSet<&str> = first["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(agencies, BTreeSet::from(["CMS", "OPM", "SSA"]), "{first}");
    p.wait_healthy(&AGENCIES, Duration::from_secs(90));
    let ps = ok(p.cmd().arg("ps"));
    assert_eq!(ps.matches("healthy").count(), 3, "{ps}");

    // Keys: read-only mounts, private key 0600, nothing but the node's own files.
    for a in AGENCIES {
        let id = p.container(a);
        let mounts: Value =
            serde_json::from_str(&p.docker(&["inspect", "-f", "{{json .Mounts}}", &id])).unwrap();
        let tls = mounts
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Destination"] == "/tls")
            .expect("a /tls mount");
        assert_eq!(tls["RW"], Value::Bool(false), "{a}: /tls must be read-only");
        let to = p.dir.path().join(format!("{a}-tls"));
        ok(Command::new("docker")
            .arg("cp")
            .arg(format!("{id}:/tls"))
            .arg(&to));
        let mut names: Vec<String> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "crl.pem", "node.key", "node.pem"], "{a}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(to.join("node.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{a}: node.key mode");
        }
        // The node runs as 10001 with no capabilities: it could only read a 0600 key it owns.
        let user = p.docker(&["inspect", "-f", "{{.Config.User}}", &id]);
        assert_eq!(user.trim(), "10001:10001", "{a}");
    }

    // 1. A node killed mid-query.
    let (cms_before, _) = p.charged("cms");
    let cms_log_before = query_ids(&p.verified_log("cms", &p.dir.path().join("kill-before")));
    let in_flight = {
        let (url, tls) = (p.url("ssa"), p.tls_args("ssa", "analyst"));
        std::thread::spawn(move || query_at(&url, &tls, false))
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    p.docker(&["kill", &p.container("cms")]);
    match in_flight.join().unwrap() {
        Ok(v) => assert_eq!(v["complete"], Value::Bool(true), "{v}"),
        Err(e) => assert!(e.contains("CMS"), "the failure must name CMS: {e}"),
    }
    let e = p.query(false).unwrap_err();
    assert!(
        e.contains("node CMS: unreachable"),
        "require_all must fail naming CMS unreachable: {e}"
    );
    let partial = p.query(true).unwrap();
    let partial_after = killed.elapsed();
    assert_eq!(partial["complete"], Value::Bool(false), "{partial}");
    assert_eq!(node_state(&partial, "CMS"), "unreachable", "{partial}");
    assert_eq!(node_state(&partial, "SSA"), "ok");
    assert_eq!(node_state(&partial, "OPM"), "ok");
    let rows: BTreeSet<&str> = partial["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(rows, BTreeSet::from(["OPM", "SSA"]), "{partial}");
    let restarted = Instant::now();
    p.docker(&["start", &p.container("cms")]);
    p.until_complete(Duration::from_secs(90));
    let back = restarted.elapsed();
    let cms_log_after = query_ids(&p.verified_log("cms", &p.dir.path().join("kill-after")));
    let (cms_after, _) = p.charged("cms");
    assert!(
        cms_log_before.is_subset(&cms_log_after),
        "CMS lost audit entries in the kill"
    );
    // The answer after the restart charged CMS once more; the in-flight one may have too.
    assert!(
        cms_after > cms_before && cms_after <= cms_before + 2,
        "CMS ledger: {cms_before} charged queries before the kill, {cms_after} after"
    );
    println!(
        "figure: node killed: partial answer {:.1} s after the kill, complete again {:.1} s after docker start (CMS audit {} -> {} query ids, ledger {} -> {} queries)",
        partial_after.as_secs_f64(),
        back.as_secs_f64(),
        cms_log_before.len(),
        cms_log_after.len(),
        cms_before,
        cms_after
    );

    // 2. A node cut off the network, reconnected and restarted.
    let opm = p.container("opm");
    let (opm_before, opm_used_before) = p.charged("opm");
    let opm_log_before = query_ids(&p.verified_log("opm", &p.dir.path().join("net-before")));
    p.docker(&["network", "disconnect", &p.network(), &opm]);
    let asked = Instant::now();
    let cut = p.query(true).unwrap();
    let took = asked.elapsed();
    assert_eq!(node_state(&cut, "OPM"), "unreachable", "{cut}");
    assert_eq!(cut["complete"], Value::Bool(false), "{cut}");
    assert!(
        took <= PEER_TIMEOUT + Duration::from_secs(5),
        "OPM reported unreachable after {took:?}, configured timeout {PEER_TIMEOUT:?}"
    );
    let e = p.query(false).unwrap_err();
    assert!(e.contains("node OPM: unreachable"), "{e}");
    p.docker(&["network", "connect", "--alias", "opm", &p.network(), &opm]);
    let reconnected = Instant::now();
    p.docker(&["restart", "-t", "10", &opm]);
    p.wait_healthy(&["opm"], Duration::from_secs(60));
    let opm_log_after = query_ids(&p.verified_log("opm", &p.dir.path().join("net-after")));
    let (opm_mid, opm_used_mid) = p.charged("opm");
    assert_eq!(
        (opm_mid, opm_used_mid),
        (opm_before, opm_used_before),
        "OPM's ledger must hold exactly what it held before it was cut off"
    );
    assert!(
        opm_log_before.is_subset(&opm_log_after),
        "OPM lost audit entries"
    );
    let back = p.until_complete(Duration::from_secs(60));
    assert!(
        p.charged("opm").0 > opm_before,
        "the answer again charged OPM"
    );
    println!(
        "figure: network disconnect: OPM unreachable after {:.1} s (timeout {} s); complete again {:.1} s after reconnect+restart (answer {:.1} s after healthy); ledger {} queries before and after",
        took.as_secs_f64(),
        PEER_TIMEOUT.as_secs(),
        reconnected.elapsed().as_secs_f64(),
        back.as_secs_f64(),
        opm_before
    );

    // 3. A rolling restart of every node under a steady stream of queries.
    let before: Vec<u64> = AGENCIES.iter().map(|a| p.charged(a).0).collect();
    let stream = Stream::start(p.url("ssa"), p.tls_args("ssa", "analyst"));
    let warm = Instant::now();
    while stream.answered() < 2 {
        assert!(
            warm.elapsed() < Duration::from_secs(60),
            "stream never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for a in AGENCIES {
        let t = Instant::now();
        let n = stream.answered();
        p.docker(&["restart", "-t", "10", &p.container(a)]);
        p.wait_healthy(&[a], Duration::from_secs(60));
        while stream.answered() <= n {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "no answer after restarting {a}\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "figure: rolling restart: {a} restarted, federation answering in full again {:.1} s after docker restart",
            t.elapsed().as_secs_f64()
        );
    }
    let (answered, failed) = stream.finish();
    let logs = p.dir.path().join("rolling");
    let mut keys = Vec::new();
    for (i, a) in AGENCIES.iter().enumerate() {
        let log = query_ids(&p.verified_log(a, &logs));
        for q in &answered {
            assert!(log.contains(q), "{a}'s log lacks answered query {q}");
        }
        let after = p.charged(a).0;
        assert!(
            after >= before[i] + answered.len() as u64,
            "{a}: ledger {} before, {after} after {} answered queries",
            before[i],
            answered.len()
        );
        keys.push(format!("{}={}", a.to_uppercase(), p.audit_key(a).display()));
    }
    let mut reconcile = Command::new(BIN);
    reconcile.args(["audit", "reconcile"]).arg(&logs);
    for k in &keys {
        reconcile.args(["--key", k]);
    }
    ok(&mut reconcile);
    println!(
        "figure: rolling restart: {} queries answered in full, {failed} refused or failed during restarts; audit reconcile clean",
        answered.len()
    );

    // 4. A rotated certificate mid-stream: CMS's node certificate renewed in its TLS volume
    //    (`cxfed certs renew`, as the nodes' user) and SIGHUP, under a stream of queries.
    let steward = ("cms", "steward");
    let old_serial = p.presented_serial("cms", steward).unwrap();
    let before: Vec<u64> = AGENCIES.iter().map(|a| p.charged(a).0).collect();
    let stream = Stream::start(p.url("ssa"), p.tls_args("ssa", "analyst"));
    let warm = Instant::now();
    while stream.answered() < 2 {
        assert!(
            warm.elapsed() < Duration::from_secs(60),
            "stream never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.seed_run(
        Some("10001:10001"),
        &[
            "certs",
            "renew",
            "--ca-dir",
            "/pki",
            "--cert",
            "/seed/cms/tls/node.pem",
            "--key",
            "/seed/cms/tls/node.key",
        ],
    );
    let cms_id = p.container("cms");
    let hup = Instant::now();
    p.docker(&["kill", "-s", "HUP", &cms_id]);
    let new_serial = loop {
        let s = p.presented_serial("cms", steward).unwrap();
        if s != old_serial {
            break s;
        }
        assert!(
            hup.elapsed() < Duration::from_secs(20),
            "CMS still presents its old certificate\n{}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rotated = hup.elapsed();
    let n = stream.answered();
    while stream.answered() < n + 3 {
        assert!(
            hup.elapsed() < Duration::from_secs(90),
            "no answers after the rotation\n{}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (answered, failed) = stream.finish();
    assert_eq!(failed, 0, "queries failed during the rotation");
    let logs = p.dir.path().join("rotated");
    for (i, a) in AGENCIES.iter().enumerate() {
        let log = query_ids(&p.verified_log(a, &logs));
        for q in &answered {
            assert!(log.contains(q), "{a}'s log lacks answered query {q}");
        }
        assert!(
            p.charged(a).0 >= before[i] + answered.len() as u64,
            "{a}: ledger lost queries"
        );
    }
    let cms_log = p.all_logs(&["cms"]);
    assert!(
        cms_log.contains("TLS files reloaded") && cms_log.contains(&new_serial),
        "{}",
        p.logs()
    );
    println!(
        "figure: rotated certificate mid-stream: CMS presents serial {new_serial} (was {old_serial}) {:.0} ms after SIGHUP; {} queries answered in full, 0 failed, every one in every log",
        rotated.as_secs_f64() * 1e3,
        answered.len()
    );

    // 5. A revoked analyst refused: the SSA analyst revoked in the PKI's CRL, seed re-run to
    //    copy it into every node's TLS volume, SIGHUP; the CMS analyst still answered in full.
    p.seed_run(
        None,
        &[
            "certs",
            "revoke",
            "--ca-dir",
            "/pki",
            "--reason",
            "key-compromise",
            "/pki/ssa/analyst.pem",
        ],
    );
    let seeded = p
        .cmd()
        .arg("run")
        .arg("--rm")
        .arg("--no-deps")
        .arg("seed")
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let ids: Vec<String> = AGENCIES.iter().map(|a| p.container(a)).collect();
    let hup = Instant::now();
    for id in &ids {
        p.docker(&["kill", "-s", "HUP", id]);
    }
    let mut refused = Vec::new();
    for a in AGENCIES {
        loop {
            if p.presented_serial(a, ("ssa", "analyst")).is_err() {
                refused.push(hup.elapsed());
                break;
            }
            assert!(
                hup.elapsed() < Duration::from_secs(20),
                "{a} still accepts the revoked analyst\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let e = p.query(false).unwrap_err();
    assert!(!e.is_empty());
    let other = query_at(&p.url("ssa"), &p.tls_args("cms", "analyst"), false).unwrap();
    assert_eq!(other["complete"], Value::Bool(true), "{other}");
    let log = p.all_logs(&AGENCIES);
    assert!(
        log.contains("refused client certificate") && log.contains("revoked=true"),
        "{}",
        p.logs()
    );
    println!(
        "figure: revoked analyst refused at the handshake by all 3 nodes {:.0} ms after SIGHUP; another analyst answered in full",
        refused.iter().max().unwrap().as_secs_f64() * 1e3
    );
}
