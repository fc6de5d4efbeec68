//! Private **intersection-sum with grouping** over ristretto255, in the style of Google's
//! Private Join and Compute but with exponential EC-ElGamal instead of Paillier: a node A holding
//! per-person values and a node B holding a membership set learn nothing of each other's people,
//! and a result holder C (the coordinator) learns, per (A-group, B-group) cell, the count, sum
//! and sum of squares of A's values over the people at both, and per A-group the same over the
//! people at A only, each with an integer offset (the caller's noise) added. Pure computation:
//! nothing here touches the network.
//!
//! # The protocol (semi-honest)
//! A holds records `(x, g_A(x), v_x)`: a keyed linkage value (32 bytes, see the node's `linkage`
//! module), an A-group in `0..ga` and a value in `0..=max` (clipped by the caller). B holds the
//! set Y of linkage values, each with a B-group `g_B(y)` in `0..gb`. `H` is
//! [`psi::hash_to_point`](crate::psi::hash_to_point)
//! (the PSI-cardinality hash; nobody knows a discrete log between two `H` values). A and B each
//! draw a fresh secret scalar (α, β); C draws a fresh ElGamal key `s`, `P = s·G`.
//! `Enc(m) = (r·G, m·G + r·P)` with a fresh `r`: exponential ElGamal, additively homomorphic.
//! ```text
//!  C                              A                                       B
//!  ResultKey::new: s, P = sG
//!   ──P──▶ A and B
//!                                                 ◀──m1──   MemberParty::new:
//!                                                           m1 = shuffle((H(y)^β, g_B(y)) : y ∈ Y)
//!                                 ValueParty::respond:
//!                                 m2.members = shuffle((p^α, b) : (p, b) ∈ m1)  = (H(y)^βα, g_B(y))
//!                                 m2.records = shuffle((H(x)^α, E_x) : x ∈ X)
//!                                   E_x = [Enc(1[a = g_A(x)]), Enc(v_x·1[..]), Enc(v_x²·1[..])
//!                                          : a ∈ 0..ga]                        (3·ga ciphertexts)
//!                                                 ──m2──▶   MemberParty::aggregate:
//!                                                           x matched in group b iff
//!                                                             (H(x)^α)^β = some labelled H(y)^βα
//!                                                           S[a,b] = Σ_{x matched in b} E_x[a]
//!                                                           U[a]   = Σ_{x not matched}  E_x[a]
//!                                                           each + Enc(noise), re-randomized
//!   ◀──────────────────────────────────m3 = (S, U)──────────
//!  ResultKey::decrypt: m = dlog(c2 − s·c1) by baby-step giant-step, |m| ≤ bound (DiscreteLog)
//! ```
//! The payload is a one-hot vector so that B can add a record's ciphertext for A-group `a` into
//! cell `(a, b)` without learning `a`: every other slot encrypts 0.
//!
//! # Who learns what
//! - **A** learns |Y| and |Y_b| for every B-group b (B's groups travel in the clear in m1), and
//!   C's public key. Not which of its records are at B, nor any sum (all encrypted to C).
//! - **B** learns |X| (A's distinct records: the length of m2.records), `ga`, and the exact
//!   intersection count per B-group, |X ∩ Y_b| (hence also |X \ Y|): it sees which doubly blinded
//!   labelled points matched, but not which of its y (A reshuffled m2.members) nor which x (A
//!   blinded with α and shuffled m2.records). It learns nothing of A's groups or values: they are
//!   encrypted to C (semantic security of ElGamal under DDH on ristretto255). These counts carry
//!   no noise; hiding them (dummy matches, circuit PSI) is not implemented. A small B-group
//!   discloses: if |Y_b| = 1, B learns whether that one person is at A (and A learns that B's
//!   group b has one person).
//! - **C** learns only the released values: per cell the count, sum and sum of squares plus the
//!   caller's offsets (noisy, if the caller passes noise), per A-group the same for the
//!   unmatched, and `ga`, `gb`. Re-randomization makes m3 independent of
//!   A's ciphertexts. **Unless C colludes with B**: B chose the noise offsets, so together they get
//!   the exact sums; and C's key opens every payload B received, so together they get A's table
//!   row by row (A-group, value, matched B-group or none), without the linkage values. A with C
//!   learns nothing beyond C's releases and A's own records.
//! - A and B together (α and β) can blind any guessed value and learn exactly which people are
//!   shared; with the federation's linkage key they could enumerate SSNs. Hence every secret is
//!   fresh per run, never stored, zeroized when dropped, and `Debug` never shows it.
//! - Semi-honest only: nothing proves that a payload is one-hot or within `0..=max`, that B summed
//!   every record or added the agreed noise. A deviating A can plant any value; a deviating B can
//!   release a single record's payload (still with noise, if it adds it).
//! - Sensitivity (for the caller's noise): one of A's people moves at most (1, max, max²) into or
//!   out of one cell; one of B's people moves one of A's records between `U[a]` and `S[a, b]`
//!   (or between two B-groups).
//!   The caller must aggregate to **one record per person** before calling: repeated linkage
//!   values are deduplicated on each side (the first record of a value is kept, later ones are
//!   dropped, the way [`crate::psi::Party::blind`] deduplicates).
//!
//! # Checks and encodings
//! Every received point (C's public key, labelled points, record points, both halves of every
//! ciphertext) is refused if its encoding is not canonical or if it is the identity (honest
//! parties produce the identity with probability about 2^-252); errors name the position
//! ([`Location`]). Group counts, group labels, payload lengths, the number and labels of the
//! reblinded members B gets back, and the number of sums C gets are checked. Points travel as
//! 64-character hex strings, ciphertexts as 128-character ones.
//!
//! # Costs
//! Measured with the ignored test `per_record_costs` (release build, 2,000 records a side, ga = 3,
//! gb = 2, one thread, on a shared and busy 2-core machine, so ±20%): B's m1 about 40–70 µs a
//! member; A's m2 about 300 µs a record (3·ga = 9 encryptions, each two fixed-base
//! multiplications, compressed in one batch per record; plus the blinding of the record and of
//! one member); B's m3 about 100–120 µs a record (decompressing 2·3·ga points dominates); C
//! builds the ±2^32 table in 0.25 s (65,536 points, a few MB; reuse it) and decrypts a small
//! value in well under 1 ms, a value near the bound in about 0.5 s (131,072 giant steps). m2 is
//! about 1.3 kB a record in JSON for ga = 3 (`(6·ga + 1)·64` hex digits plus framing): the one-hot
//! payload suits a few A-groups; for many, run once per group.
//!
//! Exponential ElGamal is written here directly on curve25519-dalek's `RistrettoPoint` (encrypt,
//! add, re-randomize, decrypt, a baby-step giant-step discrete log): the `elastic-elgamal` crate
//! depends on curve25519-dalek 4, which conflicts with the workspace's curve25519-dalek 5.

use std::collections::{HashMap, HashSet};

use curve25519_dalek::constants::{RISTRETTO_BASEPOINT_POINT, RISTRETTO_BASEPOINT_TABLE};
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoBasepointTable, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rayon::prelude::*;
use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::psi::{RandomFailed, hash_to_point, random_scalar, shuffle};
use crate::signing::{hex, unhex};

/// The default discrete-log range of [`DiscreteLog::new`]: released values with |m| ≤ 2^32.
pub const DEFAULT_BOUND: u64 = 1 << 32;

/// The largest discrete-log range [`DiscreteLog::new`] accepts (a table of 2^20 points).
pub const MAX_BOUND: u64 = 1 << 40;

/// The most groups either side may have.
pub const MAX_GROUPS: u32 = 1024;

/// The most (A-group, B-group) cells a run may have.
pub const MAX_CELLS: u64 = 1 << 16;

/// Statistics per cell: count, sum, sum of squares.
const STATS: usize = 3;

/// A compressed ristretto255 point as it travels: 32 bytes, in JSON a 64-character hex string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointBytes(pub [u8; 32]);

impl std::fmt::Debug for PointBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PointBytes({})", hex(&self.0))
    }
}

impl Serialize for PointBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for PointBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = unhex(&s)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| serde::de::Error::custom("a point must be 64 hex digits"))?;
        Ok(PointBytes(bytes))
    }
}

/// An exponential-ElGamal ciphertext `(r·G, m·G + r·P)`, both halves compressed; in JSON one
/// 128-character hex string (`c1` then `c2`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ciphertext {
    /// `r·G`.
    pub c1: PointBytes,
    /// `m·G + r·P`.
    pub c2: PointBytes,
}

impl std::fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ciphertext({}, {})", hex(&self.c1.0), hex(&self.c2.0))
    }
}

impl Serialize for Ciphertext {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(&self.c1.0);
        both[32..].copy_from_slice(&self.c2.0);
        s.serialize_str(&hex(&both))
    }
}

impl<'de> Deserialize<'de> for Ciphertext {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = unhex(&s)
            .filter(|b| b.len() == 64)
            .ok_or_else(|| serde::de::Error::custom("a ciphertext must be 128 hex digits"))?;
        let (mut c1, mut c2) = ([0u8; 32], [0u8; 32]);
        c1.copy_from_slice(&bytes[..32]);
        c2.copy_from_slice(&bytes[32..]);
        Ok(Ciphertext {
            c1: PointBytes(c1),
            c2: PointBytes(c2),
        })
    }
}

/// A released statistic of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// The number of people.
    Count,
    /// The sum of their values.
    Sum,
    /// The sum of the squares of their values.
    SumSq,
}

impl Stat {
    /// The three statistics in the order they travel.
    pub const ALL: [Stat; 3] = [Stat::Count, Stat::Sum, Stat::SumSq];
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stat::Count => "count",
            Stat::Sum => "sum",
            Stat::SumSq => "sum of squares",
        })
    }
}

/// A released cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell {
    /// A's people of A-group `a_group` that are at B in B-group `b_group`.
    Matched {
        /// The A-group.
        a_group: u32,
        /// The B-group.
        b_group: u32,
    },
    /// A's people of A-group `a_group` that are not at B.
    Unmatched {
        /// The A-group.
        a_group: u32,
    },
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Matched { a_group, b_group } => {
                write!(f, "cell (A-group {a_group}, B-group {b_group})")
            }
            Cell::Unmatched { a_group } => write!(f, "the unmatched cell of A-group {a_group}"),
        }
    }
}

/// Where in an input or a message a refused value sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// C's public key.
    PublicKey,
    /// Entry `i` of the caller's own input.
    Input(usize),
    /// Labelled point `i` of a members list (m1, or m2's reblinded copy).
    Member(usize),
    /// The blinded point of record `i` of m2.
    Record(usize),
    /// Ciphertext `index` of the payload of record `record` of m2.
    Payload {
        /// The record.
        record: usize,
        /// The ciphertext's position in the payload.
        index: usize,
    },
    /// A released ciphertext of m3.
    Output {
        /// The cell.
        cell: Cell,
        /// The statistic.
        stat: Stat,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::PublicKey => f.write_str("the result holder's public key"),
            Location::Input(i) => write!(f, "input entry {i}"),
            Location::Member(i) => write!(f, "labelled point {i} of the members list"),
            Location::Record(i) => write!(f, "the point of record {i}"),
            Location::Payload { record, index } => {
                write!(f, "ciphertext {index} of the payload of record {record}")
            }
            Location::Output { cell, stat } => write!(f, "the {stat} of {cell}"),
        }
    }
}

/// Why a PSI-sum step failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PsiSumError {
    /// Bytes that are not a canonical ristretto255 point (the peer misbehaved).
    #[error("{0} is not a canonical ristretto255 point")]
    NotAPoint(Location),
    /// The identity point, which no honest party sends.
    #[error("{0} is the identity point")]
    Identity(Location),
    /// The same point twice where each must be distinct.
    #[error("{0} repeats an earlier point")]
    DuplicatePoint(Location),
    /// A-group count 0 or above [`MAX_GROUPS`].
    #[error("{0} A-groups: a run needs 1 to {MAX_GROUPS}")]
    AGroups(u32),
    /// B-group count 0 or above [`MAX_GROUPS`].
    #[error("{0} B-groups: a run needs 1 to {MAX_GROUPS}")]
    BGroups(u32),
    /// More than [`MAX_CELLS`] cells.
    #[error("{a_groups} A-groups × {b_groups} B-groups is more than {MAX_CELLS} cells")]
    TooManyCells {
        /// A-groups.
        a_groups: u32,
        /// B-groups.
        b_groups: u32,
    },
    /// A group index outside `0..groups`.
    #[error("{location} has group {group}, outside 0..{groups}")]
    GroupOutOfRange {
        /// Where.
        location: Location,
        /// The group index found.
        group: u32,
        /// The number of groups.
        groups: u32,
    },
    /// One of A's values above the agreed clip bound.
    #[error("{location} has value {value}, above the clip bound {max}")]
    ValueAboveMax {
        /// Where.
        location: Location,
        /// The value.
        value: u32,
        /// The clip bound.
        max: u32,
    },
    /// A record of m2 whose payload is not 3·ga ciphertexts.
    #[error("record {record} carries {got} ciphertexts, expected {expected} (3 per A-group)")]
    PayloadLength {
        /// The record.
        record: usize,
        /// Ciphertexts found.
        got: usize,
        /// 3·ga.
        expected: usize,
    },
    /// A message's group count differs from the party's own.
    #[error("the message says {got} B-groups, this run has {expected}")]
    GroupsMismatch {
        /// The message's count.
        got: u32,
        /// The party's count.
        expected: u32,
    },
    /// m2's reblinded members list is not as long as the m1 B sent.
    #[error("the reblinded members list has {got} points, B sent {expected}")]
    MemberCount {
        /// Points received.
        got: usize,
        /// Points B sent.
        expected: usize,
    },
    /// m2's reblinded members list carries a B-group label a different number of times than m1.
    #[error(
        "the reblinded members list labels {got} points with B-group {group}, B sent {expected}"
    )]
    MemberLabels {
        /// The B-group.
        group: u32,
        /// Labels received.
        got: u64,
        /// Labels B sent.
        expected: u64,
    },
    /// m3 carries the wrong number of ciphertexts.
    #[error("the sums message has {got} {what} ciphertexts, expected {expected}")]
    SumsLength {
        /// `"matched"` or `"unmatched"`.
        what: &'static str,
        /// Ciphertexts found.
        got: usize,
        /// 3·ga·gb or 3·ga.
        expected: usize,
    },
    /// A released value outside the discrete-log range (noise or sums beyond the bound).
    #[error("the {stat} of {cell} is outside the decryptable range ±{bound}")]
    OutOfRange {
        /// The cell.
        cell: Cell,
        /// The statistic.
        stat: Stat,
        /// The range's bound.
        bound: u64,
    },
    /// A discrete-log range above [`MAX_BOUND`].
    #[error("a discrete-log range of ±{0} is above the maximum ±{MAX_BOUND}")]
    BoundTooLarge(u64),
    /// The system's random number generator failed.
    #[error("the random number generator failed")]
    Random,
}

/// A labelled blinded point: a point and the B-group of the value behind it.
pub type Labelled = (PointBytes, u32);

/// C's public key for one run, as it travels to A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicKey(pub PointBytes);

impl PublicKey {
    /// The key as a point, refused if it is not canonical or the identity (an identity key would
    /// make every ciphertext's `c2` the plaintext `m·G`).
    fn point(&self) -> Result<RistrettoPoint, PsiSumError> {
        decode(&self.0, Location::PublicKey)
    }
}

/// m1, B → A: B's distinct values blinded with β, each with its B-group, in random order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersMessage {
    /// B's number of groups, `gb`.
    pub b_groups: u32,
    /// `(H(y)^β, g_B(y))` for every distinct y, shuffled.
    pub members: Vec<Labelled>,
}

/// One of A's records in m2: its blinded point and its encrypted one-hot payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `H(x)^α`.
    pub point: PointBytes,
    /// `3·ga` ciphertexts: for A-group `a`, at `3a`, `3a+1`, `3a+2`, encryptions of
    /// `1[a = g_A(x)]`, `v·1[..]`, `v²·1[..]`.
    pub payload: Vec<Ciphertext>,
}

/// m2, A → B: B's members reblinded with α (labels kept) and A's records, each list shuffled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValuesMessage {
    /// A's number of groups, `ga`.
    pub a_groups: u32,
    /// B's number of groups, `gb` (echoed from m1).
    pub b_groups: u32,
    /// `(H(y)^βα, g_B(y))`, shuffled again.
    pub members: Vec<Labelled>,
    /// A's distinct records, shuffled.
    pub records: Vec<Record>,
}

/// m3, B → C: the re-randomized, offset sums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SumsMessage {
    /// `ga`.
    pub a_groups: u32,
    /// `gb`.
    pub b_groups: u32,
    /// `3·ga·gb` ciphertexts: cell `(a, b)`'s count, sum and sum of squares at
    /// `3·(a·gb + b)`, `+1`, `+2`.
    pub matched: Vec<Ciphertext>,
    /// `3·ga` ciphertexts: A-group `a`'s unmatched count, sum, sum of squares at `3a`, `+1`, `+2`.
    pub unmatched: Vec<Ciphertext>,
}

/// One of A's input records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueRecord {
    /// The keyed linkage value.
    pub linkage: [u8; 32],
    /// The A-group, in `0..ga`.
    pub group: u32,
    /// The value, already clipped to `0..=max`.
    pub value: u32,
}

/// The released statistics of one cell, offsets included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Count.
    pub count: i64,
    /// Sum of values.
    pub sum: i64,
    /// Sum of squared values.
    pub sum_sq: i64,
}

impl Stats {
    /// The statistic `stat`.
    pub fn get(&self, stat: Stat) -> i64 {
        match stat {
            Stat::Count => self.count,
            Stat::Sum => self.sum,
            Stat::SumSq => self.sum_sq,
        }
    }

    fn set(&mut self, stat: Stat, value: i64) {
        match stat {
            Stat::Count => self.count = value,
            Stat::Sum => self.sum = value,
            Stat::SumSq => self.sum_sq = value,
        }
    }
}

/// What C decrypts: every cell's released statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    a_groups: u32,
    b_groups: u32,
    matched: Vec<Stats>,
    unmatched: Vec<Stats>,
}

impl Released {
    /// `ga`.
    pub fn a_groups(&self) -> u32 {
        self.a_groups
    }

    /// `gb`.
    pub fn b_groups(&self) -> u32 {
        self.b_groups
    }

    /// Cell `(a_group, b_group)`; `None` outside the grid.
    pub fn matched(&self, a_group: u32, b_group: u32) -> Option<Stats> {
        if a_group >= self.a_groups || b_group >= self.b_groups {
            return None;
        }
        self.matched
            .get(a_group as usize * self.b_groups as usize + b_group as usize)
            .copied()
    }

    /// The unmatched cell of `a_group`; `None` outside `0..ga`.
    pub fn unmatched(&self, a_group: u32) -> Option<Stats> {
        self.unmatched.get(a_group as usize).copied()
    }

    /// A cell; `None` outside the grid.
    pub fn cell(&self, cell: Cell) -> Option<Stats> {
        match cell {
            Cell::Matched { a_group, b_group } => self.matched(a_group, b_group),
            Cell::Unmatched { a_group } => self.unmatched(a_group),
        }
    }
}

/// C's ElGamal key pair for one run: a fresh secret scalar, zeroized on drop, never shown by
/// `Debug`.
pub struct ResultKey {
    secret: Scalar,
    public: RistrettoPoint,
}

impl std::fmt::Debug for ResultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ResultKey(<redacted>, public {})",
            hex(self.public.compress().as_bytes())
        )
    }
}

impl Drop for ResultKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ResultKey {
    /// A fresh key pair.
    pub fn new() -> Result<ResultKey, PsiSumError> {
        let secret = random_scalar(&SystemRandom::new())?;
        let public = RistrettoPoint::mul_base(&secret);
        Ok(ResultKey { secret, public })
    }

    /// The public key, for A and B.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(PointBytes(self.public.compress().to_bytes()))
    }

    /// Decrypts every released ciphertext of m3, each by a discrete log within `dlog`'s range.
    /// A value outside it is [`PsiSumError::OutOfRange`].
    pub fn decrypt(&self, sums: &SumsMessage, dlog: &DiscreteLog) -> Result<Released, PsiSumError> {
        let (ga, gb) = (sums.a_groups, sums.b_groups);
        check_groups(ga, gb)?;
        let matched_len = STATS * ga as usize * gb as usize;
        if sums.matched.len() != matched_len {
            return Err(PsiSumError::SumsLength {
                what: "matched",
                got: sums.matched.len(),
                expected: matched_len,
            });
        }
        if sums.unmatched.len() != STATS * ga as usize {
            return Err(PsiSumError::SumsLength {
                what: "unmatched",
                got: sums.unmatched.len(),
                expected: STATS * ga as usize,
            });
        }
        let open = |ct: &Ciphertext, cell: Cell, stat: Stat| -> Result<i64, PsiSumError> {
            let location = Location::Output { cell, stat };
            let (c1, c2) = (decode(&ct.c1, location)?, decode(&ct.c2, location)?);
            dlog.solve(&(c2 - c1 * self.secret))
                .ok_or(PsiSumError::OutOfRange {
                    cell,
                    stat,
                    bound: dlog.bound,
                })
        };
        let mut matched = vec![Stats::default(); ga as usize * gb as usize];
        for (i, stats) in matched.iter_mut().enumerate() {
            let cell = Cell::Matched {
                a_group: (i / gb as usize) as u32,
                b_group: (i % gb as usize) as u32,
            };
            for (k, stat) in Stat::ALL.into_iter().enumerate() {
                stats.set(stat, open(&sums.matched[STATS * i + k], cell, stat)?);
            }
        }
        let mut unmatched = vec![Stats::default(); ga as usize];
        for (a, stats) in unmatched.iter_mut().enumerate() {
            let cell = Cell::Unmatched { a_group: a as u32 };
            for (k, stat) in Stat::ALL.into_iter().enumerate() {
                stats.set(stat, open(&sums.unmatched[STATS * a + k], cell, stat)?);
            }
        }
        Ok(Released {
            a_groups: ga,
            b_groups: gb,
            matched,
            unmatched,
        })
    }
}

/// A baby-step giant-step table for discrete logs `m` with |m| ≤ `bound`: about √bound baby
/// steps `j·G` (compressed), then at most about 2·√bound giant steps, searched outwards from 0
/// so that small values are found first. Holds no secret; build it once and reuse it.
pub struct DiscreteLog {
    bound: u64,
    step: u64,
    baby: HashMap<[u8; 32], u64>,
}

impl std::fmt::Debug for DiscreteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiscreteLog(±{}, step {})", self.bound, self.step)
    }
}

impl DiscreteLog {
    /// A table for |m| ≤ `bound` (at most [`MAX_BOUND`]; [`DEFAULT_BOUND`] is ±2^32).
    pub fn new(bound: u64) -> Result<DiscreteLog, PsiSumError> {
        if bound > MAX_BOUND {
            return Err(PsiSumError::BoundTooLarge(bound));
        }
        // step = ⌈√bound⌉, at least 1.
        let mut step = (bound as f64).sqrt() as u64;
        while step * step < bound {
            step += 1;
        }
        let step = step.max(1);
        let mut baby = HashMap::with_capacity(step as usize);
        let mut p = RistrettoPoint::identity();
        for j in 0..step {
            baby.insert(p.compress().to_bytes(), j);
            p += RISTRETTO_BASEPOINT_POINT;
        }
        Ok(DiscreteLog { bound, step, baby })
    }

    /// The range's bound.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// `m` with `m·G = point` and |m| ≤ bound, or `None`.
    pub fn solve(&self, point: &RistrettoPoint) -> Option<i64> {
        let giant = RISTRETTO_BASEPOINT_TABLE * &Scalar::from(self.step);
        let look = |q: &RistrettoPoint| self.baby.get(q.compress().as_bytes()).copied();
        // m = k·step + j with k ≥ 0 (point − k·step·G = j·G) or k < 0 (point + |k|·step·G).
        let (max_up, max_down) = (self.bound / self.step, self.bound.div_ceil(self.step));
        let (mut up, mut down) = (*point, *point + giant);
        let mut k = 0u64;
        while k <= max_up || k < max_down {
            if k <= max_up {
                if let Some(j) = look(&up) {
                    let m = k * self.step + j;
                    return (m <= self.bound).then_some(m as i64);
                }
                up -= giant;
            }
            if k < max_down {
                if let Some(j) = look(&down) {
                    let m = (k + 1) * self.step - j;
                    return (m <= self.bound).then_some(-(m as i64));
                }
                down += giant;
            }
            k += 1;
        }
        None
    }
}

/// Party A (the values) for one run: a fresh secret scalar α, zeroized on drop, never shown by
/// `Debug`.
pub struct ValueParty {
    secret: Scalar,
    rng: SystemRandom,
    a_groups: u32,
    max: u32,
}

impl std::fmt::Debug for ValueParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ValueParty(<redacted>, {} A-groups, max {})",
            self.a_groups, self.max
        )
    }
}

impl Drop for ValueParty {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ValueParty {
    /// A with `a_groups` groups (1 to [`MAX_GROUPS`]) and values clipped to `0..=max`.
    pub fn new(a_groups: u32, max: u32) -> Result<ValueParty, PsiSumError> {
        if a_groups == 0 || a_groups > MAX_GROUPS {
            return Err(PsiSumError::AGroups(a_groups));
        }
        let rng = SystemRandom::new();
        let secret = random_scalar(&rng)?;
        Ok(ValueParty {
            secret,
            rng,
            a_groups,
            max,
        })
    }

    /// m2 from C's key, B's m1 and A's records (one per person: a repeated linkage value keeps
    /// its first record, later ones are dropped; every record is checked all the same).
    pub fn respond(
        &self,
        key: &PublicKey,
        m1: &MembersMessage,
        records: &[ValueRecord],
    ) -> Result<ValuesMessage, PsiSumError> {
        let enc = Encryptor::new(key)?;
        let gb = m1.b_groups;
        check_groups(self.a_groups, gb)?;
        let mut seen = HashSet::with_capacity(m1.members.len());
        for (i, (bytes, group)) in m1.members.iter().enumerate() {
            let location = Location::Member(i);
            check_group(*group, gb, location)?;
            if !seen.insert(*bytes) {
                return Err(PsiSumError::DuplicatePoint(location));
            }
        }
        drop(seen);
        // The curve work, in parallel (the first error by position is the one reported).
        let mut members = m1
            .members
            .par_iter()
            .enumerate()
            .map(|(i, (bytes, group))| {
                let point = decode(bytes, Location::Member(i))?;
                Ok((compress(&(point * self.secret)), *group))
            })
            .collect::<Result<Vec<_>, PsiSumError>>()?;
        shuffle(&self.rng, &mut members)?;

        let mut distinct = HashSet::with_capacity(records.len());
        let mut kept = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let location = Location::Input(i);
            check_group(r.group, self.a_groups, location)?;
            if r.value > self.max {
                return Err(PsiSumError::ValueAboveMax {
                    location,
                    value: r.value,
                    max: self.max,
                });
            }
            if distinct.insert(r.linkage) {
                kept.push(r);
            }
        }
        drop(distinct);
        let mut out = kept
            .par_iter()
            .map(|r| {
                let v = u64::from(r.value);
                let mut halves = Vec::with_capacity(2 * STATS * self.a_groups as usize);
                for a in 0..self.a_groups {
                    let hot = a == r.group;
                    for m in [1, v, v * v] {
                        enc.push_half(&self.rng, if hot { m } else { 0 }, &mut halves)?;
                    }
                }
                Ok(Record {
                    point: compress(&(hash_to_point(&r.linkage) * self.secret)),
                    payload: pairs(&halves),
                })
            })
            .collect::<Result<Vec<_>, PsiSumError>>()?;
        shuffle(&self.rng, &mut out)?;
        Ok(ValuesMessage {
            a_groups: self.a_groups,
            b_groups: gb,
            members,
            records: out,
        })
    }
}

/// Party B (the members) for one run: a fresh secret scalar β, zeroized on drop, never shown by
/// `Debug`; remembers how many points of each B-group it sent, to check A's reblinded copy.
pub struct MemberParty {
    secret: Scalar,
    rng: SystemRandom,
    b_groups: u32,
    sent: Vec<u64>,
}

impl std::fmt::Debug for MemberParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemberParty(<redacted>, {} B-groups, {} members)",
            self.b_groups,
            self.sent.iter().sum::<u64>()
        )
    }
}

impl Drop for MemberParty {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl MemberParty {
    /// B with `b_groups` groups (1 to [`MAX_GROUPS`]) and its members `(linkage value,
    /// B-group)` (a repeated linkage value keeps its first group), and m1.
    pub fn new(
        b_groups: u32,
        members: &[([u8; 32], u32)],
    ) -> Result<(MemberParty, MembersMessage), PsiSumError> {
        if b_groups == 0 || b_groups > MAX_GROUPS {
            return Err(PsiSumError::BGroups(b_groups));
        }
        let rng = SystemRandom::new();
        let secret = random_scalar(&rng)?;
        let mut sent = vec![0u64; b_groups as usize];
        let mut distinct = HashSet::with_capacity(members.len());
        let mut kept = Vec::with_capacity(members.len());
        for (i, (linkage, group)) in members.iter().enumerate() {
            check_group(*group, b_groups, Location::Input(i))?;
            if !distinct.insert(*linkage) {
                continue;
            }
            kept.push((linkage, *group));
            if let Some(n) = sent.get_mut(*group as usize) {
                *n += 1;
            }
        }
        drop(distinct);
        let mut out: Vec<(PointBytes, u32)> = kept
            .par_iter()
            .map(|(linkage, group)| (compress(&(hash_to_point(linkage) * secret)), *group))
            .collect();
        shuffle(&rng, &mut out)?;
        let party = MemberParty {
            secret,
            rng,
            b_groups,
            sent,
        };
        let m1 = MembersMessage {
            b_groups,
            members: out,
        };
        Ok((party, m1))
    }

    /// m3 from C's key and A's m2: every record matched, its payload added into its cells,
    /// `noise(cell, stat)` added to every released value (the caller samples it, e.g. discrete
    /// Laplace; `&|_, _| 0` for none), every ciphertext re-randomized. `ga` is taken from m2
    /// (within [`MAX_GROUPS`] and [`MAX_CELLS`]); the caller checks it is the query's.
    pub fn aggregate(
        &self,
        key: &PublicKey,
        m2: &ValuesMessage,
        noise: &dyn Fn(Cell, Stat) -> i64,
    ) -> Result<SumsMessage, PsiSumError> {
        self.aggregate_released(key, m2, noise, &|_| true)
    }

    /// Like [`MemberParty::aggregate`], releasing only the statistics `released` accepts: the
    /// others are sent as fresh encryptions of 0 (what a query does not ask for, C cannot
    /// decrypt, so it needs no noise and costs no ε).
    pub fn aggregate_released(
        &self,
        key: &PublicKey,
        m2: &ValuesMessage,
        noise: &dyn Fn(Cell, Stat) -> i64,
        released: &dyn Fn(Stat) -> bool,
    ) -> Result<SumsMessage, PsiSumError> {
        let enc = Encryptor::new(key)?;
        if m2.b_groups != self.b_groups {
            return Err(PsiSumError::GroupsMismatch {
                got: m2.b_groups,
                expected: self.b_groups,
            });
        }
        let (ga, gb) = (m2.a_groups, self.b_groups);
        check_groups(ga, gb)?;
        let expected: usize = self.sent.iter().map(|&n| n as usize).sum();
        if m2.members.len() != expected {
            return Err(PsiSumError::MemberCount {
                got: m2.members.len(),
                expected,
            });
        }
        let mut labels = vec![0u64; gb as usize];
        let mut members = HashMap::with_capacity(m2.members.len());
        m2.members
            .par_iter()
            .enumerate()
            .try_for_each(|(i, (bytes, _))| decode(bytes, Location::Member(i)).map(|_| ()))?;
        for (i, (bytes, group)) in m2.members.iter().enumerate() {
            let location = Location::Member(i);
            check_group(*group, gb, location)?;
            if members.insert(*bytes, *group).is_some() {
                return Err(PsiSumError::DuplicatePoint(location));
            }
            if let Some(n) = labels.get_mut(*group as usize) {
                *n += 1;
            }
        }
        for (group, (&got, &expected)) in labels.iter().zip(&self.sent).enumerate() {
            if got != expected {
                return Err(PsiSumError::MemberLabels {
                    group: group as u32,
                    got,
                    expected,
                });
            }
        }

        let width = STATS * ga as usize;
        let zero = (RistrettoPoint::identity(), RistrettoPoint::identity());
        let mut seen = HashSet::with_capacity(m2.records.len());
        for (i, record) in m2.records.iter().enumerate() {
            if !seen.insert(record.point) {
                return Err(PsiSumError::DuplicatePoint(Location::Record(i)));
            }
            if record.payload.len() != width {
                return Err(PsiSumError::PayloadLength {
                    record: i,
                    got: record.payload.len(),
                    expected: width,
                });
            }
        }
        drop(seen);
        // Each thread sums its share of the records into its own accumulators (B-major: one
        // `width` chunk per B-group, then the unmatched chunk); the shares are added at the end.
        let slots = width * (gb as usize + 1);
        let sum = |mut acc: Vec<(RistrettoPoint, RistrettoPoint)>,
                   (i, record): (usize, &Record)|
         -> Result<_, PsiSumError> {
            let point = decode(&record.point, Location::Record(i))?;
            // For A-group a, payload slots 3a..3a+3 go to cell (a, b), or to a's unmatched.
            let chunk = match members.get(&compress(&(point * self.secret))) {
                Some(&b) if b < gb => b as usize,
                Some(&b) => {
                    return Err(PsiSumError::GroupOutOfRange {
                        location: Location::Record(i),
                        group: b,
                        groups: gb,
                    });
                }
                None => gb as usize,
            };
            let target = &mut acc[chunk * width..(chunk + 1) * width];
            for (index, ct) in record.payload.iter().enumerate() {
                let location = Location::Payload { record: i, index };
                let (c1, c2) = (decode(&ct.c1, location)?, decode(&ct.c2, location)?);
                if let Some(acc) = target.get_mut(index) {
                    acc.0 += c1;
                    acc.1 += c2;
                }
            }
            Ok(acc)
        };
        let add = |mut x: Vec<(RistrettoPoint, RistrettoPoint)>,
                   y: Vec<(RistrettoPoint, RistrettoPoint)>| {
            for (a, b) in x.iter_mut().zip(y) {
                a.0 += b.0;
                a.1 += b.1;
            }
            x
        };
        let all = m2
            .records
            .par_iter()
            .enumerate()
            .try_fold(|| vec![zero; slots], sum)
            .try_reduce(|| vec![zero; slots], |x, y| Ok(add(x, y)))?;
        let (matched, unmatched) = all.split_at(width * gb as usize);

        // Accumulators are laid out b-major (one `width` chunk per B-group); m3 is a-major.
        let mut out_matched = Vec::with_capacity(matched.len());
        for a in 0..ga {
            for b in 0..gb {
                let cell = Cell::Matched {
                    a_group: a,
                    b_group: b,
                };
                for (k, stat) in Stat::ALL.into_iter().enumerate() {
                    let acc = matched
                        .get(b as usize * width + STATS * a as usize + k)
                        .copied()
                        .unwrap_or(zero);
                    out_matched.push(if released(stat) {
                        enc.release(&self.rng, acc, noise(cell, stat))?
                    } else {
                        enc.release(&self.rng, zero, 0)?
                    });
                }
            }
        }
        let mut out_unmatched = Vec::with_capacity(unmatched.len());
        for a in 0..ga {
            let cell = Cell::Unmatched { a_group: a };
            for (k, stat) in Stat::ALL.into_iter().enumerate() {
                let acc = unmatched
                    .get(STATS * a as usize + k)
                    .copied()
                    .unwrap_or(zero);
                out_unmatched.push(if released(stat) {
                    enc.release(&self.rng, acc, noise(cell, stat))?
                } else {
                    enc.release(&self.rng, zero, 0)?
                });
            }
        }
        Ok(SumsMessage {
            a_groups: ga,
            b_groups: gb,
            matched: out_matched,
            unmatched: out_unmatched,
        })
    }
}

/// Encryption to C's key, with a precomputed table for `r·P`.
struct Encryptor {
    public: RistrettoBasepointTable,
    /// 1/2 mod ℓ.
    half: Scalar,
}

impl Encryptor {
    fn new(key: &PublicKey) -> Result<Encryptor, PsiSumError> {
        Ok(Encryptor {
            public: RistrettoBasepointTable::create(&key.point()?),
            half: Scalar::from(2u64).invert(),
        })
    }

    /// Half of a fresh `Enc(m)`, `(r'·G, r'·P + (m/2)·G)` with `r'` uniform (so is `r = 2r'`),
    /// for [`pairs`]: doubling and compressing in a batch costs one field inversion for all,
    /// where compressing one point costs an inverse square root.
    fn push_half(
        &self,
        rng: &SystemRandom,
        m: u64,
        out: &mut Vec<RistrettoPoint>,
    ) -> Result<(), PsiSumError> {
        let mut r = random_scalar(rng)?;
        out.push(RistrettoPoint::mul_base(&r));
        let mut c2 = &self.public * &r;
        r.zeroize();
        if m != 0 {
            c2 += RistrettoPoint::mul_base(&(Scalar::from(m) * self.half));
        }
        out.push(c2);
        Ok(())
    }

    /// A fresh encryption of zero, `(r·G, r·P)`.
    fn zero(&self, rng: &SystemRandom) -> Result<(RistrettoPoint, RistrettoPoint), PsiSumError> {
        let mut r = random_scalar(rng)?;
        let pair = (RistrettoPoint::mul_base(&r), &self.public * &r);
        r.zeroize();
        Ok(pair)
    }

    /// `Enc(m)`, alone.
    #[cfg(test)]
    fn encrypt(&self, rng: &SystemRandom, m: u64) -> Result<Ciphertext, PsiSumError> {
        let mut halves = Vec::with_capacity(2);
        self.push_half(rng, m, &mut halves)?;
        Ok(pairs(&halves)[0])
    }

    /// A sum with `offset` added to its plaintext, re-randomized with a fresh `Enc(0)`.
    fn release(
        &self,
        rng: &SystemRandom,
        (c1, c2): (RistrettoPoint, RistrettoPoint),
        offset: i64,
    ) -> Result<Ciphertext, PsiSumError> {
        let (z1, z2) = self.zero(rng)?;
        let shift = RistrettoPoint::mul_base(&signed_scalar(offset));
        Ok(Ciphertext {
            c1: compress(&(c1 + z1)),
            c2: compress(&(c2 + z2 + shift)),
        })
    }
}

/// The ciphertexts whose halves are `halves` (`c1`, `c2` alternating; see
/// [`Encryptor::push_half`]): each point doubled and compressed, in one batch.
fn pairs(halves: &[RistrettoPoint]) -> Vec<Ciphertext> {
    RistrettoPoint::double_and_compress_batch(halves)
        .chunks_exact(2)
        .map(|c| Ciphertext {
            c1: PointBytes(c[0].to_bytes()),
            c2: PointBytes(c[1].to_bytes()),
        })
        .collect()
}

/// `x` as a scalar: `−|x|` mod ℓ for a negative `x`.
fn signed_scalar(x: i64) -> Scalar {
    let magnitude = Scalar::from(x.unsigned_abs());
    if x < 0 { -magnitude } else { magnitude }
}

fn compress(p: &RistrettoPoint) -> PointBytes {
    PointBytes(p.compress().to_bytes())
}

/// A received point: canonical and not the identity.
fn decode(bytes: &PointBytes, location: Location) -> Result<RistrettoPoint, PsiSumError> {
    let point = CompressedRistretto(bytes.0)
        .decompress()
        .ok_or(PsiSumError::NotAPoint(location))?;
    if point == RistrettoPoint::identity() {
        return Err(PsiSumError::Identity(location));
    }
    Ok(point)
}

fn check_group(group: u32, groups: u32, location: Location) -> Result<(), PsiSumError> {
    if group < groups {
        Ok(())
    } else {
        Err(PsiSumError::GroupOutOfRange {
            location,
            group,
            groups,
        })
    }
}

fn check_groups(ga: u32, gb: u32) -> Result<(), PsiSumError> {
    if ga == 0 || ga > MAX_GROUPS {
        return Err(PsiSumError::AGroups(ga));
    }
    if gb == 0 || gb > MAX_GROUPS {
        return Err(PsiSumError::BGroups(gb));
    }
    if u64::from(ga) * u64::from(gb) > MAX_CELLS {
        return Err(PsiSumError::TooManyCells {
            a_groups: ga,
            b_groups: gb,
        });
    }
    Ok(())
}

impl From<RandomFailed> for PsiSumError {
    fn from(_: RandomFailed) -> Self {
        PsiSumError::Random
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: seeded test data.
    struct Seeded(u64);

    impl Seeded {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u32) -> u32 {
            (self.next() % u64::from(n)) as u32
        }
    }

    fn linkage(i: u32) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[..4].copy_from_slice(&i.to_le_bytes());
        v[31] = 0x5A;
        v
    }

    const MAX: u32 = 10;

    struct Data {
        ga: u32,
        gb: u32,
        a: Vec<ValueRecord>,
        b: Vec<([u8; 32], u32)>,
    }

    /// A's people are ids `0..n_a`, B's the `n_b` ids from `n_a − shared`.
    fn data(seed: u64, n_a: u32, n_b: u32, shared: u32, ga: u32, gb: u32) -> Data {
        let mut rng = Seeded(seed);
        let a = (0..n_a)
            .map(|i| ValueRecord {
                linkage: linkage(i),
                group: rng.below(ga),
                value: rng.below(MAX + 1),
            })
            .collect();
        let b = (n_a - shared..n_a - shared + n_b)
            .map(|i| (linkage(i), rng.below(gb)))
            .collect();
        Data { ga, gb, a, b }
    }

    /// The plain join on the clear linkage values (first record of a value kept), plus offsets.
    fn oracle(d: &Data, noise: &dyn Fn(Cell, Stat) -> i64) -> Released {
        let mut y: HashMap<[u8; 32], u32> = HashMap::new();
        for (v, g) in &d.b {
            y.entry(*v).or_insert(*g);
        }
        let mut matched = vec![Stats::default(); (d.ga * d.gb) as usize];
        let mut unmatched = vec![Stats::default(); d.ga as usize];
        let mut seen = HashSet::new();
        for r in &d.a {
            if !seen.insert(r.linkage) {
                continue;
            }
            let s = match y.get(&r.linkage) {
                Some(&b) => &mut matched[(r.group * d.gb + b) as usize],
                None => &mut unmatched[r.group as usize],
            };
            let v = i64::from(r.value);
            s.count += 1;
            s.sum += v;
            s.sum_sq += v * v;
        }
        let mut out = Released {
            a_groups: d.ga,
            b_groups: d.gb,
            matched,
            unmatched,
        };
        for a in 0..d.ga {
            let cells = (0..d.gb)
                .map(|b| Cell::Matched {
                    a_group: a,
                    b_group: b,
                })
                .chain([Cell::Unmatched { a_group: a }]);
            for cell in cells {
                let i = match cell {
                    Cell::Matched { a_group, b_group } => (a_group * d.gb + b_group) as usize,
                    Cell::Unmatched { a_group } => a_group as usize,
                };
                let s = match cell {
                    Cell::Matched { .. } => &mut out.matched[i],
                    Cell::Unmatched { .. } => &mut out.unmatched[i],
                };
                for stat in Stat::ALL {
                    s.set(stat, s.get(stat) + noise(cell, stat));
                }
            }
        }
        out
    }

    struct Run {
        c: ResultKey,
        a: ValueParty,
        b: MemberParty,
        m1: MembersMessage,
        m2: ValuesMessage,
        m3: SumsMessage,
    }

    fn run(d: &Data, noise: &dyn Fn(Cell, Stat) -> i64) -> Run {
        let c = ResultKey::new().expect("C");
        let key = c.public_key();
        let (b, m1) = MemberParty::new(d.gb, &d.b).expect("m1");
        let a = ValueParty::new(d.ga, MAX).expect("A");
        let m2 = a.respond(&key, &m1, &d.a).expect("m2");
        let m3 = b.aggregate(&key, &m2, noise).expect("m3");
        Run {
            c,
            a,
            b,
            m1,
            m2,
            m3,
        }
    }

    fn no_noise(_: Cell, _: Stat) -> i64 {
        0
    }

    fn dlog() -> DiscreteLog {
        DiscreteLog::new(1 << 20).expect("table")
    }

    #[test]
    fn end_to_end_equals_the_plain_join() {
        let mut d = data(7, 200, 150, 60, 3, 2);
        // Repeated linkage values: the first record (or B-group) is kept.
        let again: Vec<ValueRecord> = d.a[130..135]
            .iter()
            .map(|r| ValueRecord {
                group: (r.group + 1) % 3,
                value: MAX - r.value,
                ..*r
            })
            .collect();
        d.a.extend(again);
        let b_again: Vec<_> = d.b[..3].iter().map(|(v, g)| (*v, 1 - *g)).collect();
        d.b.extend(b_again);
        let r = run(&d, &no_noise);
        assert_eq!(r.m1.members.len(), 150);
        assert_eq!(r.m2.records.len(), 200);
        assert!(r.m2.records.iter().all(|x| x.payload.len() == 9));
        let got = r.c.decrypt(&r.m3, &dlog()).expect("decrypt");
        let want = oracle(&d, &no_noise);
        assert_eq!(got, want);
        let total: i64 = (0..3)
            .flat_map(|a| (0..2).map(move |b| (a, b)))
            .filter_map(|(a, b)| got.matched(a, b))
            .map(|s| s.count)
            .sum();
        assert_eq!(total, 60);
        assert_eq!(got.matched(3, 0), None);
        assert_eq!(got.unmatched(3), None);
        assert_eq!(got.cell(Cell::Unmatched { a_group: 1 }), want.unmatched(1));
    }

    #[test]
    fn noise_offsets_are_added_exactly() {
        let d = data(11, 40, 30, 12, 2, 2);
        let noise = |cell: Cell, stat: Stat| -> i64 {
            let base = match cell {
                Cell::Matched { a_group, b_group } => 10 * i64::from(a_group + 2 * b_group),
                Cell::Unmatched { a_group } => -7 - i64::from(a_group),
            };
            match stat {
                Stat::Count => base - 3,
                Stat::Sum => -base * 31 - 5_000,
                Stat::SumSq => base * 1_000 + 77,
            }
        };
        let r = run(&d, &noise);
        let got = r.c.decrypt(&r.m3, &dlog()).expect("decrypt");
        assert_eq!(got, oracle(&d, &noise));
        assert!(
            got.matched(0, 0).expect("cell").sum < 0,
            "a negative release"
        );
        assert!(
            got.unmatched(1).expect("cell").sum_sq < 0,
            "a negative release"
        );
    }

    #[test]
    fn ciphertexts_are_rerandomized() {
        let d = data(3, 12, 10, 5, 2, 2);
        let r = run(&d, &no_noise);
        let key = r.c.public_key();
        let again = r.b.aggregate(&key, &r.m2, &no_noise).expect("again");
        let dl = dlog();
        assert_eq!(
            r.c.decrypt(&r.m3, &dl).expect("first"),
            r.c.decrypt(&again, &dl).expect("second")
        );
        let first: HashSet<Ciphertext> =
            r.m3.matched
                .iter()
                .chain(&r.m3.unmatched)
                .copied()
                .collect();
        assert_eq!(first.len(), 18, "every released ciphertext distinct");
        assert!(
            again
                .matched
                .iter()
                .chain(&again.unmatched)
                .all(|c| !first.contains(c)),
            "the same sums released twice share a ciphertext"
        );
        // A's payloads: the many encryptions of 0 (and of equal values) are all distinct.
        let payload: HashSet<Ciphertext> =
            r.m2.records
                .iter()
                .flat_map(|x| x.payload.clone())
                .collect();
        assert_eq!(payload.len(), 12 * 6);
        let enc = Encryptor::new(&key).expect("key");
        let rng = SystemRandom::new();
        assert_ne!(
            enc.encrypt(&rng, 5).expect("enc"),
            enc.encrypt(&rng, 5).expect("enc")
        );
    }

    #[test]
    fn every_list_is_shuffled() {
        let d = data(5, 32, 32, 32, 1, 1);
        let r = run(&d, &no_noise);
        let order = |mut a: Vec<PointBytes>, b: Vec<PointBytes>| {
            let in_order = a.clone();
            a.sort_unstable();
            let mut sorted = b.clone();
            sorted.sort_unstable();
            assert_eq!(a, sorted, "the same points");
            // 32! orders: the chance that a shuffle leaves them all in place is nil.
            assert_ne!(in_order, b, "a list kept its order");
        };
        let beta = r.b.secret;
        let alpha = r.a.secret;
        let m1: Vec<PointBytes> = r.m1.members.iter().map(|(p, _)| *p).collect();
        let y: Vec<PointBytes> =
            d.b.iter()
                .map(|(v, _)| compress(&(hash_to_point(v) * beta)))
                .collect();
        order(y, m1.clone());
        let m1_alpha: Vec<PointBytes> = m1
            .iter()
            .map(|p| compress(&(decode(p, Location::Member(0)).expect("point") * alpha)))
            .collect();
        order(m1_alpha, r.m2.members.iter().map(|(p, _)| *p).collect());
        let x: Vec<PointBytes> =
            d.a.iter()
                .map(|rec| compress(&(hash_to_point(&rec.linkage) * alpha)))
                .collect();
        order(x, r.m2.records.iter().map(|rec| rec.point).collect());
    }

    #[test]
    fn secrets_are_fresh_and_redacted() {
        let d = data(9, 8, 8, 4, 1, 1);
        let (r1, r2) = (run(&d, &no_noise), run(&d, &no_noise));
        assert_ne!(r1.c.public_key(), r2.c.public_key());
        let m1: HashSet<PointBytes> = r1.m1.members.iter().map(|(p, _)| *p).collect();
        assert!(r2.m1.members.iter().all(|(p, _)| !m1.contains(p)));
        let x1: HashSet<PointBytes> = r1.m2.records.iter().map(|x| x.point).collect();
        assert!(r2.m2.records.iter().all(|x| !x1.contains(&x.point)));
        for shown in [
            format!("{:?}", r1.c),
            format!("{:?}", r1.a),
            format!("{:?}", r1.b),
        ] {
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        assert!(!format!("{:?}", r1.c).contains(&hex(r1.c.secret.as_bytes())));
    }

    #[test]
    fn messages_round_trip_through_json() {
        let d = data(13, 6, 5, 3, 2, 2);
        let r = run(&d, &no_noise);
        let key = r.c.public_key();
        let json = serde_json::to_string(&key).expect("key");
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<PublicKey>(&json).expect("key"), key);
        let m1: MembersMessage =
            serde_json::from_str(&serde_json::to_string(&r.m1).expect("m1")).expect("m1");
        assert_eq!(m1, r.m1);
        let m2: ValuesMessage =
            serde_json::from_str(&serde_json::to_string(&r.m2).expect("m2")).expect("m2");
        assert_eq!(m2, r.m2);
        let m3: SumsMessage =
            serde_json::from_str(&serde_json::to_string(&r.m3).expect("m3")).expect("m3");
        assert_eq!(m3, r.m3);
        assert!(serde_json::from_str::<PublicKey>("\"00ff\"").is_err());
        assert!(serde_json::from_str::<Ciphertext>(&format!("\"{}\"", "zz".repeat(64))).is_err());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let d = data(17, 6, 5, 3, 2, 2);
        let r = run(&d, &no_noise);
        let key = r.c.public_key();
        let identity = PointBytes(RistrettoPoint::identity().compress().to_bytes());
        let junk = PointBytes([0xFF; 32]);

        // C's key.
        for (k, want) in [
            (identity, PsiSumError::Identity(Location::PublicKey)),
            (junk, PsiSumError::NotAPoint(Location::PublicKey)),
        ] {
            assert_eq!(r.a.respond(&PublicKey(k), &r.m1, &d.a), Err(want.clone()));
            assert_eq!(r.b.aggregate(&PublicKey(k), &r.m2, &no_noise), Err(want));
        }

        // m1 at A.
        let m1_with = |f: &dyn Fn(&mut MembersMessage)| {
            let mut m = r.m1.clone();
            f(&mut m);
            r.a.respond(&key, &m, &d.a)
        };
        assert_eq!(
            m1_with(&|m| m.members[1].0 = identity),
            Err(PsiSumError::Identity(Location::Member(1)))
        );
        assert_eq!(
            m1_with(&|m| m.members[2].0 = junk),
            Err(PsiSumError::NotAPoint(Location::Member(2)))
        );
        assert_eq!(
            m1_with(&|m| m.members[3].1 = 2),
            Err(PsiSumError::GroupOutOfRange {
                location: Location::Member(3),
                group: 2,
                groups: 2
            })
        );
        assert_eq!(
            m1_with(&|m| m.members[1].0 = m.members[0].0),
            Err(PsiSumError::DuplicatePoint(Location::Member(1)))
        );
        assert_eq!(m1_with(&|m| m.b_groups = 0), Err(PsiSumError::BGroups(0)));
        assert_eq!(
            m1_with(&|m| m.b_groups = MAX_GROUPS + 1),
            Err(PsiSumError::BGroups(MAX_GROUPS + 1))
        );

        // A's own input, B's own input.
        let mut bad = d.a.clone();
        bad[4].group = 2;
        assert_eq!(
            r.a.respond(&key, &r.m1, &bad),
            Err(PsiSumError::GroupOutOfRange {
                location: Location::Input(4),
                group: 2,
                groups: 2
            })
        );
        let mut bad = d.a.clone();
        bad[1].value = MAX + 1;
        assert_eq!(
            r.a.respond(&key, &r.m1, &bad),
            Err(PsiSumError::ValueAboveMax {
                location: Location::Input(1),
                value: MAX + 1,
                max: MAX
            })
        );
        assert_eq!(
            MemberParty::new(2, &[(linkage(1), 0), (linkage(2), 5)]).map(|(_, m)| m),
            Err(PsiSumError::GroupOutOfRange {
                location: Location::Input(1),
                group: 5,
                groups: 2
            })
        );
        assert_eq!(
            ValueParty::new(0, MAX).map(|_| ()),
            Err(PsiSumError::AGroups(0))
        );

        // m2 at B.
        let m2_with = |f: &dyn Fn(&mut ValuesMessage)| {
            let mut m = r.m2.clone();
            f(&mut m);
            r.b.aggregate(&key, &m, &no_noise)
        };
        assert_eq!(
            m2_with(&|m| m.records[2].point = junk),
            Err(PsiSumError::NotAPoint(Location::Record(2)))
        );
        assert_eq!(
            m2_with(&|m| m.records[0].point = identity),
            Err(PsiSumError::Identity(Location::Record(0)))
        );
        assert_eq!(
            m2_with(&|m| m.records[3].point = m.records[1].point),
            Err(PsiSumError::DuplicatePoint(Location::Record(3)))
        );
        assert_eq!(
            m2_with(&|m| {
                m.records[4].payload.pop();
            }),
            Err(PsiSumError::PayloadLength {
                record: 4,
                got: 5,
                expected: 6
            })
        );
        assert_eq!(
            m2_with(&|m| m.records[1].payload[4].c1 = identity),
            Err(PsiSumError::Identity(Location::Payload {
                record: 1,
                index: 4
            }))
        );
        assert_eq!(
            m2_with(&|m| m.records[5].payload[0].c2 = junk),
            Err(PsiSumError::NotAPoint(Location::Payload {
                record: 5,
                index: 0
            }))
        );
        assert_eq!(
            m2_with(&|m| m.members[0].0 = junk),
            Err(PsiSumError::NotAPoint(Location::Member(0)))
        );
        assert_eq!(
            m2_with(&|m| m.members[2].1 = 9),
            Err(PsiSumError::GroupOutOfRange {
                location: Location::Member(2),
                group: 9,
                groups: 2
            })
        );
        assert_eq!(
            m2_with(&|m| {
                m.members.pop();
            }),
            Err(PsiSumError::MemberCount {
                got: 4,
                expected: 5
            })
        );
        let group0 = r.m2.members.iter().filter(|(_, g)| *g == 0).count() as u64;
        let flipped = if r.m2.members[0].1 == 0 {
            group0 - 1
        } else {
            group0 + 1
        };
        assert_eq!(
            m2_with(&|m| m.members[0].1 = 1 - m.members[0].1),
            Err(PsiSumError::MemberLabels {
                group: 0,
                got: flipped,
                expected: group0
            })
        );
        assert_eq!(
            m2_with(&|m| m.b_groups = 3),
            Err(PsiSumError::GroupsMismatch {
                got: 3,
                expected: 2
            })
        );
        assert_eq!(m2_with(&|m| m.a_groups = 0), Err(PsiSumError::AGroups(0)));
        let err = m2_with(&|m| m.a_groups = 3).expect_err("3·3 ciphertexts expected");
        assert_eq!(
            err,
            PsiSumError::PayloadLength {
                record: 0,
                got: 6,
                expected: 9
            }
        );
        assert!(err.to_string().contains("record 0 carries 6 ciphertexts"));

        // m3 at C.
        let dl = dlog();
        let mut m3 = r.m3.clone();
        m3.matched.pop();
        assert_eq!(
            r.c.decrypt(&m3, &dl),
            Err(PsiSumError::SumsLength {
                what: "matched",
                got: 11,
                expected: 12
            })
        );
        let mut m3 = r.m3.clone();
        m3.unmatched.push(m3.unmatched[0]);
        assert_eq!(
            r.c.decrypt(&m3, &dl),
            Err(PsiSumError::SumsLength {
                what: "unmatched",
                got: 7,
                expected: 6
            })
        );
        let mut m3 = r.m3.clone();
        m3.matched[7].c1 = junk;
        let err = r.c.decrypt(&m3, &dl).expect_err("junk");
        assert_eq!(
            err,
            PsiSumError::NotAPoint(Location::Output {
                cell: Cell::Matched {
                    a_group: 1,
                    b_group: 0
                },
                stat: Stat::Sum
            })
        );
        assert!(
            err.to_string()
                .contains("the sum of cell (A-group 1, B-group 0)")
        );
    }

    /// m3 for one cell whose six released values are `values` (matched, then unmatched).
    fn released(c: &ResultKey, values: [i64; 6]) -> SumsMessage {
        let enc = Encryptor::new(&c.public_key()).expect("key");
        let rng = SystemRandom::new();
        let zero = (RistrettoPoint::identity(), RistrettoPoint::identity());
        let mut cts = values
            .iter()
            .map(|&v| enc.release(&rng, zero, v).expect("release"));
        SumsMessage {
            a_groups: 1,
            b_groups: 1,
            matched: cts.by_ref().take(3).collect(),
            unmatched: cts.collect(),
        }
    }

    #[test]
    fn decryption_is_bounded() {
        let c = ResultKey::new().expect("C");
        let small = DiscreteLog::new(1000).expect("table");
        assert_eq!(small.bound(), 1000);
        let got = c
            .decrypt(&released(&c, [0, 1000, -1000, -1, 999, -999]), &small)
            .expect("in range");
        assert_eq!(
            (got.matched(0, 0), got.unmatched(0)),
            (
                Some(Stats {
                    count: 0,
                    sum: 1000,
                    sum_sq: -1000
                }),
                Some(Stats {
                    count: -1,
                    sum: 999,
                    sum_sq: -999
                })
            )
        );
        assert_eq!(
            c.decrypt(&released(&c, [0, 1001, 0, 0, 0, 0]), &small),
            Err(PsiSumError::OutOfRange {
                cell: Cell::Matched {
                    a_group: 0,
                    b_group: 0
                },
                stat: Stat::Sum,
                bound: 1000
            })
        );
        assert_eq!(
            c.decrypt(&released(&c, [0, 0, 0, 0, 0, -1001]), &small),
            Err(PsiSumError::OutOfRange {
                cell: Cell::Unmatched { a_group: 0 },
                stat: Stat::SumSq,
                bound: 1000
            })
        );
        assert_eq!(
            c.decrypt(&released(&c, [i64::MAX, 0, 0, 0, 0, 0]), &small)
                .map(|_| ()),
            Err(PsiSumError::OutOfRange {
                cell: Cell::Matched {
                    a_group: 0,
                    b_group: 0
                },
                stat: Stat::Count,
                bound: 1000
            })
        );
        let zero = DiscreteLog::new(0).expect("table");
        assert!(c.decrypt(&released(&c, [0; 6]), &zero).is_ok());
        assert!(c.decrypt(&released(&c, [0, 0, 1, 0, 0, 0]), &zero).is_err());
        assert_eq!(
            DiscreteLog::new(MAX_BOUND + 1).map(|_| ()),
            Err(PsiSumError::BoundTooLarge(MAX_BOUND + 1))
        );
    }

    #[test]
    fn the_default_range_reaches_beyond_a_table() {
        let c = ResultKey::new().expect("C");
        let dl = DiscreteLog::new(DEFAULT_BOUND).expect("table");
        let far = 3 * (1 << 16) + 12_345;
        let got = c
            .decrypt(&released(&c, [far, -far, 0, 1, -1, 1 << 20]), &dl)
            .expect("in range");
        assert_eq!(got.matched(0, 0).expect("cell").count, far);
        assert_eq!(got.matched(0, 0).expect("cell").sum, -far);
        assert_eq!(got.unmatched(0).expect("cell").sum_sq, 1 << 20);
    }

    /// Per-record costs; run with `cargo test -p cxfed-protocol --release -- --ignored
    /// psi_sum --nocapture`.
    #[test]
    #[ignore]
    fn per_record_costs() {
        use std::time::Instant;
        let (n, ga, gb) = (2_000u32, 3, 2);
        let d = data(1, n, n, n / 2, ga, gb);
        let c = ResultKey::new().expect("C");
        let key = c.public_key();
        let t = Instant::now();
        let (b, m1) = MemberParty::new(gb, &d.b).expect("m1");
        let t_m1 = t.elapsed();
        let a = ValueParty::new(ga, MAX).expect("A");
        let t = Instant::now();
        let m2 = a.respond(&key, &m1, &d.a).expect("m2");
        let t_m2 = t.elapsed();
        let t = Instant::now();
        let m3 = b.aggregate(&key, &m2, &no_noise).expect("m3");
        let t_m3 = t.elapsed();
        let t = Instant::now();
        let dl = DiscreteLog::new(DEFAULT_BOUND).expect("table");
        let t_table = t.elapsed();
        let t = Instant::now();
        c.decrypt(&m3, &dl).expect("decrypt");
        let t_dec = t.elapsed();
        let edge = -(DEFAULT_BOUND as i64);
        let worst = released(&c, [edge; 6]);
        let t = Instant::now();
        let got = c.decrypt(&worst, &dl).expect("decrypt");
        let t_worst = t.elapsed() / 6;
        assert_eq!(got.matched(0, 0).expect("cell").count, edge);
        let bytes = serde_json::to_vec(&m2).expect("json").len();
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / f64::from(n);
        println!(
            "psi_sum, {n} records each side, ga={ga}, gb={gb}: B m1 {:.1} µs/member, \
             A m2 {:.1} µs/record (+member), B m3 {:.1} µs/record, m2 JSON {} B/record; \
             C: table ±2^32 {:.2} s, decrypt {} values {:.1} ms, one value at -2^32 {:.2} s",
            per(t_m1),
            per(t_m2),
            per(t_m3),
            bytes / n as usize,
            t_table.as_secs_f64(),
            3 * (ga * gb + ga),
            t_dec.as_secs_f64() * 1e3,
            t_worst.as_secs_f64()
        );
    }
}
