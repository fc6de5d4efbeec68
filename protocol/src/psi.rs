//! Private set intersection **cardinality** over ristretto255 (Diffie–Hellman / Meadows PSI with
//! shuffling): two nodes learn how many people they share, from their keyed linkage values,
//! without either learning who. Pure computation: nothing here touches the network.
//!
//! # The protocol
//! A holds the set X, B the set Y (each value a keyed linkage value, 32 bytes; see the node's
//! `linkage` module). Each picks a secret scalar for this run only ([`Party::new`]: `a`, `b`).
//! `H` maps a value to a point (SHA-512 of a domain-separation prefix and the value, then
//! ristretto255's hash-to-group map), so nobody knows a discrete log between two `H` values.
//! ```text
//!  A                                              B
//!  m1 = shuffle(H(x)^a : x ∈ X)      ──m1──▶
//!                                    ◀──m2──      m2 = shuffle(H(y)^b : y ∈ Y)
//!                                    ◀──m3──      m3 = shuffle(p^b : p ∈ m1)   = H(x)^(ab)
//!  m4 = { q^a : q ∈ m2 }                                                       = H(y)^(ab)
//!  |X ∩ Y| = |m3 ∩ m4|               (count_matches)
//! ```
//! - A learns |X ∩ Y| (and |Y|), not which: m3 is shuffled by B, so a match in m3 cannot be tied
//!   to an x. B learns |X| only. Neither can invert a point, and neither can test a guess: a
//!   guessed value's `H(g)^a` needs `a`. With the federation's linkage key *and* a run's secret
//!   scalar one could enumerate SSNs against that run's messages, which is why scalars are fresh
//!   per run and never stored ([`Party`] zeroizes its scalar when dropped).
//! - Semi-honest only: a party that deviates (sends points of its own choosing) can learn more
//!   than the count, e.g. test one planted value. The exact count itself can disclose (a
//!   difference of two runs); the journeys protocol must add noise or a k-check on top.
//! - Received points are checked: non-canonical encodings and the identity are refused.

use std::collections::HashSet;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use ring::rand::{SecureRandom, SystemRandom};

/// Domain separation for [`hash_to_point`].
const DOMAIN: &[u8] = b"cxfed psi-cardinality v1 ristretto255 hash-to-group\0";

/// A blinded point as it travels: a compressed ristretto255 encoding.
pub type Blinded = [u8; 32];

/// Why a PSI step failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PsiError {
    /// The peer sent bytes that are not a canonical ristretto255 point (the peer misbehaved).
    #[error("the peer's message holds a value at position {0} that is not a ristretto255 point")]
    NotAPoint(usize),
    /// The peer sent the identity point, which no honest blinding produces.
    #[error("the peer's message holds the identity point at position {0}")]
    Identity(usize),
    /// The system's random number generator failed.
    #[error("the random number generator failed")]
    Random,
}

/// Maps a keyed linkage value to a ristretto255 point: SHA-512(domain ‖ value) through the
/// ristretto hash-to-group map (`from_uniform_bytes`, as RFC 9380's `hash_to_ristretto255`
/// does with its own expansion).
pub fn hash_to_point(value: &[u8; 32]) -> RistrettoPoint {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    ctx.update(DOMAIN);
    ctx.update(value);
    let digest = ctx.finish();
    let mut wide = [0u8; 64];
    wide.copy_from_slice(digest.as_ref());
    RistrettoPoint::from_uniform_bytes(&wide)
}

/// One side of one run: a secret scalar drawn fresh, never stored, zeroized on drop. `Debug`
/// never shows it.
pub struct Party {
    secret: Scalar,
    rng: SystemRandom,
}

impl std::fmt::Debug for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Party(<redacted>)")
    }
}

impl Drop for Party {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.secret.zeroize();
    }
}

impl Party {
    /// A party with a fresh uniformly random non-zero scalar (64 random bytes reduced mod ℓ).
    pub fn new() -> Result<Party, PsiError> {
        let rng = SystemRandom::new();
        let secret = random_scalar(&rng)?;
        Ok(Party { secret, rng })
    }

    /// First message: each distinct value hashed to a point, raised to this party's secret,
    /// compressed, in random order.
    pub fn blind(&self, values: &[[u8; 32]]) -> Result<Vec<Blinded>, PsiError> {
        let mut distinct: Vec<&[u8; 32]> = values.iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut out: Vec<Blinded> = distinct
            .into_iter()
            .map(|v| (hash_to_point(v) * self.secret).compress().to_bytes())
            .collect();
        self.shuffle(&mut out)?;
        Ok(out)
    }

    /// The peer's first message raised to this party's secret too, in random order (so the
    /// peer cannot tell which of its values matched).
    pub fn reblind(&self, peer: &[Blinded]) -> Result<Vec<Blinded>, PsiError> {
        let mut out = self.raise(peer)?;
        self.shuffle(&mut out)?;
        Ok(out)
    }

    /// The peer's first message raised to this party's secret, in the peer's order (for the
    /// party that counts; its order carries nothing).
    pub fn finish(&self, peer: &[Blinded]) -> Result<Vec<Blinded>, PsiError> {
        self.raise(peer)
    }

    fn raise(&self, peer: &[Blinded]) -> Result<Vec<Blinded>, PsiError> {
        peer.iter()
            .enumerate()
            .map(|(i, bytes)| {
                let point = CompressedRistretto(*bytes)
                    .decompress()
                    .ok_or(PsiError::NotAPoint(i))?;
                if point == RistrettoPoint::identity() {
                    return Err(PsiError::Identity(i));
                }
                Ok((point * self.secret).compress().to_bytes())
            })
            .collect()
    }

    fn shuffle(&self, items: &mut [Blinded]) -> Result<(), PsiError> {
        Ok(shuffle(&self.rng, items)?)
    }
}

/// The system's random number generator failed (for [`random_scalar`] and [`shuffle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RandomFailed;

impl From<RandomFailed> for PsiError {
    fn from(_: RandomFailed) -> Self {
        PsiError::Random
    }
}

/// A uniformly random non-zero scalar (64 random bytes reduced mod ℓ), for a run's secret.
pub(crate) fn random_scalar(rng: &SystemRandom) -> Result<Scalar, RandomFailed> {
    use zeroize::Zeroize;
    loop {
        let mut wide = [0u8; 64];
        rng.fill(&mut wide).map_err(|_| RandomFailed)?;
        let s = Scalar::from_bytes_mod_order_wide(&wide);
        wide.zeroize();
        if s != Scalar::ZERO {
            return Ok(s);
        }
    }
}

/// Fisher–Yates with unbiased indexes from the system's random number generator.
pub(crate) fn shuffle<T>(rng: &SystemRandom, items: &mut [T]) -> Result<(), RandomFailed> {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1)? as usize;
        items.swap(i, j);
    }
    Ok(())
}

/// A uniform integer in `0..n` (`n` ≥ 1), by rejection.
fn below(rng: &SystemRandom, n: u64) -> Result<u64, RandomFailed> {
    let zone = u64::MAX - (u64::MAX % n + 1) % n;
    loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b).map_err(|_| RandomFailed)?;
        let x = u64::from_le_bytes(b);
        if x <= zone {
            return Ok(x % n);
        }
    }
}

/// How many distinct doubly blinded values the two lists share: |X ∩ Y|.
pub fn count_matches(a: &[Blinded], b: &[Blinded]) -> usize {
    let a: HashSet<&Blinded> = a.iter().collect();
    let b: HashSet<&Blinded> = b.iter().collect();
    a.intersection(&b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: u32) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[..4].copy_from_slice(&i.to_le_bytes());
        v[31] = 0xA5;
        v
    }

    /// One whole run; returns (A's count, what A received, what B received).
    fn run(x: &[[u8; 32]], y: &[[u8; 32]]) -> (usize, Vec<Vec<Blinded>>, Vec<Vec<Blinded>>) {
        let (a, b) = (Party::new().expect("a"), Party::new().expect("b"));
        let m1 = a.blind(x).expect("m1");
        let m2 = b.blind(y).expect("m2");
        let m3 = b.reblind(&m1).expect("m3");
        let m4 = a.finish(&m2).expect("m4");
        (count_matches(&m3, &m4), vec![m2, m3], vec![m1])
    }

    #[test]
    fn counts_exactly_the_shared_values() {
        // Small sets: unoptimized curve arithmetic is slow in test builds.
        let x: Vec<[u8; 32]> = (0..40).map(value).collect();
        let y: Vec<[u8; 32]> = (25..90).map(value).collect();
        assert_eq!(run(&x, &y).0, 15);
        let z: Vec<[u8; 32]> = (1000..1010).map(value).collect();
        assert_eq!(run(&x, &z).0, 0);
        assert_eq!(run(&[], &y).0, 0);
        // Duplicates count once.
        let mut dup = x.clone();
        dup.extend_from_slice(&x[..10]);
        assert_eq!(run(&dup, &y).0, 15);
    }

    #[test]
    fn blinding_hides_values_and_each_run_differs() {
        let x: Vec<[u8; 32]> = (0..20).map(value).collect();
        let (n, to_a1, to_b1) = run(&x, &x);
        assert_eq!(n, 20);
        let (_, _, to_b2) = run(&x, &x);
        let plain: HashSet<Blinded> = x
            .iter()
            .flat_map(|v| [*v, hash_to_point(v).compress().to_bytes()])
            .collect();
        for m in to_a1.iter().chain(&to_b1) {
            assert!(
                m.iter().all(|p| !plain.contains(p)),
                "a value or H(value) was sent"
            );
        }
        // Fresh scalars: two runs over the same set share no point.
        assert_eq!(count_matches(&to_b1[0], &to_b2[0]), 0);
        assert!(format!("{:?}", Party::new().expect("p")).contains("redacted"));
    }

    #[test]
    fn reblinded_lists_are_shuffled() {
        let x: Vec<[u8; 32]> = (0..32).map(value).collect();
        let (a, b) = (Party::new().expect("a"), Party::new().expect("b"));
        let m1 = a.blind(&x).expect("m1");
        let m3 = b.reblind(&m1).expect("m3");
        let in_order = b.finish(&m1).expect("same points, in order");
        let mut sorted3 = m3.clone();
        let mut sorted_o = in_order.clone();
        sorted3.sort_unstable();
        sorted_o.sort_unstable();
        assert_eq!(sorted3, sorted_o, "the same points");
        // 32! orders: the chance that a shuffle leaves them all in place is nil.
        assert_ne!(m3, in_order);
    }

    #[test]
    fn refuses_what_is_not_a_blinded_point() {
        let p = Party::new().expect("p");
        let good = p.blind(&[value(1)]).expect("blind")[0];
        let not_canonical = [0xFFu8; 32];
        let identity = RistrettoPoint::identity().compress().to_bytes();
        assert_eq!(
            p.reblind(&[good, not_canonical]),
            Err(PsiError::NotAPoint(1))
        );
        assert_eq!(p.finish(&[identity]), Err(PsiError::Identity(0)));
    }
}
