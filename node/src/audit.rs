//! The node's tamper-evident query log, `<data_dir>/audit.jsonl`: one JSON line per request
//! that reached an endpoint (refusals included), hash-chained, with Ed25519-signed checkpoints.
//!
//! # Format
//! Every line is a JSON object whose last member is `"hash"`:
//!
//! ```text
//! {"seq":7,"time":"…","node":"SSA","kind":"request",…,"prev_hash":"<hex>","hash":"<hex>"}
//! ```
//!
//! `hash` is the SHA-256 of the line's own bytes with `,"hash":"…"` removed (so `{…}` exactly as
//! written), and `prev_hash` is the previous line's `hash` (64 zeros for seq 1). A `checkpoint`
//! line carries an Ed25519 signature by the node's audit key over
//! `cxfed-audit-checkpoint-v1\n<node>\n<seq>\n<time>\n<prev_hash>`, which fixes every line
//! before it, and nothing but those fields. Checkpoints are written every `checkpoint_every`
//! entries, at shutdown, after a start-up repair that leaves that many unsigned, and before every
//! export to an auditor, so an exported log always ends with one. A line for a signed request
//! keeps the analyst's signature block (`request`, version 2: with the coordinator) and
//! `received_at`, the node's clock when it checked it.
//!
//! Each line is written whole with one `write` and synced before the answer leaves the node; a
//! write or sync that fails is cut back off the file before the error is returned. A torn last
//! line (crash mid-write) is cut off on the next start and a `repair` line records how many bytes
//! were dropped. On start the node checks its whole log as an auditor would ([`Chain`]: every
//! hash, the chain, every checkpoint's signature with its own key and its format) and that no
//! more than `checkpoint_every` entries follow the last checkpoint; otherwise it refuses to start
//! and says where the log breaks, rather than sign a history it did not write.
//!
//! The key pair lives next to the log: `audit-signing.key` (PKCS#8, hex, mode 0600) and
//! `audit-signing.pub` (`ed25519:<hex>`), which the steward gives to auditors. A key is made
//! only for an empty log: a node whose log has entries and whose key is missing refuses to start.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use cxfed_protocol::signing::{RequestSignature, hex, unhex};
use cxfed_protocol::wire::NodeState;

use crate::storage::AppendFile;

/// File name of the log inside the data directory.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// The node's audit signing key (PKCS#8, hex).
pub const KEY_FILE: &str = "audit-signing.key";
/// The public half, for auditors.
pub const PUBLIC_KEY_FILE: &str = "audit-signing.pub";
/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Default number of entries between signed checkpoints.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 100;
/// Code of a signature refusal (see [`crate::requests::SignatureRefusal::CODE`]).
const SIGNATURE_REFUSED: &str = cxfed_protocol::codes::ApiCode::UnsignedRequest.code();

const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const HASH_SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

/// What the node decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The query ran and results left the node.
    Executed,
    /// The query or caller was refused.
    Refused,
    /// The query failed.
    Failed,
}

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A request to an endpoint.
    #[default]
    Request,
    /// A signed checkpoint over every line before it.
    Checkpoint,
    /// A torn last line was cut off at start-up.
    Repair,
}

/// One node a coordinator sent a query to, and what came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fanout {
    /// The node's agency.
    pub agency: String,
    /// What it did.
    pub status: NodeState,
    /// SHA-256 (hex) of the partial it sent, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Entry {
    /// 1-based position in this node's log.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// The agency of the node that wrote the log.
    pub node: String,
    /// What the line records.
    #[serde(default)]
    pub kind: Kind,
    /// Query id (coordinator-assigned for partials).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query_id: String,
    /// Endpoint, e.g. `/v1/partial` (for a 404, the path asked for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// The TLS peer's verified identity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// The analyst the request is for (verified from their signature when it holds).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub analyst: String,
    /// The SQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// ε the analyst asked for, as signed (NaN and ±∞ as strings, see
    /// [`cxfed_protocol::epsilon_json`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "cxfed_protocol::epsilon_json"
    )]
    pub requested_epsilon: Option<f64>,
    /// The analyst's `require_all`, as signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_all: Option<bool>,
    /// The analyst's signature, exactly as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestSignature>,
    /// When this node received and checked the signed request (Unix seconds, its clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<i64>,
    /// Decision (requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Rule or error code when refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Groups that left this node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub groups_released: u64,
    /// Groups withheld by this node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub groups_withheld: u64,
    /// ε charged to the analyst on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_spent: Option<f64>,
    /// SHA-256 (hex) of the bytes that left the node in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For a coordinated query: every node asked and the digest of what each returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fanout: Vec<Fanout>,
    /// Bytes of a torn line cut off (repair lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_bytes: Option<u64>,
    /// Ed25519 signature, hex (checkpoint lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Hash of the previous line.
    pub prev_hash: String,
    /// Hash of this line (see the module docs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Entry {
    /// The analyst's signature block of a request line whose signature the node accepted (and
    /// whose nonce it therefore used up); `None` for lines without one and for signature
    /// refusals, whose nonce was not used.
    pub fn accepted_request(&self) -> Option<&RequestSignature> {
        match (&self.kind, &self.request) {
            (Kind::Request, Some(r)) if self.code.as_deref() != Some(SIGNATURE_REFUSED) => Some(r),
            _ => None,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the caller fills in for a request line; the log adds sequence, time, node and hashes.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Query id.
    pub query_id: String,
    /// Endpoint (for a 404, the path asked for).
    pub endpoint: Cow<'static, str>,
    /// TLS peer.
    pub peer: String,
    /// Analyst.
    pub analyst: String,
    /// SQL.
    pub sql: Option<String>,
    /// ε asked for.
    pub requested_epsilon: Option<f64>,
    /// `require_all` as signed (only with a signature).
    pub require_all: Option<bool>,
    /// The analyst's signature.
    pub request: Option<RequestSignature>,
    /// When the signature was checked (Unix seconds).
    pub received_at: Option<i64>,
    /// Decision.
    pub decision: Option<Decision>,
    /// Code.
    pub code: Option<String>,
    /// Groups released.
    pub groups_released: u64,
    /// Groups withheld.
    pub groups_withheld: u64,
    /// ε charged.
    pub epsilon_spent: Option<f64>,
    /// Digest of what left.
    pub digest: Option<String>,
    /// Fan-out of a coordinated query.
    pub fanout: Vec<Fanout>,
}

/// SHA-256 of `bytes`, hex.
pub fn digest(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The message a checkpoint signs.
pub fn checkpoint_message(node: &str, seq: u64, time: &str, prev_hash: &str) -> Vec<u8> {
    format!("cxfed-audit-checkpoint-v1\n{node}\n{seq}\n{time}\n{prev_hash}").into_bytes()
}

/// Checks one line's own hash and parses it. The error says what is wrong.
pub fn parse_line(line: &[u8]) -> Result<Entry, String> {
    let n = line.len();
    let framed = n > HASH_SUFFIX_LEN
        && line[n - HASH_SUFFIX_LEN..].starts_with(HASH_PREFIX)
        && line.ends_with(b"\"}");
    if !framed {
        return Err("not a log line (no trailing \"hash\")".into());
    }
    let mut body = line[..n - HASH_SUFFIX_LEN].to_vec();
    body.push(b'}');
    let claimed = &line[n - 66..n - 2];
    let entry: Entry = serde_json::from_slice(line).map_err(|e| format!("unreadable JSON: {e}"))?;
    if digest(&body).as_bytes() != claimed {
        return Err("its hash does not match its content (the entry was edited)".into());
    }
    Ok(entry)
}

/// The exact line a checkpoint with these signed fields must be: checkpoints carry nothing
/// else, so no unsigned field can be added to one (the last line of a log has no successor
/// whose chain would reveal an edit).
pub fn canonical_checkpoint(e: &Entry) -> std::io::Result<Vec<u8>> {
    let bare = Entry {
        seq: e.seq,
        time: e.time.clone(),
        node: e.node.clone(),
        kind: Kind::Checkpoint,
        signature: e.signature.clone(),
        prev_hash: e.prev_hash.clone(),
        ..Entry::default()
    };
    seal(&bare).map(|(line, _)| line)
}

/// Serializes `entry` (whose `hash` is ignored) into a line with its hash, and the hash.
fn seal(entry: &Entry) -> std::io::Result<(Vec<u8>, String)> {
    let mut e = entry.clone();
    e.hash.clear();
    let body = serde_json::to_vec(&e).map_err(std::io::Error::other)?;
    let hash = digest(&body);
    let mut line = body[..body.len() - 1].to_vec();
    line.extend_from_slice(HASH_PREFIX);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, hash))
}

/// A node's audit public key, as in `audit-signing.pub` (`ed25519:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(pub Vec<u8>);

impl PublicKey {
    /// Parses `ed25519:<64 hex digits>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let t = text.trim();
        let hex_part = t
            .strip_prefix("ed25519:")
            .ok_or_else(|| "expected ed25519:<64 hex digits>".to_string())?;
        match unhex(hex_part) {
            Some(b) if b.len() == 32 => Ok(PublicKey(b)),
            _ => Err("expected ed25519:<64 hex digits>".into()),
        }
    }

    /// Whether `signature` (hex) signs `message`.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        unhex(signature).is_some_and(|s| {
            UnparsedPublicKey::new(&ED25519, &self.0)
                .verify(message, &s)
                .is_ok()
        })
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", hex(&self.0))
    }
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

/// A [`Problem`] at `seq`.
pub fn problem(seq: u64, message: impl Into<String>) -> Problem {
    Problem {
        seq,
        message: message.into(),
    }
}

/// The integrity of a log, line by line, as both an auditor ([`crate::auditor::verify`]) and the
/// node itself at start-up check it: each line's own hash, one node, consecutive sequence
/// numbers, the hash chain (from the genesis hash, or from whatever precedes `since + 1`), and
/// every checkpoint's signature and exact format.
#[derive(Debug)]
pub struct Chain<'k> {
    key: &'k PublicKey,
    since: u64,
    node: Option<String>,
    last: Option<(u64, String)>,
    last_checkpoint: Option<Entry>,
    checkpoints: u64,
}

impl<'k> Chain<'k> {
    /// A chain checked with `key`, starting after seq `since`, written by `node` (or by
    /// whichever node the first line names).
    pub fn new(key: &'k PublicKey, since: u64, node: Option<&str>) -> Chain<'k> {
        Chain {
            key,
            since,
            node: node.map(str::to_owned),
            last: None,
            last_checkpoint: None,
            checkpoints: 0,
        }
    }

    /// The seq the next line must have.
    pub fn next_seq(&self) -> u64 {
        self.last_seq() + 1
    }

    /// The seq of the last line checked (`since` before any).
    pub fn last_seq(&self) -> u64 {
        self.last.as_ref().map_or(self.since, |(s, _)| *s)
    }

    /// The hash of the last line checked.
    pub fn last_hash(&self) -> Option<&str> {
        self.last.as_ref().map(|(_, h)| h.as_str())
    }

    /// The node that wrote the log (once a line was checked, or as given).
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The last checkpoint checked.
    pub fn last_checkpoint(&self) -> Option<&Entry> {
        self.last_checkpoint.as_ref()
    }

    /// Signed checkpoints checked.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// Entries after the last checkpoint (or after `since` when there is none).
    pub fn uncovered(&self) -> u64 {
        self.last_seq() - self.last_checkpoint.as_ref().map_or(self.since, |c| c.seq)
    }

    /// Checks the next line (without its end of line) and returns it parsed.
    pub fn push(&mut self, line: &[u8]) -> Result<Entry, Problem> {
        let want = self.next_seq();
        let e = parse_line(line).map_err(|m| {
            // Name the seq the line claims when it can be read at all.
            let seq = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                .unwrap_or(want);
            problem(seq, m)
        })?;
        match &self.node {
            None => self.node = Some(e.node.clone()),
            Some(n) if *n != e.node => {
                return Err(problem(
                    e.seq,
                    format!("written by node {:?}, the log is {n:?}'s", e.node),
                ));
            }
            Some(_) => {}
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
                        "out of order after seq {} (duplicated, inserted or reordered)",
                        want - 1
                    ),
                )
            });
        }
        match self.last_hash() {
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
            None if self.since == 0 && e.prev_hash != GENESIS => {
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
                .is_some_and(|s| self.key.verifies(&message, s));
            if !signed {
                return Err(problem(
                    e.seq,
                    "checkpoint signature is not valid for this node's key (forged or altered)",
                ));
            }
            let canonical =
                canonical_checkpoint(&e).map_err(|err| problem(e.seq, err.to_string()))?;
            if canonical.strip_suffix(b"\n") != Some(line) {
                return Err(problem(
                    e.seq,
                    "checkpoint line carries fields a checkpoint does not have (altered)",
                ));
            }
            self.checkpoints += 1;
            self.last_checkpoint = Some(e.clone());
        }
        self.last = Some((e.seq, e.hash.clone()));
        Ok(e)
    }
}

struct State {
    file: Box<dyn AppendFile>,
    /// Bytes of the file that are whole, synced lines.
    len: u64,
    /// Set when a failed write could not be cut back off the file: nothing more is appended.
    poisoned: Option<String>,
    seq: u64,
    last_hash: String,
    last_kind: Kind,
    since_checkpoint: u64,
}

/// The open log.
pub struct AuditLog {
    path: PathBuf,
    node: String,
    key: Ed25519KeyPair,
    checkpoint_every: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The existing log does not verify; the node will not append to it.
    #[error(
        "{path}: line {line} (after seq {after}): {reason}; the node will not append to a log \
         it cannot verify — run `cxfed audit verify` on it and move it aside"
    )]
    Broken {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The last good seq.
        after: u64,
        /// What is wrong.
        reason: String,
    },
    /// The signing key file is unusable.
    #[error("{path}: not a PKCS#8 Ed25519 key in hex")]
    Key {
        /// The key file.
        path: PathBuf,
    },
    /// The log has entries but the key that signed its checkpoints is gone.
    #[error(
        "{path} is missing but {log} has entries: the node will not make a new audit key for an \
         existing log (its checkpoints could no longer be told from forgeries); restore the key \
         from backup, or move the log aside to start a new one"
    )]
    MissingKey {
        /// The key file.
        path: PathBuf,
        /// The log.
        log: PathBuf,
    },
}

impl AuditLog {
    /// Opens (or creates) the log of `node` in `data_dir` and its signing key, checks the whole
    /// log as an auditor would (see [`Chain`]) with the node's own key, refuses a log with more
    /// than `checkpoint_every` entries after its last checkpoint, cuts a torn last line
    /// (recording a `repair` line), and calls `seen` with every entry (used to remember nonces
    /// across restarts).
    pub fn open(
        data_dir: &Path,
        node: &str,
        checkpoint_every: u64,
        mut seen: impl FnMut(&Entry),
    ) -> Result<AuditLog, OpenError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        let checkpoint_every = checkpoint_every.max(1);
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let path = data_dir.join(AUDIT_FILE);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io(&path))?;
        }
        let key = load_or_create_key(data_dir, &path, !bytes.is_empty())?;
        let public = PublicKey(key.public_key().as_ref().to_vec());
        let mut chain = Chain::new(&public, 0, Some(node));
        let mut last_kind = Kind::Checkpoint;
        let mut good_len = 0usize;
        for (i, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
            let Some(complete) = line.strip_suffix(b"\n") else {
                break; // torn: cut below
            };
            let after = chain.last_seq();
            let e = chain.push(complete).map_err(|p| OpenError::Broken {
                path: path.clone(),
                line: i + 1,
                after,
                reason: p.message,
            })?;
            seen(&e);
            last_kind = e.kind;
            good_len += line.len();
        }
        if chain.uncovered() > checkpoint_every {
            let covered = chain.last_checkpoint().map_or(0, |c| c.seq);
            return Err(OpenError::Broken {
                path,
                line: (covered + checkpoint_every + 1) as usize,
                after: covered,
                reason: format!(
                    "{} entries follow the last signed checkpoint (seq {covered}), but this node \
                     signs one at least every {checkpoint_every}: the log was rebuilt or its tail \
                     rewritten (or `checkpoint_every` was lowered since a crash: start once with \
                     the old value)",
                    chain.uncovered()
                ),
            });
        }
        let seq = chain.last_seq();
        let last_hash = chain.last_hash().unwrap_or(GENESIS).to_string();
        let since_checkpoint = chain.uncovered();
        let torn = bytes.len() - good_len;
        if torn > 0 {
            tracing::warn!(path = %path.display(), dropped_bytes = torn, "audit log had a torn last line; cutting it off");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(good_len as u64).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
        }
        let file = crate::storage::open_append(&path).map_err(io(&path))?;
        let log = AuditLog {
            path: path.clone(),
            node: node.to_owned(),
            key,
            checkpoint_every,
            state: Mutex::new(State {
                file: Box::new(file),
                len: good_len as u64,
                poisoned: None,
                seq,
                last_hash,
                last_kind,
                since_checkpoint,
            }),
        };
        if torn > 0 {
            let mut state = log.state.try_lock().map_err(|e| OpenError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            let entry = Entry {
                kind: Kind::Repair,
                dropped_bytes: Some(torn as u64),
                ..Entry::default()
            };
            log.write(&mut state, entry).map_err(io(&path))?;
            // Never leave more unsigned entries than the next start accepts.
            if state.since_checkpoint >= log.checkpoint_every {
                log.write_checkpoint(&mut state).map_err(io(&path))?;
            }
        }
        Ok(log)
    }

    /// The public key auditors verify checkpoints with.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.public_key().as_ref().to_vec())
    }

    /// Appends one request line and syncs it (and a checkpoint when one is due).
    pub async fn append(&self, record: Record) -> std::io::Result<Entry> {
        let mut state = self.state.lock().await;
        let entry = Entry {
            kind: Kind::Request,
            query_id: record.query_id,
            endpoint: record.endpoint.into_owned(),
            peer: record.peer,
            analyst: record.analyst,
            sql: record.sql,
            requested_epsilon: record.requested_epsilon,
            require_all: record.require_all,
            request: record.request,
            received_at: record.received_at,
            decision: record.decision,
            code: record.code,
            groups_released: record.groups_released,
            groups_withheld: record.groups_withheld,
            epsilon_spent: record.epsilon_spent,
            digest: record.digest,
            fanout: record.fanout,
            ..Entry::default()
        };
        crate::storage::blocking(|| {
            let written = self.write(&mut state, entry)?;
            if state.since_checkpoint >= self.checkpoint_every {
                self.write_checkpoint(&mut state)?;
            }
            Ok(written)
        })
    }

    /// Writes a signed checkpoint unless the last line already is one.
    pub async fn checkpoint(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().await;
        if state.last_kind != Kind::Checkpoint {
            self.write_checkpoint(&mut state)?;
        }
        Ok(())
    }

    /// Every line with `seq > since`, ending with a fresh signed checkpoint, exactly as on disk.
    pub async fn export_since(&self, since: u64) -> std::io::Result<Vec<u8>> {
        let mut state = self.state.lock().await;
        if state.last_kind != Kind::Checkpoint {
            self.write_checkpoint(&mut state)?;
        }
        let bytes = self.read_whole(&state)?;
        let mut out = Vec::new();
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let seq = parse_line(line.strip_suffix(b"\n").unwrap_or(line))
                .map_err(std::io::Error::other)?
                .seq;
            if seq > since {
                out.extend_from_slice(line);
            }
        }
        Ok(out)
    }

    /// The newest `limit` query and partial requests, newest first (read-only: no checkpoint).
    pub async fn recent_requests(&self, limit: usize) -> std::io::Result<Vec<Entry>> {
        let state = self.state.lock().await;
        let bytes = self.read_whole(&state)?;
        let mut out = Vec::new();
        for line in bytes.split(|b| *b == b'\n').rev().filter(|l| !l.is_empty()) {
            let e = parse_line(line).map_err(std::io::Error::other)?;
            if e.endpoint == "/v1/query" || e.endpoint == "/v1/partial" {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The whole, synced lines of the file (held under the lock, so no write is half done).
    fn read_whole(&self, state: &State) -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        File::open(&self.path)?.read_to_end(&mut bytes)?;
        bytes.truncate(state.len as usize);
        Ok(bytes)
    }

    fn write_checkpoint(&self, state: &mut State) -> std::io::Result<Entry> {
        let mut entry = Entry {
            kind: Kind::Checkpoint,
            seq: state.seq + 1,
            time: now(),
            ..Entry::default()
        };
        let message = checkpoint_message(&self.node, entry.seq, &entry.time, &state.last_hash);
        entry.signature = Some(hex(self.key.sign(&message).as_ref()));
        self.write(state, entry)
    }

    /// Appends `entry` as the next line and syncs it. On failure nothing of it stays in the file
    /// and the log's state is unchanged; if it cannot even be cut back off, the log refuses every
    /// later write (and so the node every request) rather than chain onto a broken line.
    fn write(&self, state: &mut State, mut entry: Entry) -> std::io::Result<Entry> {
        if let Some(why) = &state.poisoned {
            return Err(std::io::Error::other(format!(
                "{}: not appended to since a write failed and could not be undone ({why}); \
                 restart the node to check and repair the log",
                self.path.display()
            )));
        }
        entry.seq = state.seq + 1;
        if entry.time.is_empty() {
            entry.time = now();
        }
        entry.node = self.node.clone();
        entry.prev_hash = state.last_hash.clone();
        let (line, hash) = seal(&entry)?;
        if let Err((error, rollback)) =
            crate::storage::append_durably(state.file.as_mut(), &mut state.len, &line)
        {
            match rollback {
                None => {
                    tracing::error!(path = %self.path.display(), %error, "audit line not written; the file was cut back to its last good line")
                }
                Some(r) => {
                    tracing::error!(path = %self.path.display(), %error, rollback = %r, "audit line not written and the file could not be cut back; refusing further writes");
                    state.poisoned = Some(format!("{error}; then {r}"));
                }
            }
            return Err(error);
        }
        entry.hash = hash;
        state.seq = entry.seq;
        state.last_hash = entry.hash.clone();
        state.last_kind = entry.kind;
        state.since_checkpoint = if entry.kind == Kind::Checkpoint {
            0
        } else {
            state.since_checkpoint + 1
        };
        Ok(entry)
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Loads `audit-signing.key` from `data_dir`, creating it (and `audit-signing.pub`) if absent —
/// but only for a log without entries (`log_has_entries` false).
fn load_or_create_key(
    data_dir: &Path,
    log: &Path,
    log_has_entries: bool,
) -> Result<Ed25519KeyPair, OpenError> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| OpenError::Io {
        path: path.clone(),
        source,
    };
    let key = if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(io)?;
        let der = unhex(text.trim()).ok_or_else(|| OpenError::Key { path: path.clone() })?;
        Ed25519KeyPair::from_pkcs8(&der).map_err(|_| OpenError::Key { path: path.clone() })?
    } else if log_has_entries {
        return Err(OpenError::MissingKey {
            path: path.clone(),
            log: log.to_owned(),
        });
    } else {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| io(std::io::Error::other("random number generator failed")))?;
        crate::storage::write_atomic(&path, format!("{}\n", hex(der.as_ref())).as_bytes(), true)
            .map_err(io)?;
        Ed25519KeyPair::from_pkcs8(der.as_ref())
            .map_err(|_| OpenError::Key { path: path.clone() })?
    };
    let public = data_dir.join(PUBLIC_KEY_FILE);
    let text = format!("{}\n", PublicKey(key.public_key().as_ref().to_vec()));
    if std::fs::read_to_string(&public).ok().as_deref() != Some(text.as_str()) {
        crate::storage::write_atomic(&public, text.as_bytes(), false).map_err(|source| {
            OpenError::Io {
                path: public.clone(),
                source,
            }
        })?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::storage::testing::FailingFile;

    fn record(q: &str) -> Record {
        Record {
            query_id: q.into(),
            endpoint: "/v1/partial".into(),
            peer: "spiffe://f/SSA/node/n".into(),
            analyst: "spiffe://f/SSA/analyst/a".into(),
            sql: Some("SELECT count(*) FROM experience".into()),
            decision: Some(Decision::Executed),
            groups_released: 1,
            ..Record::default()
        }
    }

    fn lines(dir: &Path) -> Vec<Entry> {
        std::fs::read(dir.join(AUDIT_FILE))
            .expect("read")
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).expect("line verifies"))
            .collect()
    }

    #[tokio::test]
    async fn chains_checkpoints_and_repairs_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), "SSA", 2, |_| {}).expect("open");
        log.append(record("a")).await.expect("append");
        log.append(record("b")).await.expect("append"); // checkpoint due after 2
        let key = log.public_key();
        drop(log);
        let all = lines(dir.path());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].prev_hash, GENESIS);
        assert_eq!(all[1].prev_hash, all[0].hash);
        assert_eq!(all[2].kind, Kind::Checkpoint);
        let cp = &all[2];
        let msg = checkpoint_message("SSA", cp.seq, &cp.time, &cp.prev_hash);
        assert!(key.verifies(&msg, cp.signature.as_deref().expect("signed")));
        assert!(!key.verifies(b"other", cp.signature.as_deref().expect("signed")));

        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .expect("open");
        f.write_all(b"{\"seq\":4,\"ti").expect("torn write");
        drop(f);
        let mut count = 0;
        let log = AuditLog::open(dir.path(), "SSA", 2, |_| count += 1).expect("reopen");
        assert_eq!(count, 3);
        assert_eq!(log.public_key(), key, "the key persists");
        let e = log.append(record("c")).await.expect("append");
        assert_eq!(e.seq, 5);
        let all = lines(dir.path());
        assert_eq!(all[3].kind, Kind::Repair);
        assert_eq!(all[3].dropped_bytes, Some(12));
        let export = log.export_since(3).await.expect("export");
        let exported: Vec<Entry> = export
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).expect("verifies"))
            .collect();
        assert_eq!(
            exported.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert_eq!(exported[2].kind, Kind::Checkpoint);
    }

    #[tokio::test]
    async fn refuses_to_append_to_an_edited_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), "SSA", 100, |_| {}).expect("open");
        log.append(record("a")).await.expect("append");
        drop(log);
        let path = dir.path().join(AUDIT_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("count(*)", "count(1)")).expect("edit");
        let err = AuditLog::open(dir.path(), "SSA", 100, |_| {}).expect_err("refused");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn public_key_text_round_trips() {
        let k = PublicKey(vec![7; 32]);
        assert_eq!(PublicKey::parse(&format!(" {k}\n")), Ok(k));
        assert!(PublicKey::parse("ed25519:abcd").is_err());
        assert!(PublicKey::parse("rsa:00").is_err());
    }

    /// A log written with `key_dir`'s key, of `n` requests, checkpointed every `every`.
    async fn write_log(dir: &Path, n: usize, every: u64) -> Vec<u8> {
        let log = AuditLog::open(dir, "SSA", every, |_| {}).expect("open");
        for i in 0..n {
            log.append(record(&format!("q{i}"))).await.expect("append");
        }
        drop(log);
        std::fs::read(dir.join(AUDIT_FILE)).expect("read")
    }

    fn open_err(dir: &Path, every: u64) -> String {
        AuditLog::open(dir, "SSA", every, |_| {})
            .expect_err("refused")
            .to_string()
    }

    #[tokio::test]
    async fn refuses_a_log_rebuilt_from_genesis() {
        // The node's own log, and one a forger rebuilt with another key (e.g. a copied
        // directory's), in place of it.
        let own = tempfile::tempdir().expect("tempdir");
        write_log(own.path(), 3, 2).await;
        let forger = tempfile::tempdir().expect("tempdir");
        let forged = write_log(forger.path(), 5, 2).await;
        std::fs::write(own.path().join(AUDIT_FILE), &forged).expect("replace");
        let err = open_err(own.path(), 2);
        assert!(
            err.contains("line 3") && err.contains("checkpoint signature"),
            "{err}"
        );

        // Rebuilt without checkpoints: nothing to forge a signature on, but more unsigned
        // entries than this node ever leaves.
        let bare = tempfile::tempdir().expect("tempdir");
        let unsigned: Vec<u8> = write_log(bare.path(), 12, 100)
            .await
            .split_inclusive(|b| *b == b'\n')
            .take(12)
            .flatten()
            .copied()
            .collect();
        std::fs::write(own.path().join(AUDIT_FILE), &unsigned).expect("replace");
        let err = open_err(own.path(), 10);
        assert!(
            err.contains("line 11") && err.contains("12 entries follow the last signed checkpoint"),
            "{err}"
        );

        // A checkpoint padded with an unsigned field, re-hashed.
        let padded = tempfile::tempdir().expect("tempdir");
        let bytes = write_log(padded.path(), 2, 2).await;
        let text = String::from_utf8(bytes).expect("utf8");
        let last = text.lines().last().expect("line").to_string();
        let mut e = parse_line(last.as_bytes()).expect("line");
        e.sql = Some("DROP".into());
        let (forged_line, _) = seal(&e).expect("seal");
        let edited = text.replace(
            &format!("{last}\n"),
            std::str::from_utf8(&forged_line).expect("utf8"),
        );
        std::fs::write(padded.path().join(AUDIT_FILE), edited).expect("write");
        let err = open_err(padded.path(), 2);
        assert!(err.contains("line 3") && err.contains("fields"), "{err}");

        // Another node's log.
        let cms = tempfile::tempdir().expect("tempdir");
        write_log(cms.path(), 1, 2).await;
        let err = AuditLog::open(cms.path(), "CMS", 2, |_| {})
            .expect_err("refused")
            .to_string();
        assert!(err.contains("line 1") && err.contains("\"SSA\""), "{err}");
    }

    #[tokio::test]
    async fn refuses_to_make_a_new_key_for_an_existing_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 1, 10).await;
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("remove key");
        let err = open_err(dir.path(), 10);
        assert!(
            err.contains("audit-signing.key is missing") && err.contains("has entries"),
            "{err}"
        );
        assert!(!dir.path().join(KEY_FILE).exists(), "no key was made");
        // An empty log gets a key.
        std::fs::write(dir.path().join(AUDIT_FILE), b"").expect("empty");
        AuditLog::open(dir.path(), "SSA", 10, |_| {}).expect("opens");
        assert!(dir.path().join(KEY_FILE).exists());
    }

    #[tokio::test]
    async fn a_failed_write_is_cut_back_off_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(dir.path(), "SSA", 100, |_| {}).expect("open");
        log.append(record("a")).await.expect("append");
        let before = std::fs::read(&path).expect("read");
        let reopen = || OpenOptions::new().append(true).open(&path).expect("open");
        for fail in [FailingFile::after_bytes(20), FailingFile::on_sync()] {
            log.state.lock().await.file = Box::new(fail.wrapping(reopen()));
            log.append(record("lost"))
                .await
                .expect_err("the write fails");
            assert_eq!(std::fs::read(&path).expect("read"), before, "cut back");
        }
        // The log carries on from its last good line.
        log.state.lock().await.file = Box::new(reopen());
        let e = log.append(record("b")).await.expect("append");
        assert_eq!(e.seq, 2);
        log.checkpoint().await.expect("checkpoint");
        drop(log);
        let all = lines(dir.path());
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(all.iter().all(|e| e.query_id != "lost"));
        let log = AuditLog::open(dir.path(), "SSA", 100, |_| {}).expect("reopens clean");

        // A write that cannot even be cut back stops the log: no line is chained onto it.
        log.state.lock().await.file =
            Box::new(FailingFile::after_bytes(20).and_cut().wrapping(reopen()));
        log.append(record("lost")).await.expect_err("fails");
        log.state.lock().await.file = Box::new(reopen());
        let err = log.append(record("c")).await.expect_err("refused");
        assert!(err.to_string().contains("restart the node"), "{err}");
        drop(log);
        // The restart cuts the torn bytes off as a repair.
        let log = AuditLog::open(dir.path(), "SSA", 100, |_| {}).expect("repairs");
        let e = log.append(record("c")).await.expect("append");
        assert_eq!(e.seq, 5, "after seq 3 and the repair line");
        assert_eq!(lines(dir.path())[3].dropped_bytes, Some(20));
    }
}
