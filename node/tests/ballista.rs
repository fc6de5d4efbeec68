//! A node's partials on an Apache Ballista cluster (issue 23): a scheduler and two executors
//! embedded in the test on loopback ports, the same synthetic data ingested into a node whose
//! engine is that cluster and into a node that runs plans itself; the same queries must give
//! the same partials and the same answers, and a node whose cluster is down must keep serving.
#![cfg(feature = "ballista")]
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::array_value_to_string;

use cxfed::ballista::{ExecutorOptions, run_executor, run_scheduler};
use cxfed::client::{AnalystClient, QueryFailure, send_query};
use cxfed::config::{EngineConfig, SchedulerAddr};
use cxfed::engine::{Engine, node_context};
use cxfed::partial::{Charge, PartialError};
use cxfed::policy::{DpSettings, Policy, PolicyConfig};
use cxfed_protocol::wire::QueryRequest;
use cxfed_queries::schema::Table;
use cxfed_queries::validate::approve;

const AGENCY: &str = "SSA";

/// Real federation queries (tests/tests/federation.rs and node/src/examples.rs): GROUP BY,
/// COUNT(DISTINCT person_id), AVG, STDDEV / VARIANCE, FILTER, CASE, a join, HAVING, LIMIT.
const QUERIES: &[&str] = &[
    "SELECT COUNT(*) AS n, AVG(trust) AS t FROM experience",
    "SELECT agency, COUNT(*) AS n, AVG(trust), AVG(satisfaction) FROM experience GROUP BY agency ORDER BY agency",
    "SELECT life_experience, journey_stage, channel, COUNT(DISTINCT person_id) AS people, AVG(trust), AVG(satisfaction) FROM experience GROUP BY life_experience, journey_stage, channel ORDER BY life_experience, journey_stage, channel",
    "SELECT age_band, STDDEV(trust), VARIANCE(satisfaction), STDDEV_POP(ease), VAR_POP(efficiency) FROM experience GROUP BY age_band ORDER BY age_band",
    "SELECT agency, COUNT(*) FILTER (WHERE trust >= 4) AS agree, COUNT(trust) AS answered FROM experience GROUP BY agency ORDER BY agency",
    "SELECT channel, AVG(CASE WHEN trust >= 4 THEN 1.0 ELSE 0.0 END) AS trust_share FROM experience GROUP BY channel ORDER BY channel",
    "SELECT date_trunc('quarter', response_date) AS q, COUNT(*), AVG(trust) FROM experience GROUP BY date_trunc('quarter', response_date) ORDER BY q",
    "SELECT channel, COUNT(*) AS n FROM experience GROUP BY channel HAVING COUNT(*) > 50 ORDER BY n DESC, channel",
    "SELECT journey_stage, AVG(trust) AS t FROM experience GROUP BY journey_stage ORDER BY t DESC, journey_stage LIMIT 3",
    "SELECT outcome, COUNT(*), AVG(processing_days), STDDEV(processing_days) FROM operational GROUP BY outcome ORDER BY outcome",
    "SELECT agency, life_experience, COUNT(DISTINCT person_id) FROM operational GROUP BY agency, life_experience ORDER BY agency, life_experience",
    "SELECT o.channel, AVG(o.wait_minutes), AVG(e.satisfaction), STDDEV(e.trust) FROM experience e JOIN operational o ON e.case_id = o.case_id GROUP BY o.channel ORDER BY o.channel",
    "SELECT e.agency, AVG(e.satisfaction) FILTER (WHERE o.wait_minutes > 60) AS slow, AVG(e.satisfaction) FILTER (WHERE o.wait_minutes <= 15) AS fast FROM experience e JOIN operational o ON e.case_id = o.case_id WHERE o.wait_minutes IS NOT NULL GROUP BY e.agency ORDER BY e.agency",
    "SELECT journey_stage, channel, COUNT(DISTINCT person_id) AS people, ROUND(AVG(trust), 2) AS avg_trust FROM experience WHERE life_experience = 'approaching_retirement' AND journey_stage IN ('apply', 'decision') GROUP BY journey_stage, channel ORDER BY journey_stage, people DESC, channel",
];

/// dp-mode queries for the bounding path (the row plan streamed into the bounder), with a
/// percentile (answered in dp mode only).
const DP_QUERIES: &[&str] = &[
    "SELECT channel, COUNT(*), AVG(trust) FROM experience GROUP BY channel",
    "SELECT journey_stage, SUM(trust), STDDEV(satisfaction) FROM experience GROUP BY journey_stage",
    "SELECT channel, COUNT(*) AS cases, MEDIAN(wait_minutes) FROM operational WHERE wait_minutes IS NOT NULL GROUP BY channel",
    "SELECT age_band, COUNT(*) FILTER (WHERE trust >= 4) FROM experience GROUP BY age_band",
];

/// A scheduler and `executors` executors on loopback, inside this test's runtime.
async fn cluster(executors: usize) -> SchedulerAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(run_scheduler(listener, None, std::future::pending()));
    let scheduler = SchedulerAddr::parse(&format!("df://{addr}")).unwrap();
    start_executors(&scheduler, executors).await;
    scheduler
}

async fn start_executors(scheduler: &SchedulerAddr, n: usize) {
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = ExecutorOptions {
            scheduler: scheduler.clone(),
            advertise_host: None,
            work_dir: None,
            concurrent_tasks: 2,
            tls: None,
        };
        tokio::spawn(async move {
            if let Err(e) = run_executor(listener, opts, std::future::pending()).await {
                panic!("executor stopped: {e}");
            }
        });
    }
}

/// Synthetic data for one agency, written once and ingested into each of `dirs`.
fn ingest_same_data(work: &Path, dirs: &[&Path]) {
    let synth = work.join("synth");
    let opts = cxfed::synth::SynthOptions {
        agency: AGENCY.into(),
        people: 1500,
        seed: 23,
    };
    cxfed::synth::write(&opts, &synth).unwrap();
    for dir in dirs {
        for t in Table::ALL {
            cxfed::ingest::ingest(dir, t, &synth.join(format!("{}.csv", t.name())), false).unwrap();
        }
    }
}

fn policy(dp: bool) -> Policy {
    let mut p = Policy::resolve(&PolicyConfig::default(), AGENCY, &[], 5).unwrap();
    p.dp = dp.then_some(DpSettings {
        budget_epsilon: 1000.0,
        ..DpSettings::DEFAULT
    });
    p
}

/// Rows as text, sorted (the engines may return groups in any order); floats to 9
/// significant digits (sums of floats may add up in another order on the cluster).
fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        let s = array_value_to_string(c, r).unwrap();
                        match (c.data_type().is_floating(), s.parse::<f64>()) {
                            (true, Ok(x)) => format!("{x:.9e}"),
                            _ => s,
                        }
                    })
                    .collect(),
            );
        }
    }
    out.sort();
    out
}

struct Engines {
    local: Engine,
    cluster: Engine,
    _dirs: tempfile::TempDir,
    local_dir: PathBuf,
    cluster_dir: PathBuf,
}

async fn engines(scheduler: &SchedulerAddr) -> Engines {
    let dirs = tempfile::tempdir().unwrap();
    let (local_dir, cluster_dir) = (dirs.path().join("local"), dirs.path().join("cluster"));
    ingest_same_data(dirs.path(), &[&local_dir, &cluster_dir]);
    let no_tls = cxfed::tls::TlsFiles::new("-".into(), "-".into(), "-".into());
    let local = Engine::new(
        &EngineConfig::Local,
        &no_tls,
        node_context(&local_dir, 256 << 20).unwrap(),
    )
    .unwrap();
    let cluster = Engine::new(
        &EngineConfig::Ballista {
            scheduler: scheduler.clone(),
            tls: false,
        },
        &no_tls,
        node_context(&cluster_dir, 256 << 20).unwrap(),
    )
    .unwrap();
    assert_eq!(local.cluster(), None);
    assert_eq!(cluster.cluster(), Some(scheduler.to_string().as_str()));
    Engines {
        local,
        cluster,
        _dirs: dirs,
        local_dir,
        cluster_dir,
    }
}

async fn partial(
    engine: &Engine,
    dir: &Path,
    policy: &Policy,
    sql: &str,
    query_id: &str,
) -> Result<cxfed::partial::PartialOutput, PartialError> {
    let ledger = cxfed::ledger::Ledger::open(dir).unwrap();
    let charge = Charge {
        ledger: &ledger,
        analyst: "spiffe://cx-ballista/SSA/analyst/analyst",
        query_id,
        requested_epsilon: None,
    };
    let bounds = cxfed::row_bounds::RowBounds::new(dir);
    // No reuse of exact partials: every call must run on its engine.
    let exact = cxfed::exact_cache::ExactCache::new(0);
    let data = cxfed::partial::DataState {
        row_bounds: &bounds,
        exact: &exact,
    };
    cxfed::partial::run(engine, AGENCY, policy, sql, charge, data, None, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partials_on_a_ballista_cluster_equal_partials_run_in_the_node() {
    let scheduler = cluster(2).await;
    let e = engines(&scheduler).await;

    // k-only: the whole partial (people bounded or counted, groups and cells withheld) is
    // deterministic, so the bytes a node would send must decode to the same rows.
    let k_only = policy(false);
    for (i, sql) in QUERIES.iter().enumerate() {
        let id = format!("k{i}");
        let here = partial(&e.local, &e.local_dir, &k_only, sql, &id)
            .await
            .unwrap_or_else(|err| panic!("local: {sql}: {err}"));
        let there = partial(&e.cluster, &e.cluster_dir, &k_only, sql, &id)
            .await
            .unwrap_or_else(|err| panic!("ballista: {sql}: {err}"));
        let (a, b) = (
            cxfed::partial::decode(&here.ipc).unwrap(),
            cxfed::partial::decode(&there.ipc).unwrap(),
        );
        assert!(!a.batches.is_empty() && here.groups > 0, "{sql}: no groups");
        assert_eq!(
            a.batches[0].schema(),
            b.batches[0].schema(),
            "{sql}: partial schema"
        );
        assert_eq!(rows(&a.batches), rows(&b.batches), "{sql}");
        assert_eq!(
            (here.groups, here.suppressed_groups, here.suppressed_cells),
            (
                there.groups,
                there.suppressed_groups,
                there.suppressed_cells
            ),
            "{sql}: released and withheld"
        );
    }

    // dp: the noise differs from run to run, so the rows the bounding reads are compared (the
    // plan `execute_bounded` streams), then a whole dp partial is run on the cluster.
    let dp = policy(true);
    let settings = dp.dp.clone().unwrap();
    for (i, sql) in DP_QUERIES.iter().enumerate() {
        let approved = approve(&e.local.planner().state(), sql)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        let plan = approved.dp_partial(&settings.params(dp.k, None)).unwrap();
        let here = e.local.execute(plan.rows.clone()).await.unwrap();
        let there = e.cluster.execute(plan.rows.clone()).await.unwrap();
        assert!(!rows(&here).is_empty(), "{sql}: no rows to bound");
        assert_eq!(rows(&here), rows(&there), "{sql}: rows the bounding reads");
        let id = format!("dp{i}");
        let here = partial(&e.local, &e.local_dir, &dp, sql, &id)
            .await
            .unwrap();
        let there = partial(&e.cluster, &e.cluster_dir, &dp, sql, &id)
            .await
            .unwrap_or_else(|err| panic!("ballista dp: {sql}: {err}"));
        // Public vocabularies as keys: every group is released, noisy, on both.
        assert_eq!(here.groups, there.groups, "{sql}: dp groups");
        assert_eq!(here.epsilon, there.epsilon, "{sql}: ε spent");
    }

    // A file ingested while the cluster serves is in the next query's plan (the scheduler
    // keeps no file list from one query to the next, as the node does not).
    let count = || async {
        let plan = e
            .cluster
            .planner()
            .state()
            .create_logical_plan("SELECT COUNT(*) FROM experience")
            .await
            .unwrap();
        let b = e.cluster.execute(plan).await.unwrap();
        rows(&b)[0][0].parse::<u64>().unwrap()
    };
    let before = count().await;
    let more = e.local_dir.parent().unwrap().join("more");
    let opts = cxfed::synth::SynthOptions {
        agency: AGENCY.into(),
        people: 200,
        seed: 24,
    };
    cxfed::synth::write(&opts, &more).unwrap();
    let added = cxfed::ingest::ingest(
        &e.cluster_dir,
        Table::Experience,
        &more.join("experience.csv"),
        false,
    )
    .unwrap()
    .rows;
    assert!(added > 0);
    assert_eq!(count().await, before + added, "the new file is read");
}

/// Certificates, data and a node.toml for one single-node federation.
fn node_config(dir: &Path, certs: &Path, engine: &str) -> cxfed::config::NodeConfig {
    let text = format!(
        "federation = \"cx-ballista\"\nagency = \"{AGENCY}\"\nlisten = \"127.0.0.1:0\"\n\
         data_dir = \"data\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/ssa/node.pem\"\n\
         key = \"{c}/ssa/node.key\"\n\n[privacy]\nk = 5\nmode = \"k-only\"\n\n\
         [policy]\nrate_limit_per_minute = 100000\nquery_timeout_secs = 20\n\n{engine}\n",
        c = certs.display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    cxfed::config::NodeConfig::load(&path).unwrap()
}

async fn start(config: cxfed::config::NodeConfig) -> cxfed::server::RunningNode {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cxfed::server::start(config, Some(listener)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_serving_while_its_cluster_is_down_and_answers_as_a_local_node_once_it_is_up() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    cxfed::certs::dev("cx-ballista", &[AGENCY.into()], &certs, 1, false).unwrap();
    let (local_dir, cluster_dir) = (work.path().join("local"), work.path().join("cluster"));
    for d in [&local_dir, &cluster_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    ingest_same_data(
        work.path(),
        &[&local_dir.join("data"), &cluster_dir.join("data")],
    );
    // A port nothing listens on yet: the scheduler comes up there later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let local = start(node_config(&local_dir, &certs, "")).await;
    let cluster = start(node_config(
        &cluster_dir,
        &certs,
        &format!("[engine]\nkind = \"ballista\"\nscheduler = \"df://127.0.0.1:{port}\""),
    ))
    .await;
    let tls = cxfed::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join("ssa/analyst.pem"),
        key: certs.join("ssa/analyst.key"),
        crl: Vec::new(),
    };
    let analyst = AnalystClient::new(&tls, Duration::from_secs(60)).unwrap();
    let url = |n: &cxfed::server::RunningNode| format!("https://{}", n.addr);
    let sql = QUERIES[2];

    // Cluster down: the query fails, with the node named, and nothing panics; the node still
    // answers health checks, and refuses a bad query by its own rules as before.
    for _ in 0..2 {
        match send_query(&analyst, &url(&cluster), &QueryRequest::new(sql)).await {
            Err(QueryFailure::Refused(body)) => {
                eprintln!("cluster down: {}", cxfed::client::describe(&body));
                let states = format!("{:?}", body.nodes);
                assert!(states.contains(AGENCY), "{states}");
            }
            other => panic!("expected the partial to fail, got {other:?}"),
        }
    }
    let health = analyst
        .http
        .get(format!("{}/v1/health", url(&cluster)))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success(), "{}", health.status());
    match send_query(
        &analyst,
        &url(&cluster),
        &QueryRequest::new("SELECT person_id FROM experience"),
    )
    .await
    {
        Err(QueryFailure::Refused(body)) => assert_eq!(body.code, "CXF-Q005", "{body:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The cluster comes up on that port: the same node answers, as the local node does.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(run_scheduler(listener, None, std::future::pending()));
    start_executors(
        &SchedulerAddr::parse(&format!("df://127.0.0.1:{port}")).unwrap(),
        2,
    )
    .await;
    for sql in QUERIES {
        let want = send_query(&analyst, &url(&local), &QueryRequest::new(*sql))
            .await
            .unwrap_or_else(|e| panic!("local: {sql}: {e}"));
        let got = send_query(&analyst, &url(&cluster), &QueryRequest::new(*sql))
            .await
            .unwrap_or_else(|e| panic!("ballista: {sql}: {e}"));
        assert_eq!(got.columns, want.columns, "{sql}");
        assert_eq!(got.rows, want.rows, "{sql}");
        assert_eq!(
            (got.suppressed_groups, got.suppressed_cells),
            (want.suppressed_groups, want.suppressed_cells),
            "{sql}"
        );
    }
    local.shutdown().await;
    cluster.shutdown().await;
}

/// The files of `agency`'s node certificate under `certs` (from `certs dev`).
fn node_files(certs: &Path, agency: &str) -> cxfed::tls::TlsFiles {
    let lower = agency.to_lowercase();
    cxfed::tls::TlsFiles::new(
        certs.join("ca.pem"),
        certs.join(&lower).join("node.pem"),
        certs.join(&lower).join("node.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_answers_its_agency_and_refuses_other_certificates() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    cxfed::certs::dev(
        "cx-ballista",
        &["SSA".into(), "CMS".into()],
        &certs,
        1,
        false,
    )
    .unwrap();
    let foreign = work.path().join("foreign");
    cxfed::certs::dev("cx-ballista", &["SSA".into()], &foreign, 1, false).unwrap();
    let ssa = node_files(&certs, "SSA");
    let tls = cxfed::ballista::ClusterTls::load(&ssa).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(run_scheduler(
        listener,
        Some(tls.clone()),
        std::future::pending(),
    ));
    let scheduler = SchedulerAddr::parse(&format!("df://{addr}")).unwrap();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = ExecutorOptions {
            scheduler: scheduler.clone(),
            advertise_host: None,
            work_dir: None,
            concurrent_tasks: 2,
            tls: Some(tls.clone()),
        };
        tokio::spawn(async move {
            if let Err(e) = run_executor(listener, opts, std::future::pending()).await {
                panic!("executor stopped: {e}");
            }
        });
    }

    let data = work.path().join("data");
    ingest_same_data(work.path(), &[&data]);
    let engine = |files: &cxfed::tls::TlsFiles, tls: bool| {
        Engine::new(
            &EngineConfig::Ballista {
                scheduler: scheduler.clone(),
                tls,
            },
            files,
            node_context(&data, 256 << 20).unwrap(),
        )
        .unwrap()
    };
    let local = Engine::local(node_context(&data, 256 << 20).unwrap());
    let mut k_only = policy(false);
    k_only.query_timeout = Duration::from_secs(15);

    // The agency's own node certificate: answered, as in the node.
    let ssa_engine = engine(&ssa, true);
    for (i, sql) in QUERIES.iter().take(4).enumerate() {
        let id = format!("tls{i}");
        let here = partial(&local, &data, &k_only, sql, &id).await.unwrap();
        let there = partial(&ssa_engine, &data, &k_only, sql, &id)
            .await
            .unwrap_or_else(|e| panic!("over TLS: {sql}: {e}"));
        assert_eq!(
            rows(&cxfed::partial::decode(&here.ipc).unwrap().batches),
            rows(&cxfed::partial::decode(&there.ipc).unwrap().batches),
            "{sql}"
        );
    }

    // Another agency's node certificate (same CA), another CA's SSA certificate, and no TLS:
    // each refused, none hangs.
    let cms = node_files(&certs, "CMS");
    let other_ca = node_files(&foreign, "SSA");
    for (name, engine) in [
        ("CMS certificate", engine(&cms, true)),
        ("foreign CA", engine(&other_ca, true)),
        ("plain gRPC", engine(&ssa, false)),
    ] {
        let started = std::time::Instant::now();
        match partial(&engine, &data, &k_only, QUERIES[0], name).await {
            Err(PartialError::Query(e)) => {
                let e = e.to_string();
                eprintln!("{name}: {}", e.replace('\n', " | "));
                assert!(e.contains("Ballista cluster at"), "{name}: {e}");
            }
            other => panic!(
                "{name}: expected a refusal, got {:?}",
                other.map(|o| o.groups)
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(14),
            "{name}: refused only by the time limit"
        );
    }
}
