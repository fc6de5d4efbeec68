//! End-to-end: `cxfed gateway` over a three-node federation, driven by real PostgreSQL clients —
//! Debian's `psql` (a federated query, a refused one with its SQLSTATE and the caret under
//! the SQL position, `\d experience`), Python's `psycopg` (a parameterised prepared statement)
//! and `pandas.read_sql` (a typed frame with `_ci95` intervals from a differentially private
//! federation); a wrong password refused; a non-loopback listen refused without the flag.
//! Every gateway query is checked in each node's audit log, signed by the analyst; catalog
//! queries must leave no trace there.
//!
//! `psql` comes from Debian's `postgresql-client`, psycopg and pandas from PyPI; `.ci/run`
//! installs them. Without them these tests fail under `CI` and are skipped (with a message)
//! elsewhere.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cxfed::gateway::{GatewayError, GatewayOptions, RunningGateway};
use cxfed::policy::DpSettings;
use cxfed_e2e::Fed;

const ANALYST: &str = "spiffe://cx-demo/SSA/analyst/ssa-analyst";

fn tool_missing(what: &str, probe: &mut Command) -> bool {
    let ok = probe.output().map(|o| o.status.success()).unwrap_or(false);
    if ok {
        return false;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing; .ci/run installs it");
    }
    eprintln!(
        "SKIPPED: {what} is not installed (apt-get install postgresql-client; pip install 'psycopg[binary]' pandas)"
    );
    true
}

fn no_psql() -> bool {
    tool_missing("psql", Command::new("psql").arg("--version"))
}

fn no_python_libs() -> bool {
    tool_missing(
        "python3 with psycopg and pandas",
        Command::new("python3").args(["-c", "import psycopg, pandas"]),
    )
}

fn options(fed: &Fed, dir: &Path) -> GatewayOptions {
    GatewayOptions {
        nodes: vec![fed.fed.url(0), fed.fed.url(1)],
        tls: fed.fed.tls("SSA", "analyst"),
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_public: false,
        password_file: Some(dir.join("gateway.pgpass")),
        epsilon: None,
        allow_partial: false,
        ci95_columns: true,
        timeout: Duration::from_secs(60),
    }
}

fn conninfo(gw: &RunningGateway) -> String {
    format!(
        "host=127.0.0.1 port={} dbname=cx user=ssa-analyst sslmode=disable",
        gw.addr.port()
    )
}

/// Runs psql (no .psqlrc, unaligned, stop on error) with the password file the gateway wrote.
async fn psql(gw: &RunningGateway, pgpass: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.env("PGPASSFILE", pgpass)
        .env_remove("PGPASSWORD")
        .arg("-X")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-d")
        .arg(conninfo(gw))
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Audit entries of node `i` whose SQL is `sql`.
async fn logged(fed: &Fed, i: usize, sql: &str) -> Vec<cxfed::audit::Entry> {
    fed.audit_log(i)
        .await
        .into_iter()
        .filter(|e| e.sql.as_deref() == Some(sql))
        .collect()
}

async fn assert_signed_everywhere(fed: &Fed, sql: &str) {
    for i in 0..3 {
        let entries = logged(fed, i, sql).await;
        assert!(!entries.is_empty(), "node {i} did not log {sql:?}");
        for e in &entries {
            assert_eq!(e.analyst, ANALYST, "node {i}: {e:?}");
            assert!(e.request.is_some(), "node {i} logged no signature: {e:?}");
        }
    }
}

/// How many queries (entries with SQL) each node logged; fetching the logs is logged too, so
/// entries are not simply counted.
async fn logged_queries(fed: &Fed) -> Vec<usize> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(
            fed.audit_log(i)
                .await
                .iter()
                .filter(|e| e.sql.is_some())
                .count(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_the_federation_sees_refusals_and_describes_tables_locally() {
    if no_psql() {
        return;
    }
    let fed = Fed::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = cxfed::gateway::start(options(&fed, dir.path()))
        .await
        .unwrap();
    let pgpass = dir.path().join("gateway.pgpass");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pgpass).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the password file is private");
        let line = std::fs::read_to_string(&pgpass).unwrap();
        assert!(
            line.ends_with(&format!(":{}\n", gw.password.expose())),
            "{line}"
        );
    }
    assert!(!format!("{gw:?}").contains(gw.password.expose()));

    // Catalog queries: answered by the gateway, nothing reaches any node.
    let before = logged_queries(&fed).await;
    let out = psql(&gw, &pgpass, &["-c", r"\d experience"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    assert!(stdout.contains("Table \"public.experience\""), "{stdout}");
    for line in ["response_date", "trust ", "survey_format", "negative_other"] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}");
    }
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("response_date"))
        .unwrap();
    assert!(row.contains("date") && row.contains("not null"), "{row}");
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("trust "))
        .unwrap();
    assert!(
        row.contains("smallint") && !row.contains("not null"),
        "{row}"
    );
    let out = psql(
        &gw,
        &pgpass,
        &[
            "-At",
            "-c",
            "SET application_name = 'excel'",
            "-c",
            "SHOW application_name",
            "-c",
            "SELECT version()",
            "-c",
            r"\dt",
            "-c",
            "SELECT table_name, column_name, data_type FROM information_schema.columns \
             WHERE table_name = 'operational' AND column_name = 'wait_minutes'",
        ],
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["SET", "excel"], "{stdout}");
    assert!(
        lines[2].starts_with("PostgreSQL 15.0 (cxfed gateway"),
        "{stdout}"
    );
    assert!(stdout.contains("public|experience|table|"), "{stdout}");
    assert!(stdout.contains("public|operational|table|"), "{stdout}");
    assert!(
        stdout.contains("operational|wait_minutes|integer"),
        "{stdout}"
    );
    assert_eq!(
        logged_queries(&fed).await,
        before,
        "a catalog query reached a node"
    );

    // A federated query: the same rows as `cxfed query`, the nodes' status as a NOTICE.
    let sql = "SELECT agency, COUNT(*) AS n FROM experience GROUP BY agency ORDER BY agency";
    let out = psql(&gw, &pgpass, &["-A", "-F", ",", "-c", sql]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let want = fed.query(sql).await.unwrap();
    // k-only: exact counts, so the interval column is there but NULL.
    let mut expected = vec!["agency,n,n_ci95".to_string()];
    for r in &want.rows {
        expected.push(format!("{},{},", r[0].as_str().unwrap(), r[1]));
    }
    expected.push(format!("({} rows)", want.rows.len()));
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stderr}");
    assert!(stderr.contains("NOTICE:  cxfed query "), "{stderr}");
    assert!(
        stderr.contains("privacy k-only") && stderr.contains("no ε spent"),
        "{stderr}"
    );
    for agency in ["SSA ok", "CMS ok", "OPM ok"] {
        assert!(
            stderr.contains(agency),
            "{agency} missing from the notice: {stderr}"
        );
    }
    assert_signed_everywhere(&fed, sql).await;

    // A refused query: SQLSTATE, code and reason, and psql's caret under the position.
    let bad = "SELECT COUNT(*) FROM experience WHERE person_id = 'x'";
    let out = psql(&gw, &pgpass, &["-v", "VERBOSITY=verbose", "-c", bad]).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ERROR:  42501: CXF-Q012 identifier-not-allowed"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("LINE 1: "))
        .unwrap_or_else(|| panic!("no LINE in {stderr}"));
    let caret = lines[at + 1].find('^').unwrap();
    assert_eq!(
        &lines[at][caret..caret + "person_id".len()],
        "person_id",
        "the caret points at the identifier: {stderr}"
    );
    // The refusal is in the coordinator's log, signed by the analyst.
    let entries = logged(&fed, 0, bad).await;
    assert!(
        entries
            .iter()
            .any(|e| e.analyst == ANALYST && e.request.is_some()),
        "{entries:?}"
    );

    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_statements_and_pandas_frames_with_intervals() {
    if no_python_libs() {
        return;
    }
    let fed = Fed::start_dp(2_000, DpSettings::DEFAULT).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = cxfed::gateway::start(options(&fed, dir.path()))
        .await
        .unwrap();
    let script = r#"
import json, sys, warnings
import psycopg, pandas
warnings.simplefilter("ignore")
conn = psycopg.connect(sys.argv[1], password=sys.argv[2], autocommit=False)
notices = []
conn.add_notice_handler(lambda d: notices.append(d.message_primary))
sql = ("SELECT agency, COUNT(*) AS n, AVG(trust) AS avg_trust FROM experience "
       "WHERE channel = %s AND trust >= %s GROUP BY agency ORDER BY agency")
out = {}
with conn.cursor() as cur:
    cur.execute(sql, ("website", 3), prepare=True)
    out["columns"] = [d.name for d in cur.description]
    out["types"] = [d.type_code for d in cur.description]
    out["rows"] = [[None if v is None else (v if isinstance(v, (int, float, str)) else str(v)) for v in r] for r in cur.fetchall()]
    try:
        bad = "SELECT COUNT(*) FROM experience WHERE person_id = %s"
        cur.execute(bad, ("x",))
    except psycopg.Error as e:
        pos = int(e.diag.statement_position)
        out["refused"] = [e.sqlstate, e.diag.message_primary, bad[pos - 1:pos - 1 + 9]]
conn.rollback()
frame = pandas.read_sql(
    "SELECT date_trunc('month', response_date) AS month, COUNT(*) AS n, AVG(satisfaction) AS sat "
    "FROM experience WHERE response_date >= %(since)s GROUP BY 1 ORDER BY 1",
    conn, params={"since": "2020-01-01"})
out["frame_dtypes"] = {c: str(t) for c, t in frame.dtypes.items()}
out["frame_rows"] = len(frame)
out["frame_ci_ok"] = bool((frame["n_ci95"] > 0).all() and (frame["sat_ci95"] > 0).all())
out["notices"] = notices
print(json.dumps(out))
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(conninfo(&gw))
        .arg(gw.password.expose());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        v["columns"],
        serde_json::json!(["agency", "n", "n_ci95", "avg_trust", "avg_trust_ci95"]),
        "{v}"
    );
    // text, int8, float8, float8, float8 (PostgreSQL type oids).
    assert_eq!(
        v["types"],
        serde_json::json!([25, 20, 701, 701, 701]),
        "{v}"
    );
    let rows = v["rows"].as_array().unwrap();
    assert!(!rows.is_empty(), "{v}");
    for r in rows {
        assert!(r[1].is_i64(), "{r}");
        assert!(
            r[2].as_f64().unwrap() > 0.0,
            "a noisy count has an interval: {r}"
        );
        let avg = r[3].as_f64().unwrap();
        assert!((3.0..=5.0).contains(&avg) || r[3].is_null(), "{r}");
    }
    assert_eq!(v["refused"][0], "42501", "{v}");
    assert!(
        v["refused"][1].as_str().unwrap().starts_with("CXF-Q012"),
        "{v}"
    );
    assert_eq!(v["refused"][2], "person_id", "the error position: {v}");
    // datetime64[ns] or [us], by pandas version.
    assert!(
        v["frame_dtypes"]["month"]
            .as_str()
            .unwrap()
            .starts_with("datetime64["),
        "{v}"
    );
    assert_eq!(v["frame_dtypes"]["n"], "int64", "{v}");
    assert_eq!(v["frame_dtypes"]["sat"], "float64", "{v}");
    assert_eq!(v["frame_dtypes"]["n_ci95"], "float64", "{v}");
    assert!(v["frame_rows"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["frame_ci_ok"], true, "{v}");
    let notices = v["notices"].as_array().unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.as_str().unwrap().contains("privacy dp")
                && n.as_str().unwrap().contains("ε=")),
        "{v}"
    );

    // What the nodes logged is the bound SQL, signed by the analyst.
    let bound = "SELECT agency, COUNT(*) AS n, AVG(trust) AS avg_trust FROM experience \
                 WHERE channel = 'website' AND trust >= 3 GROUP BY agency ORDER BY agency";
    assert_signed_everywhere(&fed, bound).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_wrong_password() {
    if no_psql() {
        return;
    }
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = cxfed::gateway::start(options(&fed, dir.path()))
        .await
        .unwrap();
    let wrong = dir.path().join("wrong.pgpass");
    std::fs::write(
        &wrong,
        format!("127.0.0.1:{}:*:*:not-the-password\n", gw.addr.port()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let before = logged_queries(&fed).await;
    let out = psql(
        &gw,
        &wrong,
        &[
            "-c",
            "SELECT agency, COUNT(*) FROM experience GROUP BY agency",
        ],
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("password"), "{stderr}");
    assert_eq!(logged_queries(&fed).await, before, "nothing was sent");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_non_loopback_listen_and_non_analyst_certificates() {
    let fed = Fed::start_with(300, Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&fed, dir.path());
    opts.listen = "0.0.0.0:0".parse().unwrap();
    let err = cxfed::gateway::start(opts.clone()).await.unwrap_err();
    assert!(matches!(err, GatewayError::NotLoopback(_)), "{err}");
    assert!(err.to_string().contains("--listen-public"), "{err}");

    let mut opts = options(&fed, dir.path());
    opts.tls = fed.fed.tls("SSA", "steward");
    let err = cxfed::gateway::start(opts).await.unwrap_err();
    assert!(matches!(err, GatewayError::NotAnalyst(_)), "{err}");

    let mut opts = options(&fed, dir.path());
    opts.nodes = vec!["http://127.0.0.1:7001".into()];
    let err = cxfed::gateway::start(opts).await.unwrap_err();
    assert!(matches!(err, GatewayError::BadNode(_)), "{err}");
}
