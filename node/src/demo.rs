//! `cxfed demo`: a whole three-agency federation on one machine, from nothing — certificates,
//! synthetic data, three nodes on loopback with real mTLS, a few Priority Life Experience
//! queries, and one refused query.

use crate::examples::{JOURNEY, QUERIES, REFUSED};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cxfed_protocol::wire::QueryRequest;
use cxfed_queries::schema::Table;

use crate::client::{QueryFailure, send_query};
use crate::config::{NodeConfig, Peer};
use crate::output::{Format, render};
use crate::policy::{DpSettings, Policy, PolicyConfig};
use crate::server::RunningNode;
use crate::tls::TlsFiles;

/// The agencies of the demo: the "approaching retirement" life experience.
pub const AGENCIES: [&str; 3] = ["SSA", "CMS", "OPM"];
/// The demo federation's name.
pub const FEDERATION: &str = "cx-demo";

/// Options of `cxfed demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to keep files (a temporary directory when `None`).
    pub dir: Option<PathBuf>,
    /// Keep serving after the queries.
    pub serve: bool,
    /// People per agency.
    pub people: usize,
    /// Every node's `[privacy] assume_honest_nodes` (`None`: all).
    pub assume_honest_nodes: Option<u64>,
    /// Whether public-key queries run under secure aggregation.
    pub secure_aggregation: bool,
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
#[error("demo: {0}")]
pub struct DemoError(String);

fn err(e: impl std::fmt::Display) -> DemoError {
    DemoError(e.to_string())
}

/// A federation running on loopback.
#[derive(Debug)]
pub struct LocalFederation {
    /// The nodes, in [`AGENCIES`] order.
    pub nodes: Vec<RunningNode>,
    /// Where certificates live.
    pub certs: PathBuf,
    /// Config files written for each node.
    pub configs: Vec<PathBuf>,
}

impl LocalFederation {
    /// The base URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.nodes[i].addr.port())
    }

    /// The TLS files of `role` at `agency`.
    pub fn tls(&self, agency: &str, role: &str) -> TlsFiles {
        let dir = self.certs.join(agency.to_lowercase());
        TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}.key")),
            crl: Vec::new(),
        }
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// The share of an agency's approaching-retirement people the demo also puts at the next
/// agency of the journey.
pub const DEMO_OVERLAP: f64 = 0.3;

/// Makes certificates and data for `agencies` under `dir` and starts one node each on a free
/// loopback port, each node configured with the others as peers.
pub async fn start_federation(
    dir: &Path,
    agencies: &[&str],
    people: usize,
    k: u64,
    timeout: Duration,
) -> Result<LocalFederation, DemoError> {
    start_federation_with(dir, agencies, people, k, timeout, None).await
}

/// Like [`start_federation`] (which runs `k-only` nodes), with differential privacy on every
/// node when `dp` is given.
pub async fn start_federation_with(
    dir: &Path,
    agencies: &[&str],
    people: usize,
    k: u64,
    timeout: Duration,
    dp: Option<DpSettings>,
) -> Result<LocalFederation, DemoError> {
    let certs = dir.join("certs");
    let owned: Vec<String> = agencies.iter().map(|a| a.to_string()).collect();
    crate::certs::dev(FEDERATION, &owned, &certs, 30, true).map_err(err)?;
    for (i, agency) in agencies.iter().enumerate() {
        let synth_dir = dir.join("synth").join(agency.to_lowercase());
        let data_dir = dir.join("data").join(agency.to_lowercase());
        let opts = crate::synth::SynthOptions {
            agency: agency.to_string(),
            people,
            seed: 1 + i as u64,
        };
        tokio::task::spawn_blocking(move || -> Result<(), DemoError> {
            crate::synth::write(&opts, &synth_dir).map_err(err)?;
            if data_dir.exists() {
                std::fs::remove_dir_all(&data_dir).map_err(err)?;
            }
            for table in Table::ALL {
                let file = synth_dir.join(format!("{}.csv", table.name()));
                crate::ingest::ingest(&data_dir, table, &file, false).map_err(err)?;
            }
            Ok(())
        })
        .await
        .map_err(err)??;
    }
    start_nodes(dir, agencies, k, timeout, dp).await
}

/// Like [`start_federation_with`], on linked populations of `journey`'s three agencies (`cxfed
/// synth --journeys`, `overlap` of each agency's people on the journey also at the next) with
/// a linkage key shared by the three and each agency's linkage values ingested.
pub async fn start_journey_federation(
    dir: &Path,
    journey: crate::synth::journeys::Journey,
    people: usize,
    overlap: f64,
    k: u64,
    timeout: Duration,
    dp: Option<DpSettings>,
) -> Result<LocalFederation, DemoError> {
    let agencies = journey.agencies();
    let certs = dir.join("certs");
    let owned: Vec<String> = agencies.iter().map(|a| a.to_string()).collect();
    crate::certs::dev(FEDERATION, &owned, &certs, 30, true).map_err(err)?;
    let synth = dir.join("synth");
    let data = dir.join("data");
    tokio::task::spawn_blocking(move || -> Result<(), DemoError> {
        let opts = crate::synth::journeys::JourneyOptions {
            journey,
            people,
            overlap,
            seed: 1,
        };
        crate::synth::journeys::write(&opts, &synth).map_err(err)?;
        let key = dir_key(&data)?;
        for agency in agencies {
            let from = synth.join(agency);
            let data_dir = data.join(agency.to_lowercase());
            for table in Table::ALL {
                let file = from.join(format!("{}.csv", table.name()));
                crate::ingest::ingest(&data_dir, table, &file, false).map_err(err)?;
            }
            let key_path = data_dir.join(crate::linkage::KEY_FILE);
            std::fs::copy(&key, &key_path).map_err(err)?;
            crate::linkage::ingest(&data_dir, &from.join("linkage.csv")).map_err(err)?;
        }
        Ok(())
    })
    .await
    .map_err(err)??;
    start_nodes(dir, &agencies, k, timeout, dp).await
}

/// A fresh linkage key for a federation's nodes, under `data` (each node gets a copy).
fn dir_key(data: &Path) -> Result<std::path::PathBuf, DemoError> {
    std::fs::create_dir_all(data).map_err(err)?;
    let key = data.join(crate::linkage::KEY_FILE);
    if !key.exists() {
        crate::linkage::keygen(&key).map_err(err)?;
    }
    Ok(key)
}

/// Starts one node per agency on a free loopback port over the data already under
/// `dir/data/<agency>`, each with the others as peers.
async fn start_nodes(
    dir: &Path,
    agencies: &[&str],
    k: u64,
    timeout: Duration,
    dp: Option<DpSettings>,
) -> Result<LocalFederation, DemoError> {
    let certs = dir.join("certs");
    let listeners: Vec<std::net::TcpListener> = agencies
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let mut nodes = Vec::new();
    let mut configs = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let agency = agencies[i];
        let lower = agency.to_lowercase();
        let peers: Vec<Peer> = agencies
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, a)| Peer {
                agency: a.to_string(),
                url: format!("https://127.0.0.1:{}", ports[j]),
            })
            .collect();
        let peer_agencies: Vec<&str> = peers.iter().map(|p| p.agency.as_str()).collect();
        let mut policy = Policy::resolve(&PolicyConfig::default(), agency, &peer_agencies, k)
            .map_err(|(f, m)| err(format!("{f}: {m}")))?;
        policy.dp = dp.clone();
        let config = NodeConfig {
            policy,
            source: None,
            federation: FEDERATION.into(),
            agency: agency.into(),
            listen: format!("127.0.0.1:{}", ports[i]).parse().map_err(err)?,
            data_dir: dir.join("data").join(&lower),
            tls: TlsFiles {
                ca: certs.join("ca.pem"),
                cert: certs.join(&lower).join("node.pem"),
                key: certs.join(&lower).join("node.key"),
                crl: Vec::new(),
            },
            peers,
            k,
            timeout,
            cache_mb: crate::exact_cache::DEFAULT_CACHE_MB,
            journey_timeout: Duration::from_secs(crate::config::DEFAULT_JOURNEY_TIMEOUT_SECS),
            audit_checkpoint_every: crate::audit::DEFAULT_CHECKPOINT_EVERY,
            engine: crate::config::EngineConfig::Local,
        };
        // Written and read back, so the node watches its own file like `cxfed serve` does.
        let path = dir.join(format!("{lower}.toml"));
        std::fs::write(&path, config.render()).map_err(err)?;
        let config = NodeConfig::load(&path).map_err(err)?;
        configs.push(path);
        nodes.push(
            crate::server::start(config, Some(listener))
                .await
                .map_err(err)?,
        );
    }
    Ok(LocalFederation {
        nodes,
        certs,
        configs,
    })
}

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let started = Instant::now();
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(err)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("cxfed-demo-")
                .tempdir()
                .map_err(err)?;
            temp.path().to_path_buf()
        }
    };
    println!(
        "cxfed demo: federation {FEDERATION} with {} in {}",
        AGENCIES.join(", "),
        dir.display()
    );
    println!(
        "  making certificates, {} synthetic people per agency (on the retirement journey, {:.0}% of an agency's approaching-retirement people also at the next, linked by synthetic SSNs), and starting three mTLS nodes...",
        opts.people,
        DEMO_OVERLAP * 100.0
    );
    let dp = DpSettings {
        assume_honest_nodes: opts.assume_honest_nodes,
        secure_aggregation: opts.secure_aggregation,
        ..DpSettings::DEFAULT
    };
    // The three agencies of the retirement journey, sharing people and a linkage key.
    let fed = start_journey_federation(
        &dir,
        crate::synth::journeys::Journey::Retirement,
        opts.people,
        DEMO_OVERLAP,
        crate::config::DEFAULT_K,
        Duration::from_secs(60),
        Some(dp.clone()),
    )
    .await?;
    for (i, a) in AGENCIES.iter().enumerate() {
        println!(
            "  node {a:<4} {}  data {}",
            fed.url(i),
            dir.join("data").join(a.to_lowercase()).display()
        );
    }
    println!(
        "  ready in {:.1} s; every node: k = {}, differential privacy ε = {} per query (budget {} per analyst per {} days), δ = {}\n",
        started.elapsed().as_secs_f64(),
        crate::config::DEFAULT_K,
        dp.epsilon_per_query,
        dp.budget_epsilon,
        dp.budget_period.as_secs() / 86_400,
        dp.delta
    );

    let analyst = fed.tls("SSA", "analyst");
    let client =
        crate::client::AnalystClient::new(&analyst, Duration::from_secs(120)).map_err(err)?;
    let coordinator = fed.url(0);
    for (title, sql) in QUERIES.iter().chain(std::iter::once(&JOURNEY)) {
        println!("── {title}\n{}\n", indent(sql));
        let t = Instant::now();
        // A journey names its ε: both of its nodes spend exactly that.
        let req =
            QueryRequest::new(*sql).epsilon((*sql == JOURNEY.1).then_some(dp.epsilon_per_query));
        let resp = send_query(&client, &coordinator, &req).await.map_err(err)?;
        print!("{}", render(&resp, Format::Table));
        println!("({} ms)\n", t.elapsed().as_millis());
    }
    let (title, sql) = REFUSED;
    println!("── {title}\n{}\n", indent(sql));
    match send_query(&client, &coordinator, &QueryRequest::new(sql)).await {
        Err(QueryFailure::Refused(body)) => {
            println!("refused, as it must be: {}\n", QueryFailure::Refused(body))
        }
        Ok(_) => {
            return Err(DemoError(
                "the identifier query was answered; refusing to continue".into(),
            ));
        }
        Err(e) => return Err(err(e)),
    }

    audit_federation(&fed, &dir).await?;

    if opts.serve {
        let consoles = start_consoles(&fed, &dir).await?;
        println!("Web consoles (open a URL in a browser on this machine):");
        for c in &consoles {
            println!("  {:<8} {}", c.role.as_str(), c.url);
        }
        println!();
        let c = fed.tls("SSA", "analyst");
        println!("The federation keeps running (Ctrl-C to stop). Query it as the SSA analyst:\n");
        println!(
            "  cxfed query --node {coordinator} --ca {} --cert {} --key {} \\\n    \"SELECT agency, COUNT(*) AS responses, AVG(trust) FROM experience GROUP BY agency\"\n",
            c.ca.display(),
            c.cert.display(),
            c.key.display()
        );
        println!(
            "Node configs: {}",
            fed.configs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        crate::shutdown::shutdown_signal().await;
        for c in consoles {
            c.shutdown().await;
        }
    }
    fed.shutdown().await;
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One console per role of SSA's people: the analyst and the steward talk to SSA's node, the
/// auditor to every node, with every node's audit key.
pub async fn start_consoles(
    fed: &LocalFederation,
    dir: &Path,
) -> Result<Vec<crate::console::RunningConsole>, DemoError> {
    let mut out = Vec::new();
    for role in ["analyst", "steward", "auditor"] {
        let auditor = role == "auditor";
        let nodes = if auditor {
            (0..fed.nodes.len()).map(|i| fed.url(i)).collect()
        } else {
            vec![fed.url(0)]
        };
        let audit_keys = if auditor {
            AGENCIES
                .iter()
                .map(|a| {
                    let key = dir.join("data").join(a.to_lowercase());
                    (a.to_string(), key.join(crate::audit::PUBLIC_KEY_FILE))
                })
                .collect()
        } else {
            Vec::new()
        };
        out.push(
            crate::console::start(crate::console::ConsoleOptions {
                nodes,
                tls: fed.tls("SSA", role),
                listen: ([127, 0, 0, 1], 0).into(),
                listen_public: false,
                audit_keys,
            })
            .await
            .map_err(err)?,
        );
    }
    Ok(out)
}

/// Fetches every node's audit log as the SSA auditor, verifies each against the node's audit
/// key, and reconciles them; prints what an auditor would see.
async fn audit_federation(fed: &LocalFederation, dir: &Path) -> Result<(), DemoError> {
    println!("── Audit: every node's log fetched by the SSA auditor, verified and reconciled\n");
    let auditor = crate::client::http_client(&fed.tls("SSA", "auditor"), Duration::from_secs(60))
        .map_err(err)?;
    let out = dir.join("audit");
    std::fs::create_dir_all(&out).map_err(err)?;
    let mut keys = std::collections::BTreeMap::new();
    for (i, agency) in AGENCIES.iter().enumerate() {
        let lower = agency.to_lowercase();
        let fetched = crate::client::fetch_audit(&auditor, &fed.url(i), 0, FEDERATION)
            .await
            .map_err(DemoError)?;
        if fetched.served_by.agency() != *agency {
            return Err(DemoError(format!(
                "{} served {}'s log URL",
                fetched.served_by, agency
            )));
        }
        let bytes = fetched.bytes;
        let key_file = dir
            .join("data")
            .join(&lower)
            .join(crate::audit::PUBLIC_KEY_FILE);
        let key = std::fs::read_to_string(&key_file)
            .map_err(err)
            .and_then(|t| crate::audit::PublicKey::parse(&t).map_err(err))?;
        let path = out.join(format!("{lower}.jsonl"));
        crate::storage::write_atomic(&path, &bytes, false).map_err(err)?;
        match crate::auditor::verify(&bytes, &key, 0, None) {
            Ok(v) => println!(
                "  {agency:<4} log verifies: seq 1..={}, {} signed checkpoint(s), head {}",
                v.last_seq,
                v.checkpoints,
                v.head()
            ),
            Err(p) => return Err(DemoError(format!("{agency}'s audit log: {p}"))),
        }
        keys.insert(agency.to_string(), key);
    }
    let r = crate::auditor::reconcile_dir_with(&out, &keys).map_err(DemoError)?;
    println!(
        "  reconciled: {} coordinated queries, {} node answers matched, {} mismatches (logs in {})\n",
        r.queries,
        r.matched,
        r.mismatches.len(),
        out.display()
    );
    if let Some(m) = r.mismatches.first() {
        return Err(DemoError(format!("audit reconciliation: {m}")));
    }
    Ok(())
}

fn indent(sql: &str) -> String {
    sql.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
