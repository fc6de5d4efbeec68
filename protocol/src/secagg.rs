//! Secure aggregation by pairwise masking over Z_2^64 (Bonawitz et al., CCS 2017, without the
//! dropout recovery): each node of a query adds to its dense partial vector one mask per other
//! node, derived from an X25519 agreement, and the masks cancel in the sum. Owns the per-query
//! key pair ([`KeyPair`]), the [`Roster`] and its canonical encoding and hash, the pairwise seeds
//! (HKDF-SHA256) and mask streams (ChaCha20), [`mask`], [`unmask_sum`] and the signed encoding
//! ([`encode_i64`], [`decode_i64`]). Pure: no I/O; signing the roster, refusing a repeated query
//! id and carrying vectors belong to the caller.
//!
//! # Threat model (semi-honest nodes, a curious coordinator)
//! - The coordinator, even with a coalition of nodes, learns only the sum of the other nodes'
//!   vectors if at least two of those are honest: an honest vector carries a mask per honest peer
//!   that the coalition cannot compute (X25519 secrets are fresh per query, never leave the node).
//! - Only if the roster is the signed one, pinned to the mTLS identities (else the coordinator
//!   adds members whose keys it owns), and a node masks once per query id (else two sums differing
//!   in one node isolate it): both checks are the caller's. Another roster, query id or length
//!   gives unrelated masks. No integrity (a node can send any vector: clip inputs), no dropout
//!   recovery (a failed node aborts the run; a rerun needs a new query id and new keys).

use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

/// The HKDF info prefix of every pairwise seed (version 1 of the derivation).
pub const SEED_INFO: &[u8] = b"cxfed secagg v1";

/// The domain prefix of a roster's canonical encoding.
const ROSTER_DOMAIN: &[u8] = b"cxfed secagg roster v1\0";

/// Why a secure-aggregation step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// Two roster entries name the same agency.
    #[error("agency {0:?} appears more than once in the secure-aggregation roster")]
    DuplicateAgency(String),
    /// Two roster entries carry the same public key (keys are fresh per node and per query).
    #[error("agencies {0:?} and {1:?} have the same public key in the secure-aggregation roster")]
    DuplicateKey(String, String),
    /// An agency name is empty.
    #[error("the secure-aggregation roster has a member with an empty agency name")]
    EmptyAgency,
    /// Fewer than two members: the "sum" would be one node's vector.
    #[error(
        "the secure-aggregation roster has {0} member(s); masking needs at least 2 (with one, \
         the sum is that node's own partial)"
    )]
    TooFewMembers(usize),
    /// The masking node is not in the roster.
    #[error(
        "agency {agency:?} is not a member of the secure-aggregation roster of query {query_id:?}"
    )]
    NotAMember {
        /// The agency that tried to mask.
        agency: String,
        /// The roster's query id.
        query_id: String,
    },
    /// The roster's public key for the masking node is not that of its secret key.
    #[error(
        "the roster's public key for agency {0:?} is not this node's key for the query (the \
         roster was altered or the key belongs to another query)"
    )]
    KeyMismatch(String),
    /// A member's public key is a low-order point: the agreement with it is all zero, so the
    /// mask would be public.
    #[error(
        "the public key of agency {0:?} is a low-order X25519 point (the shared secret would be \
         all zero)"
    )]
    LowOrderKey(String),
    /// Masked vectors of different lengths cannot be summed.
    #[error("masked vector {index} has {got} words, the first has {expected}")]
    LengthMismatch {
        /// Position of the offending vector.
        index: usize,
        /// Length of the first vector.
        expected: usize,
        /// Length of the offending vector.
        got: usize,
    },
    /// The system's random number generator failed (no key was made).
    #[error("the random number generator failed")]
    Random,
    /// The key derivation failed (ring refused the output length; never expected).
    #[error("the pairwise seed derivation failed")]
    Kdf,
}

/// A node's X25519 key pair for one query: the secret is drawn from the OS CSPRNG, never
/// serialized, and zeroized on drop; `Debug` never shows it. Make a new one per query id.
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// A fresh key pair from `ring`'s system random number generator.
    pub fn generate() -> Result<KeyPair, SecAggError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| SecAggError::Random)?;
        Ok(KeyPair::from_secret_bytes(*bytes))
    }

    /// The key pair of a given 32-byte secret (clamped as X25519 does). For tests and
    /// simulations that must be reproducible; nodes use [`KeyPair::generate`].
    pub fn from_secret_bytes(bytes: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }

    /// The public key, as it goes into the [`Roster`].
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }
}

/// One member of a roster: an agency and its X25519 public key for the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The agency (as in its mTLS identity).
    pub agency: String,
    /// Its X25519 public key for this query.
    pub public_key: [u8; 32],
}

/// The members of one query's secure aggregation, sorted by agency (byte order), without
/// duplicates, and the query id they mask for. Its [`Roster::encode`] is canonical and
/// injective, and its [`Roster::hash`] goes into every pairwise seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    query_id: String,
    members: Vec<Member>,
}

impl Roster {
    /// A roster for `query_id`: members are sorted by agency; an empty agency, a repeated agency
    /// or public key, and fewer than two members are refused.
    pub fn new(
        query_id: impl Into<String>,
        mut members: Vec<Member>,
    ) -> Result<Roster, SecAggError> {
        if members.len() < 2 {
            return Err(SecAggError::TooFewMembers(members.len()));
        }
        if members.iter().any(|m| m.agency.is_empty()) {
            return Err(SecAggError::EmptyAgency);
        }
        members.sort_by(|a, b| a.agency.cmp(&b.agency));
        if let Some(w) = members.windows(2).find(|w| w[0].agency == w[1].agency) {
            return Err(SecAggError::DuplicateAgency(w[0].agency.clone()));
        }
        for (i, a) in members.iter().enumerate() {
            if let Some(b) = members[i + 1..]
                .iter()
                .find(|b| b.public_key == a.public_key)
            {
                return Err(SecAggError::DuplicateKey(
                    a.agency.clone(),
                    b.agency.clone(),
                ));
            }
        }
        Ok(Roster {
            query_id: query_id.into(),
            members,
        })
    }

    /// The query id.
    pub fn query_id(&self) -> &str {
        &self.query_id
    }

    /// The members, sorted by agency.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The position of `agency` in [`Roster::members`].
    pub fn position(&self, agency: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.agency.as_str().cmp(agency))
            .ok()
    }

    /// The canonical encoding: a domain prefix, then the query id, the member count and each
    /// member's agency and key, every variable-length field preceded by its length (u64,
    /// big-endian), so no two rosters encode alike.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            ROSTER_DOMAIN.len() + 16 + self.query_id.len() + self.members.len() * 48,
        );
        out.extend_from_slice(ROSTER_DOMAIN);
        put_bytes(&mut out, self.query_id.as_bytes());
        out.extend_from_slice(&(self.members.len() as u64).to_be_bytes());
        for m in &self.members {
            put_bytes(&mut out, m.agency.as_bytes());
            out.extend_from_slice(&m.public_key);
        }
        out
    }

    /// SHA-256 of [`Roster::encode`].
    pub fn hash(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.encode());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }
}

/// Appends `bytes` preceded by its length (u64, big-endian).
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The 32-byte output length of HKDF-SHA256 expansion.
struct SeedLen;

impl hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        32
    }
}

/// The seed shared by roster members `i` and `j` (positions; `lo` < `hi` after ordering):
/// HKDF-SHA256 with an empty salt of the X25519 shared secret, info = [`SEED_INFO`] ‖ roster
/// hash ‖ agency(lo) ‖ agency(hi) (each length-prefixed) ‖ vector length (u64, big-endian).
/// Both members compute the same seed. An all-zero shared secret is refused.
fn pairwise_seed(
    mine: &KeyPair,
    peer: &Member,
    a: &str,
    b: &str,
    roster_hash: &[u8; 32],
    len: usize,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = mine
        .secret
        .diffie_hellman(&PublicKey::from(peer.public_key));
    if !shared.was_contributory() {
        return Err(SecAggError::LowOrderKey(peer.agency.clone()));
    }
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let lo_len = (lo.len() as u64).to_be_bytes();
    let hi_len = (hi.len() as u64).to_be_bytes();
    let n = (len as u64).to_be_bytes();
    let info: [&[u8]; 7] = [
        SEED_INFO,
        roster_hash,
        &lo_len,
        lo.as_bytes(),
        &hi_len,
        hi.as_bytes(),
        &n,
    ];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(shared.as_bytes());
    let okm = prk.expand(&info, SeedLen).map_err(|_| SecAggError::Kdf)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    okm.fill(seed.as_mut()).map_err(|_| SecAggError::Kdf)?;
    Ok(seed)
}

/// Adds (`plus`) or subtracts the mask stream of `seed` into `out`, wrapping: the ChaCha20
/// keystream with key `seed`, nonce 0 and block counter 0 (RFC 8439's block function), read as
/// consecutive little-endian u64 words.
fn apply_stream(seed: &[u8; 32], out: &mut [u64], plus: bool) {
    let mut prg = ChaCha20Rng::from_seed(*seed);
    let mut buf = Zeroizing::new([0u8; 512]);
    for chunk in out.chunks_mut(buf.len() / 8) {
        let bytes = &mut buf[..chunk.len() * 8];
        prg.fill_bytes(bytes);
        for (word, b) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            let m = u64::from_le_bytes(le);
            *word = if plus {
                word.wrapping_add(m)
            } else {
                word.wrapping_sub(m)
            };
        }
    }
}

/// Masks `values` (one word per cell, in the agreed dense order) for the node `me` of `roster`
/// holding `key`: for each other member j, adds the pair's mask stream if j comes after `me` in
/// the roster and subtracts it if j comes before, all mod 2^64. The masks of all members cancel
/// in [`unmask_sum`]. Refused: `me` not in the roster, a roster key for `me` that is not `key`'s,
/// a low-order peer key.
pub fn mask(
    values: &[u64],
    me: &str,
    key: &KeyPair,
    roster: &Roster,
) -> Result<Vec<u64>, SecAggError> {
    let mine = roster.position(me).ok_or_else(|| SecAggError::NotAMember {
        agency: me.to_string(),
        query_id: roster.query_id.clone(),
    })?;
    if roster.members[mine].public_key != key.public {
        return Err(SecAggError::KeyMismatch(me.to_string()));
    }
    let roster_hash = roster.hash();
    let mut out = values.to_vec();
    for (j, peer) in roster.members.iter().enumerate() {
        if j == mine {
            continue;
        }
        let seed = pairwise_seed(key, peer, me, &peer.agency, &roster_hash, values.len())?;
        apply_stream(&seed, &mut out, j > mine);
    }
    Ok(out)
}

/// The wrapping sum of masked vectors, word by word: the sum of the plain vectors once every
/// member's vector is in. Vectors of different lengths are refused; no vectors sum to an empty
/// vector.
pub fn unmask_sum(masked: &[Vec<u64>]) -> Result<Vec<u64>, SecAggError> {
    let Some(first) = masked.first() else {
        return Ok(Vec::new());
    };
    let mut sum = vec![0u64; first.len()];
    for (index, v) in masked.iter().enumerate() {
        if v.len() != sum.len() {
            return Err(SecAggError::LengthMismatch {
                index,
                expected: sum.len(),
                got: v.len(),
            });
        }
        for (s, x) in sum.iter_mut().zip(v) {
            *s = s.wrapping_add(*x);
        }
    }
    Ok(sum)
}

/// A signed value as a word of Z_2^64 (two's complement). Sums wrap, and [`decode_i64`] of the
/// wrapped sum is the true sum whenever the true sum fits in `i64`, even if partial sums do not.
pub fn encode_i64(x: i64) -> u64 {
    x as u64
}

/// The signed value of a word of Z_2^64 (two's complement): the inverse of [`encode_i64`].
pub fn decode_i64(x: u64) -> i64 {
    x as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, for reproducible test vectors and keys.
    struct Mix(u64);
    impl Mix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn bytes(&mut self) -> [u8; 32] {
            let mut b = [0u8; 32];
            for c in b.chunks_exact_mut(8) {
                c.copy_from_slice(&self.next().to_le_bytes());
            }
            b
        }
    }

    const AGENCIES: [&str; 5] = ["va", "ssa", "irs", "cms", "usda"];

    /// `n` members with reproducible keys, and the roster for `query_id`.
    fn federation(n: usize, query_id: &str, seed: u64) -> (Vec<(String, KeyPair)>, Roster) {
        let mut mix = Mix(seed);
        let nodes: Vec<(String, KeyPair)> = AGENCIES[..n]
            .iter()
            .map(|a| (a.to_string(), KeyPair::from_secret_bytes(mix.bytes())))
            .collect();
        let roster = Roster::new(query_id, members(&nodes)).expect("roster");
        (nodes, roster)
    }

    fn members(nodes: &[(String, KeyPair)]) -> Vec<Member> {
        nodes
            .iter()
            .map(|(a, k)| Member {
                agency: a.clone(),
                public_key: k.public_key(),
            })
            .collect()
    }

    /// Signed noisy partials, some near the ends of i64 so partial sums wrap.
    fn partials(n: usize, len: usize, mix: &mut Mix) -> Vec<Vec<i64>> {
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|c| match c % 4 {
                        0 => (mix.next() as i64) >> 20,
                        1 => -((mix.next() % 1000) as i64),
                        _ => (mix.next() % 2_000_001) as i64 - 1_000_000,
                    })
                    .collect()
            })
            .collect()
    }

    fn plain_sum(parts: &[Vec<i64>]) -> Vec<i64> {
        (0..parts[0].len())
            .map(|c| parts.iter().fold(0i64, |s, p| s.wrapping_add(p[c])))
            .collect()
    }

    fn masked_all(
        nodes: &[(String, KeyPair)],
        roster: &Roster,
        parts: &[Vec<i64>],
    ) -> Vec<Vec<u64>> {
        nodes
            .iter()
            .zip(parts)
            .map(|((a, k), p)| {
                let words: Vec<u64> = p.iter().map(|&x| encode_i64(x)).collect();
                mask(&words, a, k, roster).expect("mask")
            })
            .collect()
    }

    #[test]
    fn secagg_masks_cancel_for_2_3_and_5_members() {
        let mut mix = Mix(42);
        for n in [2usize, 3, 5] {
            let (nodes, roster) = federation(n, "q-cancel", n as u64);
            for len in [1usize, 7, 300] {
                let parts = partials(n, len, &mut mix);
                let masked = masked_all(&nodes, &roster, &parts);
                // Masking changed every vector...
                for (m, p) in masked.iter().zip(&parts) {
                    let plain: Vec<u64> = p.iter().map(|&x| encode_i64(x)).collect();
                    assert_ne!(m, &plain, "n={n} len={len}");
                }
                // ...and the masks cancel exactly in the sum.
                let sum: Vec<i64> = unmask_sum(&masked)
                    .expect("sum")
                    .into_iter()
                    .map(decode_i64)
                    .collect();
                assert_eq!(sum, plain_sum(&parts), "n={n} len={len}");
            }
        }
    }

    #[test]
    fn secagg_signed_sums_decode_exactly_through_wraparound() {
        // Partial sums overflow i64; the true sum fits, and decodes exactly.
        let (nodes, roster) = federation(3, "q-wrap", 9);
        let parts = vec![
            vec![i64::MAX, i64::MIN, -5],
            vec![i64::MAX, -1, 3],
            vec![-i64::MAX, 1, 2],
        ];
        let masked = masked_all(&nodes, &roster, &parts);
        let sum: Vec<i64> = unmask_sum(&masked)
            .expect("sum")
            .into_iter()
            .map(decode_i64)
            .collect();
        assert_eq!(sum, vec![i64::MAX, i64::MIN, 0]);
        for x in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(decode_i64(encode_i64(x)), x);
        }
    }

    #[test]
    fn secagg_a_different_roster_or_a_missing_vector_breaks_the_sum() {
        let mut mix = Mix(7);
        let (nodes, roster) = federation(3, "q-1", 3);
        let parts = partials(3, 64, &mut mix);
        let expected = plain_sum(&parts);
        let words = |p: &Vec<i64>| p.iter().map(|&x| encode_i64(x)).collect::<Vec<u64>>();
        let all_wrong = |masked: &[Vec<u64>], what: &str| {
            let sum: Vec<i64> = unmask_sum(masked)
                .expect("sum")
                .into_iter()
                .map(decode_i64)
                .collect();
            // Each word is off by a pseudorandom mask: equal with probability 2^-64.
            for (c, (s, e)) in sum.iter().zip(&expected).enumerate() {
                assert_ne!(s, e, "{what}: cell {c} came out right");
            }
        };

        // One member masks for another query id.
        let other_query = Roster::new("q-2", members(&nodes)).expect("roster");
        let mut masked = masked_all(&nodes, &roster, &parts);
        masked[2] = mask(&words(&parts[2]), &nodes[2].0, &nodes[2].1, &other_query).expect("mask");
        all_wrong(&masked, "other query id");

        // One member masks with a roster where another member was dropped.
        let dropped = Roster::new("q-1", members(&nodes[..2])).expect("roster");
        let mut masked = masked_all(&nodes, &roster, &parts);
        masked[0] = mask(&words(&parts[0]), &nodes[0].0, &nodes[0].1, &dropped).expect("mask");
        all_wrong(&masked, "member dropped from one roster");

        // Everyone masks with the right roster but the coordinator sums only two of three.
        let masked = masked_all(&nodes, &roster, &parts);
        let two = unmask_sum(&masked[..2]).expect("sum");
        let two_plain = plain_sum(&parts[..2]);
        for (s, e) in two.iter().zip(&two_plain) {
            assert_ne!(decode_i64(*s), *e);
        }

        // A fresh key pair for a rerun (same roster shape, new keys) changes every mask.
        let (rerun_nodes, rerun_roster) = federation(3, "q-1", 4);
        let again = masked_all(&rerun_nodes, &rerun_roster, &parts);
        for (a, b) in again.iter().zip(&masked) {
            assert!(a.iter().zip(b).all(|(x, y)| x != y));
        }
    }

    #[test]
    fn secagg_masked_zeros_look_uniform() {
        // 32,768 words = 262,144 bytes of one member's masked vector of zeros (3 members):
        // Pearson's χ² over the 256 byte values, expected 1,024 each, 255 df (mean 255, sd
        // √510 ≈ 22.6). Pass mark 400 (≈ 6.4 sd; p ≈ 10⁻⁸ for a uniform source), loose on
        // purpose: seeded, so reproducible, and any bias a mask could have (a zero word, a
        // repeated block) scores in the thousands.
        let (nodes, roster) = federation(3, "q-uniform", 11);
        let zeros = vec![0u64; 32_768];
        for (agency, key) in &nodes {
            let masked = mask(&zeros, agency, key, &roster).expect("mask");
            let chi2 = byte_chi_square(&masked);
            assert!(chi2 < 400.0, "{agency}: χ² = {chi2:.1} with 255 df");
            // No word of zeros came through unmasked.
            assert!(
                masked.iter().all(|&w| w != 0),
                "{agency}: a word left unmasked"
            );
        }
    }

    /// Pearson's χ² of the bytes of `words` over the 256 byte values.
    fn byte_chi_square(words: &[u64]) -> f64 {
        let mut counts = [0u64; 256];
        for w in words {
            for b in w.to_le_bytes() {
                counts[b as usize] += 1;
            }
        }
        let expected = (words.len() * 8) as f64 / 256.0;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn secagg_a_coalition_missing_two_honest_keys_still_sees_uniform_words() {
        // Members irs < ssa < va. The coordinator colludes with va (knows its secret) and strips
        // the irs–va mask from irs's vector of zeros; the irs–ssa mask remains, so what is left
        // is still uniform. Knowing ssa's secret too (only irs honest) strips it to the plain
        // vector: with one honest member left, its partial is exposed, as the module says.
        let (nodes, roster) = federation(3, "q-coalition", 21);
        let key = |a: &str| &nodes.iter().find(|(n, _)| n == a).expect("node").1;
        let member = |a: &str| &roster.members()[roster.position(a).expect("member")];
        let h = roster.hash();
        let len = 32_768;
        let masked_irs = mask(&vec![0u64; len], "irs", key("irs"), &roster).expect("mask");
        // irs is first: it added both masks; the coalition subtracts the one it can compute.
        let mut stripped = masked_irs.clone();
        let va_seed = pairwise_seed(key("va"), member("irs"), "va", "irs", &h, len).expect("seed");
        apply_stream(&va_seed, &mut stripped, false);
        assert_ne!(stripped, masked_irs);
        let chi2 = byte_chi_square(&stripped);
        assert!(chi2 < 400.0, "χ² = {chi2:.1} with 255 df");
        let ssa_seed =
            pairwise_seed(key("ssa"), member("irs"), "ssa", "irs", &h, len).expect("seed");
        apply_stream(&ssa_seed, &mut stripped, false);
        assert!(stripped.iter().all(|&w| w == 0));
    }

    #[test]
    fn secagg_low_order_public_keys_are_refused() {
        // Points of order dividing 8 on Curve25519 (and non-canonical encodings of them): any
        // clamped scalar maps them to 0.
        let mut order8 = [0u8; 32];
        order8.copy_from_slice(&hex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        ));
        let mut p_minus_1 = [0xffu8; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one, order8, p_minus_1] {
            let me = KeyPair::from_secret_bytes([7u8; 32]);
            let roster = Roster::new(
                "q",
                vec![
                    Member {
                        agency: "cms".into(),
                        public_key: me.public_key(),
                    },
                    Member {
                        agency: "evil".into(),
                        public_key: bad,
                    },
                ],
            )
            .expect("roster");
            assert_eq!(
                mask(&[1, 2, 3], "cms", &me, &roster),
                Err(SecAggError::LowOrderKey("evil".into())),
                "{bad:?}"
            );
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn secagg_roster_is_sorted_and_refuses_duplicates_and_strangers() {
        let (nodes, roster) = federation(3, "q", 1);
        let agencies: Vec<&str> = roster.members().iter().map(|m| m.agency.as_str()).collect();
        assert_eq!(agencies, ["irs", "ssa", "va"]);
        assert_eq!(roster.position("ssa"), Some(1));
        // The same members in another order: the same roster, the same hash.
        let mut shuffled = members(&nodes);
        shuffled.reverse();
        assert_eq!(
            Roster::new("q", shuffled).expect("roster").hash(),
            roster.hash()
        );

        let mut dup = members(&nodes);
        dup.push(Member {
            agency: "ssa".into(),
            public_key: [9; 32],
        });
        assert_eq!(
            Roster::new("q", dup),
            Err(SecAggError::DuplicateAgency("ssa".into()))
        );
        let mut same_key = members(&nodes);
        same_key[0].public_key = same_key[2].public_key;
        assert!(matches!(
            Roster::new("q", same_key),
            Err(SecAggError::DuplicateKey(..))
        ));
        assert_eq!(
            Roster::new("q", members(&nodes[..1])),
            Err(SecAggError::TooFewMembers(1))
        );
        let mut empty = members(&nodes);
        empty[1].agency.clear();
        assert_eq!(Roster::new("q", empty), Err(SecAggError::EmptyAgency));

        let stranger = KeyPair::from_secret_bytes([3; 32]);
        let err = mask(&[0], "dol", &stranger, &roster).expect_err("not a member");
        assert_eq!(
            err.to_string(),
            "agency \"dol\" is not a member of the secure-aggregation roster of query \"q\""
        );
        // A member holding a key that is not the roster's for it.
        assert_eq!(
            mask(&[0], "irs", &stranger, &roster),
            Err(SecAggError::KeyMismatch("irs".into()))
        );
        assert_eq!(
            unmask_sum(&[vec![1, 2], vec![3]]),
            Err(SecAggError::LengthMismatch {
                index: 1,
                expected: 2,
                got: 1
            })
        );
        assert_eq!(unmask_sum(&[]), Ok(vec![]));
    }

    #[test]
    fn secagg_roster_encoding_is_injective_across_field_boundaries() {
        let key = |b: u8| [b; 32];
        let m = |a: &str, k: u8| Member {
            agency: a.into(),
            public_key: key(k),
        };
        // Without length prefixes these pairs would concatenate to the same bytes.
        let pairs = [
            (
                Roster::new("q1", vec![m("a", 1), m("b", 2)]),
                Roster::new("q", vec![m("1a", 1), m("b", 2)]),
            ),
            (
                Roster::new("q", vec![m("ab", 1), m("c", 2)]),
                Roster::new("q", vec![m("a", 1), m("bc", 2)]),
            ),
        ];
        for (a, b) in pairs {
            let (a, b) = (a.expect("roster"), b.expect("roster"));
            assert_ne!(a.encode(), b.encode());
            assert_ne!(a.hash(), b.hash());
        }
        // The encoding, spelled out.
        let r = Roster::new("q", vec![m("b", 2), m("a", 1)]).expect("roster");
        let mut want = ROSTER_DOMAIN.to_vec();
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"q");
        want.extend_from_slice(&2u64.to_be_bytes());
        for (a, k) in [("a", 1u8), ("b", 2)] {
            want.extend_from_slice(&1u64.to_be_bytes());
            want.extend_from_slice(a.as_bytes());
            want.extend_from_slice(&key(k));
        }
        assert_eq!(r.encode(), want);
    }

    #[test]
    fn secagg_mask_stream_is_the_rfc8439_chacha20_keystream() {
        // RFC 8439 §2.3.2 / RFC 7539 A.1 test vector #1: key 0, nonce 0, counter 0.
        let block = hex(
            "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
             da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586",
        );
        let mut words = vec![0u64; 8];
        apply_stream(&[0u8; 32], &mut words, true);
        let want: Vec<u64> = block
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        assert_eq!(words, want);
        // Subtracting the same stream undoes it; streams longer than the buffer continue.
        let mut long = vec![5u64; 1000];
        apply_stream(&[1u8; 32], &mut long, true);
        let mut prefix = vec![5u64; 100];
        apply_stream(&[1u8; 32], &mut prefix, true);
        assert_eq!(&long[..100], &prefix[..]);
        apply_stream(&[1u8; 32], &mut long, false);
        assert!(long.iter().all(|&w| w == 5));
    }

    #[test]
    fn secagg_pairwise_seeds_agree_and_bind_the_length() {
        let (nodes, roster) = federation(2, "q", 5);
        let h = roster.hash();
        let (a, b) = (&nodes[0], &nodes[1]);
        let ma = &roster.members()[roster.position(&a.0).expect("a")];
        let mb = &roster.members()[roster.position(&b.0).expect("b")];
        let ab = pairwise_seed(&a.1, mb, &a.0, &b.0, &h, 10).expect("seed");
        let ba = pairwise_seed(&b.1, ma, &b.0, &a.0, &h, 10).expect("seed");
        assert_eq!(*ab, *ba);
        let ab11 = pairwise_seed(&a.1, mb, &a.0, &b.0, &h, 11).expect("seed");
        assert_ne!(*ab, *ab11);
        // A vector masked at length 4 is not a prefix of the same vector masked at length 8.
        let m4 = mask(&[0; 4], &a.0, &a.1, &roster).expect("mask");
        let m8 = mask(&[0; 8], &a.0, &a.1, &roster).expect("mask");
        assert!(m4.iter().zip(&m8).all(|(x, y)| x != y));
        assert!(format!("{:?}", a.1).contains("<redacted>"));
        KeyPair::generate().expect("system random");
    }
}
