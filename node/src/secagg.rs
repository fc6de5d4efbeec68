//! Secure aggregation at a node (`dp` mode, public key sets): the coordinator learns only the
//! sum over nodes of each released cell, never one node's partial.
//!
//! ```text
//!  round 1  POST /v1/secagg/key   node: validate, calibrate, fresh X25519 key for this query id
//!                                 (one per query id, ever), signed with its node certificate
//!  round 2  POST /v1/partial      + the roster of every member's signed key; each node checks
//!                                 every entry (CA, CRL, node identity of that agency, a peer of
//!                                 its own, same calibration), adds a noise *share*, and masks
//!                                 its dense partial with pairwise masks that cancel in the sum
//! ```
//!
//! A key is used once: a second round for the same query id finds none and is refused, so a
//! coordinator cannot subtract two sums to isolate a node. A member that fails aborts the run
//! (a rerun is a new query id, with new keys and new noise). Masks: [`cxfed_protocol::secagg`];
//! shares: [`cxfed_queries::noise_share`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use cxfed_protocol::Role;
use cxfed_protocol::secagg::{self, KeyPair, Member, Roster};
use cxfed_protocol::signing::{self, hex, unhex};
use cxfed_protocol::wire::{SecAggKey, SecAggRound};

use crate::policy::PolicyRefusal;
use crate::requests::RequestChecker;

/// How long an issued key waits for its round 2.
const KEY_TTL: Duration = Duration::from_secs(300);
/// Most keys waiting at once.
const MAX_WAITING: usize = 4096;
/// Query ids remembered as used (their keys issued), oldest forgotten first.
const MAX_REMEMBERED: usize = 100_000;

/// The one-time keys this node issued and the query ids it ever issued one for.
#[derive(Default)]
pub struct KeyStore {
    inner: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    waiting: HashMap<String, (KeyPair, String, Instant)>,
    used: HashMap<String, ()>,
    order: VecDeque<String>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

/// A refusal of a secure-aggregation step, as a policy refusal the node audits.
fn refuse(reason: String) -> PolicyRefusal {
    PolicyRefusal::secure_aggregation(reason)
}

impl KeyStore {
    /// Issues the key for `query_id` committed to `calibration` (hex), or refuses a query id
    /// this node has issued a key for before.
    pub fn issue(&self, query_id: &str, calibration: &str) -> Result<[u8; 32], PolicyRefusal> {
        let key = KeyPair::generate().map_err(|e| refuse(e.to_string()))?;
        let public = key.public_key();
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.waiting
            .retain(|_, (_, _, at)| now.duration_since(*at) < KEY_TTL);
        if s.used.contains_key(query_id) {
            return Err(refuse(format!(
                "query id {query_id} already had its secure-aggregation key; a rerun needs a new query id"
            )));
        }
        if s.waiting.len() >= MAX_WAITING {
            return Err(refuse(
                "too many secure-aggregation keys are waiting for their round; try again".into(),
            ));
        }
        s.used.insert(query_id.to_string(), ());
        s.order.push_back(query_id.to_string());
        while s.order.len() > MAX_REMEMBERED {
            if let Some(old) = s.order.pop_front() {
                s.used.remove(&old);
            }
        }
        s.waiting
            .insert(query_id.to_string(), (key, calibration.to_string(), now));
        Ok(public)
    }

    /// Takes (once) the key issued for `query_id` and the calibration it committed to.
    pub fn take(&self, query_id: &str) -> Option<(KeyPair, String)> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (key, calibration, at) = s.waiting.remove(query_id)?;
        (at.elapsed() < KEY_TTL).then_some((key, calibration))
    }
}

/// SHA-256 (hex) of a node's calibration bytes.
pub fn calibration_digest(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// This node's signed round-1 answer.
pub fn signed_key(
    signer: &signing::Signer,
    federation: &str,
    query_id: &str,
    agency: &str,
    public_key: [u8; 32],
    calibration: &str,
) -> Result<SecAggKey, PolicyRefusal> {
    let mut key = SecAggKey {
        agency: agency.to_string(),
        public_key: hex(&public_key),
        calibration: calibration.to_string(),
        certificate: hex(signer.certificate()),
        signature: String::new(),
    };
    let sig = signer
        .sign_bytes(&key.message(federation, query_id))
        .map_err(|e| refuse(format!("signing the key: {e}")))?;
    key.signature = hex(&sig);
    Ok(key)
}

/// What a node checks of a round-2 roster before it masks anything.
pub struct RosterCheck<'a> {
    /// The federation.
    pub federation: &'a str,
    /// This node's agency.
    pub me: &'a str,
    /// The agencies this node knows (its peers and itself): no stranger in a roster.
    pub known: &'a [&'a str],
    /// Checks certificates against the CA and CRLs in force.
    pub certificates: &'a RequestChecker,
}

/// Checks every entry of `round` for `query_id` — a node certificate the CA accepts, of the
/// agency it names, known to this node, signing its key and the same `calibration` as ours,
/// with our own key in it — and returns the roster to mask with.
pub fn check_roster(
    round: &SecAggRound,
    query_id: &str,
    own_key: &KeyPair,
    calibration: &str,
    check: &RosterCheck<'_>,
) -> Result<Roster, PolicyRefusal> {
    let mut members = Vec::with_capacity(round.roster.len());
    for entry in &round.roster {
        let who = &entry.agency;
        let bad = |why: String| refuse(format!("roster entry {who}: {why}"));
        if !check.known.contains(&who.as_str()) {
            return Err(bad("not a node of this federation known here".into()));
        }
        let cert = unhex(&entry.certificate).ok_or_else(|| bad("certificate is not hex".into()))?;
        let sig = unhex(&entry.signature).ok_or_else(|| bad("signature is not hex".into()))?;
        let identity =
            signing::verify_bytes(&cert, &entry.message(check.federation, query_id), &sig)
                .map_err(|e| bad(format!("signature: {e}")))?;
        check
            .certificates
            .certificate_accepted(&cert)
            .map_err(|e| bad(format!("certificate not accepted: {e}")))?;
        if identity.role() != Role::Node
            || identity.agency() != who
            || identity.federation() != check.federation
        {
            return Err(bad(format!("signed by {identity}, not {who}'s node")));
        }
        if entry.calibration != calibration {
            return Err(bad(
                "its noise calibration differs from this node's (another ε, contribution bounds or key set); secure aggregation needs one calibration — ask for an ε every node allows".into(),
            ));
        }
        let public_key: [u8; 32] = unhex(&entry.public_key)
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("public key is not 32 bytes of hex".into()))?;
        if who == check.me && public_key != own_key.public_key() {
            return Err(bad("not the key this node issued for this query".into()));
        }
        members.push(Member {
            agency: who.clone(),
            public_key,
        });
    }
    if !members.iter().any(|m| m.agency == check.me) {
        return Err(refuse("this node is not in the roster".into()));
    }
    Roster::new(query_id, members).map_err(|e| refuse(e.to_string()))
}

/// Masks every statistic column (after the `groups` key columns) of a dense partial, read as
/// one vector column after column.
pub fn mask_batch(
    batch: &RecordBatch,
    groups: usize,
    me: &str,
    key: &KeyPair,
    roster: &Roster,
) -> Result<RecordBatch, String> {
    let rows = batch.num_rows();
    let mut plain = Vec::with_capacity(rows * (batch.num_columns() - groups));
    for c in groups..batch.num_columns() {
        let a = ints(batch.column(c))?;
        plain.extend((0..rows).map(|r| secagg::encode_i64(a.value(r))));
    }
    let masked = secagg::mask(&plain, me, key, roster).map_err(|e| e.to_string())?;
    let mut columns: Vec<ArrayRef> = batch.columns()[..groups].to_vec();
    for chunk in masked
        .chunks(rows.max(1))
        .take(batch.num_columns() - groups)
    {
        columns.push(Arc::new(Int64Array::from(
            chunk
                .iter()
                .map(|w| secagg::decode_i64(*w))
                .collect::<Vec<_>>(),
        )));
    }
    RecordBatch::try_new(batch.schema(), columns).map_err(|e| e.to_string())
}

/// The sum of the members' masked partials (one dense batch each, same keys in the same
/// order): the masks cancel and only the sum of noisy partials remains.
pub fn unmask(partials: &[RecordBatch], groups: usize) -> Result<RecordBatch, String> {
    let first = partials.first().ok_or("no partial to add")?;
    for (i, p) in partials.iter().enumerate() {
        if p.num_rows() != first.num_rows() || p.num_columns() != first.num_columns() {
            return Err(format!("partial {i} has another shape than the first"));
        }
        for j in 0..groups {
            if p.column(j) != first.column(j) {
                return Err(format!("partial {i} lists other groups than the first"));
            }
        }
    }
    let mut columns: Vec<ArrayRef> = first.columns()[..groups].to_vec();
    for c in groups..first.num_columns() {
        let vectors: Vec<Vec<u64>> = partials
            .iter()
            .map(|p| {
                let a = ints(p.column(c))?;
                Ok((0..a.len())
                    .map(|r| secagg::encode_i64(a.value(r)))
                    .collect())
            })
            .collect::<Result<_, String>>()?;
        let sum = secagg::unmask_sum(&vectors).map_err(|e| e.to_string())?;
        columns.push(Arc::new(Int64Array::from(
            sum.into_iter().map(secagg::decode_i64).collect::<Vec<_>>(),
        )));
    }
    RecordBatch::try_new(first.schema(), columns).map_err(|e| e.to_string())
}

fn ints(a: &ArrayRef) -> Result<&Int64Array, String> {
    let a = a
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or("a statistic column is not Int64")?;
    if a.null_count() > 0 {
        return Err("a statistic column has NULLs".into());
    }
    Ok(a)
}

/// The share shape a node uses: h honest nodes assumed by its steward (`None`: all of the
/// roster), never more than the roster holds.
pub fn honest_for(assumed: Option<u64>, members: usize) -> u64 {
    let n = members as u64;
    assumed.map_or(n, |h| h.min(n)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_issued_once_per_query_id_and_taken_once() {
        let store = KeyStore::default();
        let k = store.issue("q1", "c").expect("issue");
        assert!(store.issue("q1", "c").is_err(), "a repeated query id");
        let (key, cal) = store.take("q1").expect("take");
        assert_eq!((key.public_key(), cal.as_str()), (k, "c"));
        assert!(store.take("q1").is_none(), "taken once");
        assert!(store.issue("q1", "c").is_err(), "still refused after use");
    }

    #[test]
    fn honest_nodes_never_exceed_the_roster() {
        assert_eq!(honest_for(None, 3), 3);
        assert_eq!(honest_for(Some(5), 3), 3);
        assert_eq!(honest_for(Some(1), 3), 1);
        assert_eq!(honest_for(Some(0), 3), 1);
    }

    #[test]
    fn masked_batches_add_up_to_the_plain_sum() {
        use arrow::array::StringArray;
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("__g0", DataType::Utf8, true),
            Field::new("__a0_n", DataType::Int64, false),
            Field::new("__persons", DataType::Int64, false),
        ]));
        let batch = |n: [i64; 2]| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(vec!["a", "b"])),
                    Arc::new(Int64Array::from(n.to_vec())),
                    Arc::new(Int64Array::from(vec![0, 0])),
                ],
            )
            .expect("batch")
        };
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().expect("key")).collect();
        let names = ["CMS", "OPM", "SSA"];
        let roster = Roster::new(
            "q",
            names
                .iter()
                .zip(&keys)
                .map(|(a, k)| Member {
                    agency: a.to_string(),
                    public_key: k.public_key(),
                })
                .collect(),
        )
        .expect("roster");
        let plain = [[5, -2], [7, 0], [-1, 3]];
        let masked: Vec<RecordBatch> = plain
            .iter()
            .zip(names.iter().zip(&keys))
            .map(|(p, (a, k))| mask_batch(&batch(*p), 1, a, k, &roster).expect("mask"))
            .collect();
        let one = ints(masked[0].column(1)).expect("ints");
        assert_ne!(one.values().to_vec(), vec![5, -2], "masked");
        let sum = unmask(&masked, 1).expect("sum");
        assert_eq!(
            ints(sum.column(1)).expect("ints").values().to_vec(),
            vec![11, 1]
        );
        assert!(
            unmask(&masked[..2], 1).is_ok_and(|s| ints(s.column(1))
                .expect("ints")
                .values()
                .to_vec()
                != vec![11, 1])
        );
    }
}
