//! What an auditor does with logs fetched from nodes (`cxfed audit verify`, `cxfed audit
//! reconcile`): prove a log is whole and unaltered, re-check the analysts' signatures it holds,
//! and match every query a coordinator fanned out against the logs of the nodes it reached.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use cxfed_protocol::Identity;
use cxfed_protocol::wire::NodeState;

use crate::audit::{Entry, GENESIS, Kind, PublicKey, checkpoint_message, parse_line};
use crate::requests::{Received, RequestChecker};

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The node that wrote it.
    pub node: String,
    /// First and last sequence numbers.
    pub first_seq: u64,
    /// The last (a signed checkpoint).
    pub last_seq: u64,
    /// Time of the last checkpoint.
    pub head_time: String,
    /// Signed checkpoints seen.
    pub checkpoints: u64,
    /// Analyst signatures re-checked (with a CA).
    pub signatures_checked: u64,
}

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {seq}: {message}")]
pub struct Problem {
    /// The first bad sequence number.
    pub seq: u64,
    /// What is wrong, for a person.
    pub message: String,
}

fn problem(seq: u64, message: impl Into<String>) -> Problem {
    Problem {
        seq,
        message: message.into(),
    }
}

/// Verifies the bytes of a log (as fetched, or as on a node's disk) against the node's audit
/// public key: every line's hash, the chain from seq `since + 1` (from the genesis hash when
/// `since` is 0), every checkpoint's signature, and that the log ends with a signed checkpoint.
/// With `checker`, also re-checks every logged analyst signature against the SQL and privacy
/// parameters logged with it, and that every executed query or partial carries one.
pub fn verify(
    bytes: &[u8],
    key: &PublicKey,
    since: u64,
    checker: Option<&RequestChecker>,
) -> Result<Verified, Problem> {
    let mut prev: Option<Entry> = None;
    let mut node = String::new();
    let mut checkpoints = 0;
    let mut signatures_checked = 0;
    let mut last_checkpoint: Option<Entry> = None;
    let expected = |prev: &Option<Entry>| prev.as_ref().map_or(since + 1, |p| p.seq + 1);
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let want = expected(&prev);
        let Some(line) = line.strip_suffix(b"\n") else {
            return Err(problem(
                want,
                format!(
                    "the last line is torn ({} bytes without an end of line): the log was cut mid-write",
                    line.len()
                ),
            ));
        };
        let e = parse_line(line).map_err(|m| {
            // Name the seq the line claims when it can be read at all.
            let seq = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                .unwrap_or(want);
            problem(seq, m)
        })?;
        if node.is_empty() {
            node = e.node.clone();
        } else if e.node != node {
            return Err(problem(
                e.seq,
                format!("written by node {:?}, the log is {node:?}'s", e.node),
            ));
        }
        if e.seq != want {
            return Err(if e.seq > want {
                problem(
                    want,
                    format!("missing: the next entry is seq {} (entries deleted)", e.seq),
                )
            } else {
                problem(
                    e.seq,
                    format!(
                        "out of order after seq {} (inserted or reordered)",
                        want - 1
                    ),
                )
            });
        }
        let prev_hash = prev.as_ref().map(|p| p.hash.as_str());
        match prev_hash {
            Some(h) if e.prev_hash != h => {
                return Err(problem(
                    e.seq,
                    format!(
                        "does not chain to seq {}: one of them was altered, or an entry was \
                         replaced",
                        e.seq - 1
                    ),
                ));
            }
            None if since == 0 && e.prev_hash != GENESIS => {
                return Err(problem(
                    e.seq,
                    "the first entry does not start the chain (entries before it deleted)",
                ));
            }
            _ => {}
        }
        if e.kind == Kind::Checkpoint {
            let message = checkpoint_message(&e.node, e.seq, &e.time, &e.prev_hash);
            let signed = e
                .signature
                .as_deref()
                .is_some_and(|s| key.verifies(&message, s));
            if !signed {
                return Err(problem(
                    e.seq,
                    "checkpoint signature is not valid for this node's key (forged or altered)",
                ));
            }
            let canonical = crate::audit::canonical_checkpoint(&e)
                .map_err(|err| problem(e.seq, err.to_string()))?;
            if canonical.strip_suffix(b"\n") != Some(line) {
                return Err(problem(
                    e.seq,
                    "checkpoint line carries fields a checkpoint does not have (altered)",
                ));
            }
            checkpoints += 1;
            last_checkpoint = Some(e.clone());
        }
        if let Some(checker) = checker {
            signatures_checked += check_request(&e, checker)?;
        }
        prev = Some(e);
    }
    let Some(last) = prev else {
        return Err(problem(since + 1, "the log is empty"));
    };
    match last_checkpoint {
        Some(cp) if cp.seq == last.seq => Ok(Verified {
            node,
            first_seq: since + 1,
            last_seq: last.seq,
            head_time: cp.time,
            checkpoints,
            signatures_checked,
        }),
        cp => {
            let covered = cp.map_or(since, |c| c.seq);
            Err(problem(
                covered + 1,
                format!(
                    "entries {}..={} are not covered by a signed checkpoint: the log was \
                     truncated or altered after its last checkpoint (a running node's log must \
                     be fetched with `cxfed audit fetch`, which ends it with a checkpoint)",
                    covered + 1,
                    last.seq
                ),
            ))
        }
    }
}

/// Re-checks the analyst signature of one logged request; returns how many were checked.
fn check_request(e: &Entry, checker: &RequestChecker) -> Result<u64, Problem> {
    let data_endpoint = e.endpoint == "/v1/query" || e.endpoint == "/v1/partial";
    let executed = e.decision == Some(crate::audit::Decision::Executed);
    let (Some(sig), Some(sql)) = (&e.request, &e.sql) else {
        if data_endpoint && executed {
            return Err(problem(
                e.seq,
                "an executed query without an analyst signature",
            ));
        }
        return Ok(0);
    };
    let received = Received {
        signature: Some(sig),
        sql,
        epsilon: e.requested_epsilon,
        require_all: e.require_all.unwrap_or(true),
    };
    match checker.authenticate(received) {
        Ok(id) if id.to_string() == e.analyst => Ok(1),
        Ok(id) => Err(problem(
            e.seq,
            format!("logged for analyst {} but signed by {id}", e.analyst),
        )),
        // A refused forgery is logged as refused: that is the log doing its job.
        Err(_) if !executed => Ok(0),
        Err(r) => Err(problem(
            e.seq,
            format!("executed, but its analyst signature does not hold: {r}"),
        )),
    }
}

/// A checker for re-verifying logged requests: trusts `ca`, for the federation named by the
/// first signed request in `bytes`.
pub fn checker_for(bytes: &[u8], ca: &Path) -> Result<Option<RequestChecker>, String> {
    let federation = bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| parse_line(l).ok())
        .find_map(|e| e.request)
        .and_then(|sig| {
            let der = cxfed_protocol::signing::unhex(&sig.certificate)?;
            cxfed_protocol::identity::from_certificate_der(&der).ok()
        })
        .map(|id| id.federation().to_string());
    match federation {
        None => Ok(None),
        Some(f) => RequestChecker::new(ca, &f)
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// One disagreement between a coordinator's log and a node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The query.
    pub query_id: String,
    /// The coordinator's agency.
    pub coordinator: String,
    /// The node's agency.
    pub node: String,
    /// What disagrees.
    pub problem: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "query {} (coordinator {}, node {}): {}",
            self.query_id, self.coordinator, self.node, self.problem
        )
    }
}

/// What reconciling a directory of logs found.
#[derive(Debug, Clone, Default)]
pub struct Reconciliation {
    /// Nodes whose logs were read.
    pub nodes: Vec<String>,
    /// Coordinated queries checked.
    pub queries: u64,
    /// Node answers matched to a coordinator's record.
    pub matched: u64,
    /// Every disagreement.
    pub mismatches: Vec<Mismatch>,
}

/// Reads every `*.jsonl` log in `dir` (each line's hash is checked; run `verify` for the chain
/// and signatures) and reconciles them.
pub fn reconcile_dir(dir: &Path) -> Result<Reconciliation, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no *.jsonl audit logs", dir.display()));
    }
    let mut logs: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for (i, line) in bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
        {
            let e = parse_line(line).map_err(|m| format!("{}:{}: {m}", f.display(), i + 1))?;
            logs.entry(e.node.clone()).or_default().push(e);
        }
    }
    Ok(reconcile(&logs))
}

/// Reconciles logs by node agency: every node a coordinator's log says it asked must have
/// logged the same query, with the digest the coordinator received; every partial a node
/// answered for a coordinator whose log is present must be in that coordinator's log.
pub fn reconcile(logs: &BTreeMap<String, Vec<Entry>>) -> Reconciliation {
    let mut out = Reconciliation {
        nodes: logs.keys().cloned().collect(),
        ..Reconciliation::default()
    };
    // (node, query id) -> that node's partial entries.
    let mut partials: HashMap<(&str, &str), Vec<&Entry>> = HashMap::new();
    let mut coordinated: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (node, entries) in logs {
        for e in entries {
            if e.endpoint == "/v1/partial" && !e.query_id.is_empty() {
                partials
                    .entry((node.as_str(), e.query_id.as_str()))
                    .or_default()
                    .push(e);
            }
            if e.endpoint == "/v1/query" && !e.fanout.is_empty() {
                coordinated.insert((node.as_str(), e.query_id.as_str()));
            }
        }
    }
    let mut missing_logs = BTreeSet::new();
    for (coordinator, entries) in logs {
        for q in entries
            .iter()
            .filter(|e| e.endpoint == "/v1/query" && !e.fanout.is_empty())
        {
            out.queries += 1;
            for f in &q.fanout {
                let mismatch = |problem: String| Mismatch {
                    query_id: q.query_id.clone(),
                    coordinator: coordinator.clone(),
                    node: f.agency.clone(),
                    problem,
                };
                if !logs.contains_key(&f.agency) {
                    missing_logs.insert(f.agency.clone());
                    continue;
                }
                let found = partials
                    .get(&(f.agency.as_str(), q.query_id.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let Some(answer) = found.first() else {
                    if f.status != NodeState::Unreachable {
                        out.mismatches.push(mismatch(format!(
                            "the coordinator recorded the node as {} but the node has no record \
                             of the query",
                            state_name(f.status)
                        )));
                    }
                    continue;
                };
                if found.len() > 1 {
                    out.mismatches.push(mismatch(format!(
                        "the node answered the query {} times",
                        found.len()
                    )));
                }
                if f.digest != answer.digest {
                    out.mismatches.push(mismatch(format!(
                        "digests differ: the coordinator received {}, the node sent {}",
                        f.digest.as_deref().unwrap_or("nothing"),
                        answer.digest.as_deref().unwrap_or("nothing")
                    )));
                } else if q.request != answer.request {
                    out.mismatches.push(mismatch(
                        "the analyst signature the node logged differs from the coordinator's"
                            .into(),
                    ));
                } else {
                    out.matched += 1;
                }
            }
        }
    }
    // Partials answered for a coordinator whose log is here but which never recorded the query.
    for ((node, query_id), entries) in &partials {
        for e in entries {
            let Some(coordinator) = coordinator_agency(&e.peer) else {
                continue;
            };
            if logs.contains_key(&coordinator)
                && !coordinated.contains(&(coordinator.as_str(), query_id))
            {
                out.mismatches.push(Mismatch {
                    query_id: query_id.to_string(),
                    coordinator: coordinator.clone(),
                    node: node.to_string(),
                    problem: format!(
                        "the node {} a partial request from {} that the coordinator's log does \
                         not record",
                        match e.decision {
                            Some(crate::audit::Decision::Executed) => "answered",
                            _ => "refused",
                        },
                        e.peer
                    ),
                });
            }
        }
    }
    for node in missing_logs {
        out.mismatches.push(Mismatch {
            query_id: "*".into(),
            coordinator: "*".into(),
            node: node.clone(),
            problem: "coordinators sent it queries but its log is not in the directory".into(),
        });
    }
    out.mismatches.sort_by(|a, b| {
        (&a.coordinator, &a.query_id, &a.node).cmp(&(&b.coordinator, &b.query_id, &b.node))
    });
    out
}

/// The agency of the coordinator in a partial entry's `peer`: a node identity, or
/// `AGENCY (coordinator)` for a coordinator's own part.
fn coordinator_agency(peer: &str) -> Option<String> {
    if let Some(a) = peer.strip_suffix(" (coordinator)") {
        return Some(a.to_string());
    }
    Identity::parse_uri(peer)
        .ok()
        .map(|i| i.agency().to_string())
}

fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Ok => "ok",
        NodeState::Refused => "refused",
        NodeState::Error => "error",
        NodeState::Unreachable => "unreachable",
    }
}
