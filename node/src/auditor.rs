//! What an auditor does with logs fetched from nodes (`cxfed audit verify`, `cxfed audit
//! reconcile`): prove a log is whole and unaltered (and, given the head seen at an earlier
//! fetch, that it was not cut back or rewritten since), check that the node accepted no replayed
//! or stale request, re-check the analysts' signatures it holds, and match every query a
//! coordinator fanned out against the logs of the nodes it reached.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use cxfed_protocol::Identity;
use cxfed_protocol::wire::NodeState;

pub use crate::audit::Problem;
use crate::audit::{Chain, Decision, Entry, Kind, PublicKey, parse_line, problem};
use crate::requests::{FRESHNESS_SECS, NonceKey, Received, RequestChecker, nonce_key};

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
    /// Hash of the last checkpoint line.
    pub head_hash: String,
    /// Signed checkpoints seen.
    pub checkpoints: u64,
    /// Analyst signatures re-checked (with a CA).
    pub signatures_checked: u64,
}

impl Verified {
    /// The head to keep for the next fetch (`--prev`).
    pub fn head(&self) -> Head {
        Head {
            seq: self.last_seq,
            hash: self.head_hash.clone(),
        }
    }
}

/// A position in a node's log an auditor has seen: the seq and hash of its entry, written
/// `SEQ:HASH` (what `cxfed audit verify` and `cxfed audit fetch` print).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The sequence number.
    pub seq: u64,
    /// The entry's hash (64 hex digits).
    pub hash: String,
}

impl std::str::FromStr for Head {
    type Err = String;

    fn from_str(s: &str) -> Result<Head, String> {
        let bad = || format!("{s:?}: expected SEQ:HASH (as `cxfed audit verify` prints the head)");
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        let hex_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(bad());
        }
        Ok(Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// How to verify a log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// The log was fetched with `--since` this seq (0: from the start).
    pub since: u64,
    /// The head an auditor saw before: the log must contain that entry with that hash (or, when
    /// it is seq `since`, start right after it).
    pub prev: Option<&'a Head>,
    /// Re-check every logged analyst signature with this checker.
    pub checker: Option<&'a RequestChecker>,
}

/// Verifies the bytes of a log (as fetched, or as on a node's disk) against the node's audit
/// public key: every line's hash, the chain from seq `since + 1` (from the genesis hash when
/// `since` is 0), every checkpoint's signature, and that the log ends with a signed checkpoint;
/// that no executed request repeats the nonce of an earlier one, was stale when the node checked
/// it, or came through another coordinator than the one the analyst signed for. With `checker`,
/// also re-checks every logged analyst signature against the SQL and privacy parameters logged
/// with it, and that every executed query or partial carries one.
pub fn verify(
    bytes: &[u8],
    key: &PublicKey,
    since: u64,
    checker: Option<&RequestChecker>,
) -> Result<Verified, Problem> {
    verify_with(
        bytes,
        key,
        &Options {
            since,
            prev: None,
            checker,
        },
    )
}

/// [`verify`], and with `options.prev` also that the log still holds the head an auditor saw
/// before: a log cut back to an older checkpoint, or rewritten after it, fails.
pub fn verify_with(
    bytes: &[u8],
    key: &PublicKey,
    options: &Options<'_>,
) -> Result<Verified, Problem> {
    let since = options.since;
    if let Some(p) = options.prev
        && p.seq < since
    {
        return Err(problem(
            since + 1,
            format!(
                "the previous head (seq {}) is before this log's first entry (seq {}): fetch \
                 with --since {} or less to check it",
                p.seq,
                since + 1,
                p.seq
            ),
        ));
    }
    let mut chain = Chain::new(key, since, None);
    let mut trail = Trail::default();
    let mut signatures_checked = 0;
    let mut last: Option<Entry> = None;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            return Err(problem(
                chain.next_seq(),
                format!(
                    "the last line is torn ({} bytes without an end of line): the log was cut mid-write",
                    line.len()
                ),
            ));
        };
        let e = chain.push(line)?;
        if let Some(p) = options.prev {
            if p.seq == since && e.seq == since + 1 && e.prev_hash != p.hash {
                return Err(problem(
                    e.seq,
                    format!(
                        "does not follow the head seen before ({p}): the log was rewritten from \
                         there"
                    ),
                ));
            }
            if e.seq == p.seq && e.hash != p.hash {
                return Err(problem(
                    e.seq,
                    format!(
                        "is not the entry seen before at this seq ({p}): the log was rewritten"
                    ),
                ));
            }
        }
        trail.check(&e)?;
        if let Some(checker) = options.checker {
            signatures_checked += check_request(&e, checker)?;
        }
        last = Some(e);
    }
    let Some(last) = last else {
        return Err(problem(since + 1, "the log is empty"));
    };
    if let Some(p) = options.prev
        && p.seq > last.seq
    {
        return Err(problem(
            last.seq + 1,
            format!(
                "the log ends at seq {} but seq {} was seen before ({p}): the log was cut back",
                last.seq, p.seq
            ),
        ));
    }
    match chain.last_checkpoint() {
        Some(cp) if cp.seq == last.seq => Ok(Verified {
            node: chain.node().unwrap_or_default().to_string(),
            first_seq: since + 1,
            last_seq: last.seq,
            head_time: cp.time.clone(),
            head_hash: cp.hash.clone(),
            checkpoints: chain.checkpoints(),
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

/// Checks that `bytes` (a log fetched with `--since since`) still holds `prev`, without
/// checking signatures (what `cxfed audit fetch --prev` checks before writing the file).
pub fn check_prev(bytes: &[u8], since: u64, prev: &Head) -> Result<(), Problem> {
    let entries: Vec<Entry> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| parse_line(l).map_err(|m| problem(0, m)))
        .collect::<Result<_, _>>()?;
    if prev.seq == since {
        return match entries.first() {
            Some(e) if e.prev_hash != prev.hash => Err(problem(
                e.seq,
                format!("does not follow the head seen before ({prev}): the log was rewritten"),
            )),
            _ => Ok(()),
        };
    }
    match entries.iter().find(|e| e.seq == prev.seq) {
        Some(e) if e.hash == prev.hash => Ok(()),
        Some(e) => Err(problem(
            e.seq,
            format!("is not the entry seen before at this seq ({prev}): the log was rewritten"),
        )),
        None => {
            let last = entries.last().map_or(since, |e| e.seq);
            Err(problem(
                last + 1,
                if prev.seq > last {
                    format!(
                        "the log ends at seq {last} but seq {} was seen before: the log was cut back",
                        prev.seq
                    )
                } else {
                    format!(
                        "seq {} is not in this log (it starts after seq {since})",
                        prev.seq
                    )
                },
            ))
        }
    }
}

/// What a verified log says about the requests a node accepted.
#[derive(Default)]
struct Trail {
    /// Every nonce a line used up: the first line's seq, query id and endpoint.
    used: HashMap<NonceKey, (u64, String, String)>,
}

impl Trail {
    fn check(&mut self, e: &Entry) -> Result<(), Problem> {
        let Some(sig) = e.accepted_request() else {
            return Ok(());
        };
        let executed = e.decision == Some(Decision::Executed);
        let data = e.endpoint == "/v1/query" || e.endpoint == "/v1/partial";
        if executed && data {
            check_fresh(e, sig.issued_at)?;
            // Version-1 signatures named no coordinator.
            if !sig.coordinator.is_empty() {
                let came_through = if e.endpoint == "/v1/query" {
                    Some(e.node.clone())
                } else {
                    coordinator_agency(&e.peer)
                };
                if came_through.as_deref() != Some(sig.coordinator.as_str()) {
                    return Err(problem(
                        e.seq,
                        format!(
                            "executed a request the analyst signed for coordinator {} that came \
                             from {} (the node accepted a request replayed by another node)",
                            sig.coordinator,
                            came_through.as_deref().unwrap_or(&e.peer)
                        ),
                    ));
                }
            }
        }
        let key = nonce_key(sig);
        if let Some((seq, query_id, endpoint)) = self.used.get(&key) {
            // A coordinator's own part shares its query's nonce (same query id, the other endpoint).
            let same_request = *query_id == e.query_id && *endpoint != e.endpoint;
            if executed && !same_request {
                return Err(problem(
                    e.seq,
                    format!(
                        "executed a request whose nonce {} seq {seq} had already used (the node \
                         accepted a replay)",
                        sig.nonce
                    ),
                ));
            }
        } else {
            self.used
                .insert(key, (e.seq, e.query_id.clone(), e.endpoint.clone()));
        }
        Ok(())
    }
}

/// An executed request must have been fresh when the node checked it: its `issued_at` within
/// the freshness window of `received_at` (lines of older nodes, without it: of the line's time),
/// and not checked after the line was written.
fn check_fresh(e: &Entry, issued_at: i64) -> Result<(), Problem> {
    let logged_at = chrono::DateTime::parse_from_rfc3339(&e.time)
        .map(|t| t.timestamp())
        .map_err(|err| problem(e.seq, format!("unreadable time {:?}: {err}", e.time)))?;
    let checked_at = e.received_at.unwrap_or(logged_at);
    if checked_at > logged_at + 1 {
        return Err(problem(
            e.seq,
            format!("received at {checked_at}, after it was logged ({})", e.time),
        ));
    }
    let skew = checked_at.checked_sub(issued_at).map(i64::unsigned_abs);
    if skew.is_none_or(|d| d > FRESHNESS_SECS as u64) {
        return Err(problem(
            e.seq,
            format!(
                "executed a request signed at {issued_at} that the node checked at {checked_at}, \
                 outside the {FRESHNESS_SECS} s window (the node accepted a stale request)"
            ),
        ));
    }
    Ok(())
}

/// Re-checks the analyst signature of one logged request; returns how many were checked.
fn check_request(e: &Entry, checker: &RequestChecker) -> Result<u64, Problem> {
    let data_endpoint = e.endpoint == "/v1/query" || e.endpoint == "/v1/partial";
    let executed = e.decision == Some(Decision::Executed);
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
        received_at: e.received_at.unwrap_or(sig.issued_at),
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

/// What checking one log file before reconciling found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStatus {
    /// Its chain and checkpoint signatures verify with the node's key.
    Verified(Verified),
    /// No key was given for its node: only each line's own hash was checked.
    Unverified,
    /// It does not verify with the node's key.
    Tampered(Problem),
}

/// One log file of a reconciled directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCheck {
    /// The node that wrote it.
    pub node: String,
    /// The file.
    pub file: PathBuf,
    /// What verifying it found.
    pub status: LogStatus,
}

/// What reconciling a directory of logs found.
#[derive(Debug, Clone, Default)]
pub struct Reconciliation {
    /// Nodes whose logs were read.
    pub nodes: Vec<String>,
    /// Each log file and whether it verified (only from [`reconcile_dir_with`]).
    pub logs: Vec<LogCheck>,
    /// Coordinated queries checked.
    pub queries: u64,
    /// Node answers matched to a coordinator's record.
    pub matched: u64,
    /// Every disagreement.
    pub mismatches: Vec<Mismatch>,
}

/// [`reconcile_dir_with`] without keys: each line's hash is checked, not the chains.
pub fn reconcile_dir(dir: &Path) -> Result<Reconciliation, String> {
    reconcile_dir_with(dir, &BTreeMap::new())
}

/// Reads every `*.jsonl` log in `dir`, verifies each whose node has a key in `keys` (chain and
/// checkpoint signatures; a log that does not verify is a mismatch), groups lines by the node of
/// their file (every line of a file must be the same node's, one file per node) and reconciles
/// them.
pub fn reconcile_dir_with(
    dir: &Path,
    keys: &BTreeMap<String, PublicKey>,
) -> Result<Reconciliation, String> {
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
    let mut checks = Vec::new();
    let mut file_of: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut entries = Vec::new();
        for (i, line) in bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
        {
            let e = parse_line(line).map_err(|m| format!("{}:{}: {m}", f.display(), i + 1))?;
            if let Some(first) = entries.first().map(|e: &Entry| e.node.clone())
                && e.node != first
            {
                return Err(format!(
                    "{}:{}: a line of node {} in the log of node {first}",
                    f.display(),
                    i + 1,
                    e.node
                ));
            }
            entries.push(e);
        }
        let Some(first) = entries.first() else {
            return Err(format!("{}: no log lines", f.display()));
        };
        let node = first.node.clone();
        if let Some(other) = file_of.insert(node.clone(), f.clone()) {
            return Err(format!(
                "{} and {} are both logs of node {node}",
                other.display(),
                f.display()
            ));
        }
        let status = match keys.get(&node) {
            None => LogStatus::Unverified,
            Some(key) => {
                let options = Options {
                    since: first.seq - 1,
                    ..Options::default()
                };
                match verify_with(&bytes, key, &options) {
                    Ok(v) => LogStatus::Verified(v),
                    Err(p) => LogStatus::Tampered(p),
                }
            }
        };
        checks.push(LogCheck {
            node: node.clone(),
            file: f.clone(),
            status,
        });
        logs.insert(node, entries);
    }
    let mut out = reconcile(&logs);
    for c in &checks {
        if let LogStatus::Tampered(p) = &c.status {
            out.mismatches.insert(
                0,
                Mismatch {
                    query_id: "*".into(),
                    coordinator: "*".into(),
                    node: c.node.clone(),
                    problem: format!("its log does not verify with its key: {p}"),
                },
            );
        }
    }
    out.logs = checks;
    Ok(out)
}

/// Reconciles logs by node agency: every node a coordinator's log says it asked must have
/// logged the same query, with the digest the coordinator received, the same analyst signature,
/// and a decision that agrees with the status the coordinator recorded; every partial a node
/// logged must come from a coordinator whose log is present, records the query, and lists the
/// node in its fan-out. Every difference is listed, not only the first per node.
pub fn reconcile(logs: &BTreeMap<String, Vec<Entry>>) -> Reconciliation {
    let mut out = Reconciliation {
        nodes: logs.keys().cloned().collect(),
        ..Reconciliation::default()
    };
    // (node, coordinator, query id) -> that node's partial entries for that coordinator.
    let mut partials: HashMap<(&str, String, &str), Vec<&Entry>> = HashMap::new();
    // (coordinator, query id) -> its query entry.
    let mut coordinated: HashMap<(&str, &str), &Entry> = HashMap::new();
    for (node, entries) in logs {
        for e in entries {
            if e.kind != Kind::Request {
                continue;
            }
            // A journey node's answer that carries data is its partial of the query.
            if (e.endpoint == "/v1/partial" || e.endpoint == "/v1/journey")
                && !e.query_id.is_empty()
            {
                let coordinator = coordinator_agency(&e.peer).unwrap_or_else(|| e.peer.clone());
                partials
                    .entry((node.as_str(), coordinator, e.query_id.as_str()))
                    .or_default()
                    .push(e);
            }
            if e.endpoint == "/v1/query" && !e.fanout.is_empty() {
                coordinated.insert((node.as_str(), e.query_id.as_str()), e);
            }
        }
    }
    let mut missing_logs = std::collections::BTreeSet::new();
    for (coordinator, entries) in logs {
        for q in entries
            .iter()
            .filter(|e| e.endpoint == "/v1/query" && !e.fanout.is_empty())
        {
            out.queries += 1;
            for f in &q.fanout {
                let mut mismatch = |problem: String| {
                    out.mismatches.push(Mismatch {
                        query_id: q.query_id.clone(),
                        coordinator: coordinator.clone(),
                        node: f.agency.clone(),
                        problem,
                    })
                };
                if !logs.contains_key(&f.agency) {
                    missing_logs.insert(f.agency.clone());
                    continue;
                }
                let found = partials
                    .get(&(f.agency.as_str(), coordinator.clone(), q.query_id.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let Some(answer) = found
                    .iter()
                    .find(|e| e.decision == Some(Decision::Executed))
                    .or(found.first())
                else {
                    if f.status != NodeState::Unreachable {
                        mismatch(format!(
                            "the coordinator recorded the node as {} but the node has no record \
                             of the query",
                            state_name(f.status)
                        ));
                    }
                    continue;
                };
                let mut agrees = true;
                if found.len() > 1 {
                    agrees = false;
                    mismatch(format!(
                        "the node logged {} partial requests for the query from the coordinator",
                        found.len()
                    ));
                }
                if f.digest != answer.digest {
                    agrees = false;
                    mismatch(format!(
                        "digests differ: the coordinator received {}, the node sent {}",
                        f.digest.as_deref().unwrap_or("nothing"),
                        answer.digest.as_deref().unwrap_or("nothing")
                    ));
                }
                if q.request != answer.request {
                    agrees = false;
                    mismatch(
                        "the analyst signature the node logged differs from the coordinator's"
                            .into(),
                    );
                }
                let executed = answer.decision == Some(Decision::Executed);
                let disagree = match f.status {
                    NodeState::Ok => !executed,
                    NodeState::Refused => executed,
                    // A partial the coordinator gave up on or could not use may still have run.
                    NodeState::Error | NodeState::Unreachable => false,
                };
                if disagree {
                    agrees = false;
                    mismatch(format!(
                        "the coordinator recorded the node as {} but the node logged it as {}{}",
                        state_name(f.status),
                        decision_name(answer.decision),
                        answer
                            .code
                            .as_deref()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default()
                    ));
                }
                if agrees {
                    out.matched += 1;
                }
            }
        }
    }
    // Every partial a node logged, against its coordinator's log.
    let mut keys: Vec<_> = partials.keys().collect();
    keys.sort();
    for key in keys {
        let (node, coordinator, query_id) = key;
        for e in &partials[key] {
            let what = match e.decision {
                Some(Decision::Executed) => "answered",
                _ => "refused",
            };
            let problem = if !logs.contains_key(coordinator) {
                format!(
                    "the node {what} a partial request from {}, whose log is not in the directory",
                    e.peer
                )
            } else {
                match coordinated.get(&(coordinator.as_str(), *query_id)) {
                    None => format!(
                        "the node {what} a partial request from {} that the coordinator's log \
                         does not record",
                        e.peer
                    ),
                    Some(q) if !q.fanout.iter().any(|f| f.agency == *node) => format!(
                        "the node {what} a partial request for the query, but the coordinator's \
                         fan-out does not list the node (the coordinator hid a node)"
                    ),
                    Some(_) => continue,
                }
            };
            out.mismatches.push(Mismatch {
                query_id: query_id.to_string(),
                coordinator: coordinator.clone(),
                node: node.to_string(),
                problem,
            });
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

fn decision_name(d: Option<Decision>) -> &'static str {
    match d {
        Some(Decision::Executed) => "executed",
        Some(Decision::Refused) => "refused",
        Some(Decision::Failed) => "failed",
        None => "undecided",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, Fanout, Record, digest};
    use cxfed_protocol::signing::RequestSignature;

    fn now() -> i64 {
        cxfed_protocol::signing::unix_now()
    }

    fn signed(nonce: &str, coordinator: &str, issued_at: i64) -> RequestSignature {
        RequestSignature {
            nonce: nonce.into(),
            issued_at,
            coordinator: coordinator.into(),
            signature: "00".into(),
            certificate: "0102".into(),
        }
    }

    fn request(
        query_id: &str,
        endpoint: &'static str,
        peer: &str,
        sig: RequestSignature,
    ) -> Record {
        Record {
            query_id: query_id.into(),
            endpoint: endpoint.into(),
            peer: peer.into(),
            analyst: "spiffe://f/SSA/analyst/a".into(),
            sql: Some("SELECT COUNT(*) FROM experience".into()),
            received_at: Some(now()),
            request: Some(sig),
            decision: Some(Decision::Executed),
            ..Record::default()
        }
    }

    fn plain(query_id: &str) -> Record {
        Record {
            query_id: query_id.into(),
            endpoint: "/v1/schema".into(),
            peer: "spiffe://f/SSA/analyst/a".into(),
            decision: Some(Decision::Executed),
            ..Record::default()
        }
    }

    /// A log of SSA written through [`AuditLog`] from `records`, checkpointed every `every`,
    /// and exported (so it ends with a checkpoint); with its key.
    async fn log_of(records: Vec<Record>, every: u64) -> (Vec<u8>, PublicKey) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), "SSA", every, |_| {}).expect("open");
        for r in records {
            log.append(r).await.expect("append");
        }
        (log.export_since(0).await.expect("export"), log.public_key())
    }

    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes
            .split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Recomputes a line's own hash after an edit, as a forger would.
    fn reseal(line: &str) -> Vec<u8> {
        let text = line.trim_end();
        let cut = text.rfind(",\"hash\":\"").expect("hash");
        let body = format!("{}}}", &text[..cut]);
        format!(
            "{},\"hash\":\"{}\"}}\n",
            &text[..cut],
            digest(body.as_bytes())
        )
        .into_bytes()
    }

    fn entry(line: &[u8]) -> Entry {
        parse_line(line.trim_ascii_end()).expect("line")
    }

    fn head_at(ls: &[Vec<u8>], seq: u64) -> Head {
        let e = entry(&ls[seq as usize - 1]);
        Head {
            seq: e.seq,
            hash: e.hash,
        }
    }

    fn with_prev(
        bytes: &[u8],
        key: &PublicKey,
        since: u64,
        prev: &Head,
    ) -> Result<Verified, Problem> {
        let options = Options {
            since,
            prev: Some(prev),
            checker: None,
        };
        verify_with(bytes, key, &options)
    }

    #[tokio::test]
    async fn a_log_cut_back_to_an_older_checkpoint_fails_against_the_previous_head() {
        // Checkpoints at seq 3, 6, 9 and the export's at 11.
        let (bytes, key) = log_of((0..7).map(|i| plain(&format!("q{i}"))).collect(), 2).await;
        let ls = lines(&bytes);
        let v = verify(&bytes, &key, 0, None).expect("clean");
        assert_eq!(v.head(), head_at(&ls, 11));
        assert_eq!(v.head().to_string().parse::<Head>(), Ok(v.head()));

        // The auditor saw seq 11; the log was later cut back to the checkpoint at seq 6.
        let cut: Vec<u8> = ls[..6].concat();
        assert!(
            verify(&cut, &key, 0, None).is_ok(),
            "alone, a valid older log"
        );
        let p = with_prev(&cut, &key, 0, &v.head()).expect_err("cut back");
        assert_eq!(p.seq, 7, "{p}");
        assert!(p.message.contains("cut back"), "{p}");
        // The same log against an older head the auditor saw (seq 3) is fine.
        assert!(with_prev(&cut, &key, 0, &head_at(&ls, 3)).is_ok());
        // A head that is not in the log (a rewritten entry) fails at that seq.
        let wrong = Head {
            seq: 3,
            hash: "ab".repeat(32),
        };
        let p = with_prev(&bytes, &key, 0, &wrong).expect_err("rewritten");
        assert_eq!(p.seq, 3);
        assert!(p.message.contains("rewritten"), "{p}");

        // A --since fetch must start right after the head seen before.
        let tail: Vec<u8> = ls[6..].concat();
        assert!(with_prev(&tail, &key, 6, &head_at(&ls, 6)).is_ok());
        let p = with_prev(&tail, &key, 6, &head_at(&ls, 5)).expect_err("before the tail");
        assert!(p.message.contains("before this log's first entry"), "{p}");
        let other = Head {
            seq: 6,
            hash: "cd".repeat(32),
        };
        let p = with_prev(&tail, &key, 6, &other).expect_err("not a continuation");
        assert_eq!(p.seq, 7);
        assert!(p.message.contains("does not follow"), "{p}");
        // What `audit fetch --prev` checks agrees.
        assert!(check_prev(&tail, 6, &head_at(&ls, 6)).is_ok());
        assert!(check_prev(&tail, 6, &other).is_err());
        assert!(check_prev(&cut, 0, &v.head()).is_err());
        assert!(check_prev(&bytes, 0, &head_at(&ls, 4)).is_ok());
    }

    #[tokio::test]
    async fn catches_duplicated_entries_and_edited_checkpoints() {
        let (bytes, key) = log_of((0..4).map(|i| plain(&format!("q{i}"))).collect(), 2).await;
        let ls = lines(&bytes);
        assert_eq!(entry(&ls[2]).kind, Kind::Checkpoint);

        let mut duplicated = ls.clone();
        duplicated.insert(2, ls[1].clone());
        let p = verify(&duplicated.concat(), &key, 0, None).expect_err("duplicate");
        assert_eq!(p.seq, 2, "{p}");
        assert!(p.message.contains("duplicated"), "{p}");

        // A checkpoint's time moved, re-hashed: its signature no longer holds.
        let text = String::from_utf8(ls[2].clone()).expect("utf8");
        let time = entry(&ls[2]).time;
        let mut retimed = ls.clone();
        retimed[2] = reseal(&text.replace(&time, "2001-01-01T00:00:00.000Z"));
        let p = verify(&retimed.concat(), &key, 0, None).expect_err("retimed");
        assert_eq!(p.seq, 3, "{p}");
        assert!(p.message.contains("signature"), "{p}");

        // A checkpoint renumbered, re-hashed: out of sequence where it stands.
        let mut renumbered = ls.clone();
        renumbered[2] = reseal(&text.replace("\"seq\":3,", "\"seq\":4,"));
        let p = verify(&renumbered.concat(), &key, 0, None).expect_err("renumbered");
        assert_eq!(p.seq, 3, "{p}");
        assert!(p.message.contains("missing"), "{p}");
    }

    #[tokio::test]
    async fn flags_a_replayed_or_stale_request_the_node_executed() {
        let t = now();
        let ssa_node = "spiffe://f/CMS/node/cms";
        // The coordinator's own part and its query share the nonce: that is one request.
        let clean = vec![
            request(
                "q1",
                "/v1/partial",
                "SSA (coordinator)",
                signed("n1", "SSA", t),
            ),
            request(
                "q1",
                "/v1/query",
                "spiffe://f/SSA/analyst/a",
                signed("n1", "SSA", t),
            ),
            request("q2", "/v1/partial", ssa_node, signed("n2", "CMS", t)),
        ];
        let (bytes, key) = log_of(clean.clone(), 100).await;
        verify(&bytes, &key, 0, None).expect("clean");

        let mut replayed = clean.clone();
        replayed.push(request(
            "q3",
            "/v1/partial",
            ssa_node,
            signed("n2", "CMS", t),
        ));
        let (bytes, key) = log_of(replayed, 100).await;
        let p = verify(&bytes, &key, 0, None).expect_err("replay");
        assert_eq!(p.seq, 4, "{p}");
        assert!(p.message.contains("seq 3 had already used"), "{p}");

        // Same query id, same endpoint: the same partial answered twice.
        let mut twice = clean.clone();
        twice.push(request(
            "q2",
            "/v1/partial",
            ssa_node,
            signed("n2", "CMS", t),
        ));
        let (bytes, key) = log_of(twice, 100).await;
        assert_eq!(verify(&bytes, &key, 0, None).expect_err("replay").seq, 4);

        // A refused replay (the node doing its job) is fine.
        let mut refused = clean.clone();
        let mut r = request("q3", "/v1/partial", ssa_node, signed("n2", "CMS", t));
        r.decision = Some(Decision::Refused);
        r.code = Some("CXF-A401".into());
        refused.push(r);
        let (bytes, key) = log_of(refused, 100).await;
        verify(&bytes, &key, 0, None).expect("clean");

        let stale = vec![request(
            "q1",
            "/v1/partial",
            ssa_node,
            signed("n1", "CMS", t - FRESHNESS_SECS - 5),
        )];
        let (bytes, key) = log_of(stale, 100).await;
        let p = verify(&bytes, &key, 0, None).expect_err("stale");
        assert_eq!(p.seq, 1);
        assert!(p.message.contains("stale"), "{p}");

        // Signed for SSA's node, executed when CMS's node sent it.
        let moved = vec![request(
            "q1",
            "/v1/partial",
            ssa_node,
            signed("n1", "SSA", t),
        )];
        let (bytes, key) = log_of(moved, 100).await;
        let p = verify(&bytes, &key, 0, None).expect_err("wrong coordinator");
        assert!(
            p.message.contains("coordinator SSA that came from CMS"),
            "{p}"
        );
    }

    fn e(node: &str, endpoint: &str, query_id: &str, peer: &str) -> Entry {
        Entry {
            node: node.into(),
            kind: Kind::Request,
            endpoint: endpoint.into(),
            query_id: query_id.into(),
            peer: peer.into(),
            request: Some(signed("n", "SSA", 1)),
            decision: Some(Decision::Executed),
            digest: Some(format!("d-{node}")),
            ..Entry::default()
        }
    }

    fn fanout(agency: &str, status: NodeState) -> Fanout {
        Fanout {
            agency: agency.into(),
            status,
            digest: (status == NodeState::Ok).then(|| format!("d-{agency}")),
        }
    }

    /// SSA coordinated q1 over SSA, CMS, OPM; all three logs agree.
    fn federation() -> BTreeMap<String, Vec<Entry>> {
        let mut query = e("SSA", "/v1/query", "q1", "spiffe://f/SSA/analyst/a");
        query.fanout = ["SSA", "CMS", "OPM"]
            .iter()
            .map(|a| fanout(a, NodeState::Ok))
            .collect();
        let mut logs = BTreeMap::new();
        logs.insert(
            "SSA".to_string(),
            vec![e("SSA", "/v1/partial", "q1", "SSA (coordinator)"), query],
        );
        for a in ["CMS", "OPM"] {
            logs.insert(
                a.to_string(),
                vec![e(a, "/v1/partial", "q1", "spiffe://f/SSA/node/ssa")],
            );
        }
        logs
    }

    fn problems(r: &Reconciliation) -> Vec<String> {
        r.mismatches.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn reconcile_matches_a_clean_federation() {
        let r = reconcile(&federation());
        assert_eq!((r.queries, r.matched), (1, 3));
        assert!(r.mismatches.is_empty(), "{:?}", problems(&r));
    }

    #[test]
    fn reconcile_finds_a_node_the_coordinator_hid() {
        let mut logs = federation();
        let ssa = logs.get_mut("SSA").expect("ssa");
        ssa[1].fanout.retain(|f| f.agency != "OPM");
        let r = reconcile(&logs);
        let p = problems(&r);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("coordinator SSA, node OPM") && p[0].contains("hid a node"),
            "{p:#?}"
        );
    }

    #[test]
    fn reconcile_reports_partials_whose_coordinator_log_is_absent() {
        let mut logs = federation();
        logs.insert(
            "CMS".into(),
            vec![e("CMS", "/v1/partial", "q9", "spiffe://f/HUD/node/hud")],
        );
        let r = reconcile(&logs);
        let p = problems(&r);
        assert!(
            p.iter().any(|m| m.contains("coordinator HUD, node CMS")
                && m.contains("whose log is not in the directory")),
            "{p:#?}"
        );
    }

    #[test]
    fn reconcile_reports_every_difference() {
        let mut logs = federation();
        let cms = &mut logs.get_mut("CMS").expect("cms")[0];
        cms.digest = Some("other".into());
        cms.request = Some(signed("other-nonce", "SSA", 1));
        let opm = &mut logs.get_mut("OPM").expect("opm")[0];
        opm.decision = Some(Decision::Refused);
        opm.code = Some("CXF-P003".into());
        opm.digest = Some("d-OPM".into());
        let r = reconcile(&logs);
        let p = problems(&r);
        assert_eq!(r.matched, 1, "{p:#?}");
        let cms: Vec<&String> = p.iter().filter(|m| m.contains("node CMS")).collect();
        assert_eq!(cms.len(), 2, "{p:#?}");
        assert!(cms.iter().any(|m| m.contains("digests differ")), "{p:#?}");
        assert!(cms.iter().any(|m| m.contains("signature")), "{p:#?}");
        assert!(
            p.iter().any(|m| m.contains("node OPM")
                && m.contains(
                    "recorded the node as ok but the node logged it as refused (CXF-P003)"
                )),
            "{p:#?}"
        );

        // Refused at the coordinator, executed at the node.
        let mut logs = federation();
        logs.get_mut("SSA").expect("ssa")[1].fanout[1] = fanout("CMS", NodeState::Refused);
        logs.get_mut("CMS").expect("cms")[0].digest = None;
        let p = problems(&reconcile(&logs));
        assert!(
            p.iter()
                .any(|m| m.contains("as refused but the node logged it as executed")),
            "{p:#?}"
        );
    }

    #[tokio::test]
    async fn reconcile_dir_verifies_each_log_it_has_a_key_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ssa, ssa_key) = log_of(vec![plain("a")], 100).await;
        std::fs::write(dir.path().join("ssa.jsonl"), &ssa).expect("write");
        let mut keys = BTreeMap::new();
        keys.insert("SSA".to_string(), ssa_key.clone());
        let r = reconcile_dir_with(dir.path(), &keys).expect("reconciles");
        assert!(
            matches!(r.logs[0].status, LogStatus::Verified(_)),
            "{:?}",
            r.logs
        );
        assert!(r.mismatches.is_empty());
        // Without its key the log is read, and said to be unverified.
        let r = reconcile_dir(dir.path()).expect("reconciles");
        assert_eq!(r.logs[0].status, LogStatus::Unverified);
        // Cut after its last checkpoint: tampered, and a mismatch.
        let ls = lines(&ssa);
        std::fs::write(dir.path().join("ssa.jsonl"), ls[..ls.len() - 1].concat()).expect("write");
        let r = reconcile_dir_with(dir.path(), &keys).expect("reconciles");
        assert!(
            matches!(r.logs[0].status, LogStatus::Tampered(_)),
            "{:?}",
            r.logs
        );
        assert!(
            problems(&r)[0].contains("does not verify"),
            "{:?}",
            problems(&r)
        );
        // Two files for one node are refused.
        std::fs::write(dir.path().join("ssa2.jsonl"), &ssa).expect("write");
        let err = reconcile_dir(dir.path()).expect_err("two logs of SSA");
        assert!(err.contains("both logs of node SSA"), "{err}");
    }

    #[test]
    fn head_parses_only_seq_colon_hash() {
        let h: Head = format!("12:{}", "AB".repeat(32)).parse().expect("head");
        assert_eq!(h.to_string(), format!("12:{}", "ab".repeat(32)));
        assert!("12".parse::<Head>().is_err());
        assert!("x:00".parse::<Head>().is_err());
        assert!(format!("1:{}", "zz".repeat(32)).parse::<Head>().is_err());
    }
}
