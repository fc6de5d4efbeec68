//! Differential privacy primitives: an exact discrete Laplace sampler on integers, calibration
//! of scales to ε, the DP partition-selection threshold, and 95% noise intervals.
//!
//! The sampler is Canonne, Kamath and Steinke's (NeurIPS 2020) algorithm: it draws only
//! uniform integers and Bernoulli trials with rational probabilities, so its output
//! distribution is exactly the discrete Laplace — no floating-point Laplace (Mironov 2012).
//! Randomness comes from a [`RandomSource`]: nodes use the OS CSPRNG (`ring::rand::SystemRandom`
//! in the node crate); tests use a seeded generator.

/// The random source failed: nothing may be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the random number generator failed")]
pub struct RandomFailure;

/// A source of uniform random bits.
pub trait RandomSource {
    /// A uniform `u64`, or [`RandomFailure`] when the source cannot produce one (the caller
    /// must then release nothing; a failed source never yields stand-in values).
    fn next_u64(&mut self) -> Result<u64, RandomFailure>;
}

/// A uniform integer in `0..n` (n > 0), without modulo bias (rejection sampling).
pub fn uniform_below(rng: &mut dyn RandomSource, n: u64) -> Result<u64, RandomFailure> {
    debug_assert!(n > 0);
    Ok(uniform_below_wide(rng, u128::from(n))? as u64)
}

/// A uniform integer in `0..n` (n > 0) for `n` up to 2^128 − 1, by rejection: exact for every
/// `n`, so Bernoulli trials with large denominators are never rounded.
fn uniform_below_wide(rng: &mut dyn RandomSource, n: u128) -> Result<u128, RandomFailure> {
    debug_assert!(n > 0);
    let draw = |rng: &mut dyn RandomSource| -> Result<u128, RandomFailure> {
        if n <= u128::from(u64::MAX) + 1 {
            Ok(u128::from(rng.next_u64()?))
        } else {
            Ok(u128::from(rng.next_u64()?) << 64 | u128::from(rng.next_u64()?))
        }
    };
    // Values are drawn uniformly from 0..=max (max = 2^64 − 1 or 2^128 − 1); keep those below
    // the largest multiple of n, i.e. x ≤ max − ((max + 1) mod n).
    if n.is_power_of_two() {
        return Ok(draw(rng)? & (n - 1));
    }
    let max = if n <= u128::from(u64::MAX) + 1 {
        u128::from(u64::MAX)
    } else {
        u128::MAX
    };
    let rem = (max % n + 1) % n;
    loop {
        let x = draw(rng)?;
        if x <= max - rem {
            return Ok(x % n);
        }
    }
}

/// Bernoulli(num/den), exactly.
fn bernoulli(rng: &mut dyn RandomSource, num: u128, den: u128) -> Result<bool, RandomFailure> {
    Ok(uniform_below_wide(rng, den)? < num)
}

/// Bernoulli(exp(-num/den)), exactly (CKS20 Algorithm 1).
pub(crate) fn bernoulli_exp(
    rng: &mut dyn RandomSource,
    num: u64,
    den: u64,
) -> Result<bool, RandomFailure> {
    if num <= den {
        // γ = num/den ∈ [0, 1]: K is the first k with Bernoulli(γ/k) false; return K odd.
        let mut k: u128 = 1;
        loop {
            // den·k < 2^128 for any k reachable: P(K > k) = γ^k / k!.
            if !bernoulli(rng, u128::from(num), u128::from(den) * k)? {
                return Ok(k % 2 == 1);
            }
            k += 1;
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1)? {
            return Ok(false);
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// A draw from the discrete Laplace distribution with scale `t/s` (t, s ≥ 1):
/// P(X = x) ∝ exp(−|x|·s/t) (CKS20 Algorithm 2). Arithmetic is in 128 bits, so nothing
/// saturates; a magnitude beyond `i64` (probability below 2^-60 at any scale cxfed uses) is
/// clamped to `i64::MAX`.
pub fn discrete_laplace(rng: &mut dyn RandomSource, t: u64, s: u64) -> Result<i64, RandomFailure> {
    assert!(
        t >= 1 && s >= 1,
        "discrete Laplace needs a positive rational scale"
    );
    loop {
        let u = uniform_below(rng, t)?;
        if !bernoulli_exp(rng, u, t)? {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1)? {
            v += 1;
        }
        let x = u128::from(u) + u128::from(t) * v;
        let y = x / u128::from(s);
        let negative = bernoulli(rng, 1, 2)?;
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return Ok(if negative { -y } else { y });
    }
}

/// Denominator used to turn ε into an exact rational (ε is read in thousandths).
pub const EPSILON_DENOMINATOR: u64 = 1_000;

/// The smallest ε exact noise can be calibrated for: ε is read in whole thousandths, rounded
/// down ([`Scale::for_epsilon`]), so anything below one thousandth would be no noise scale at all.
pub const MIN_EPSILON: f64 = 1.0 / EPSILON_DENOMINATOR as f64;

/// Which range of ε a check is made against, for the message of a refusal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EpsilonRange {
    /// The analyst's client, before sending: it does not know the nodes' maxima.
    Federation,
    /// A node in `k-only` mode (it spends no ε, but no node could calibrate a bad one).
    KOnly,
    /// A node in `dp` mode spending at most `max` (its `epsilon_per_query`) per query.
    Node {
        /// The node's `epsilon_per_query`.
        max: f64,
    },
}

/// An ε that cannot be spent: not a number, not finite, not positive, or below
/// [`MIN_EPSILON`]. The message names ε, the value received and the range accepted.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{}", describe_bad_epsilon(*.value, *.range))]
pub struct BadEpsilon {
    /// The value received.
    pub value: f64,
    /// The range it was checked against.
    pub range: EpsilonRange,
}

fn describe_bad_epsilon(value: f64, range: EpsilonRange) -> String {
    let why = if value.is_nan() {
        "is not a number".to_string()
    } else if value.is_infinite() {
        "is not finite".to_string()
    } else if value <= 0.0 {
        "is not positive".to_string()
    } else {
        format!(
            "is below {MIN_EPSILON}, the smallest ε exact noise can be calibrated for (ε is \
             read in thousandths)"
        )
    };
    let accepted = match range {
        EpsilonRange::Federation => format!(
            "nodes accept ε from {MIN_EPSILON} up to their epsilon_per_query (a larger ε is spent \
             as that)"
        ),
        EpsilonRange::KOnly => format!(
            "this node accepts ε from {MIN_EPSILON} up (it runs in k-only mode and spends none)"
        ),
        EpsilonRange::Node { max } => format!(
            "this node accepts ε from {MIN_EPSILON} up to {max} (its epsilon_per_query; a \
             larger ε is spent as {max})"
        ),
    };
    format!("epsilon (ε) = {value} {why}; {accepted}")
}

/// Checks an ε an analyst asked for: it must be a finite number of at least [`MIN_EPSILON`].
/// An ε above a node's maximum is not an error (the node spends its maximum).
pub fn check_epsilon(value: f64, range: EpsilonRange) -> Result<(), BadEpsilon> {
    if value.is_finite() && value >= MIN_EPSILON {
        Ok(())
    } else {
        Err(BadEpsilon { value, range })
    }
}

/// A noise scale as the exact rational `t/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Numerator.
    pub t: u64,
    /// Denominator.
    pub s: u64,
}

impl Scale {
    /// The scale for an integer statistic of L1 sensitivity `sensitivity` at privacy `epsilon`
    /// (`b = Δ/ε`), with ε rounded down to thousandths (never up: rounding only adds noise).
    pub fn for_epsilon(sensitivity: u64, epsilon: f64) -> Option<Scale> {
        let eps_milli = (epsilon * EPSILON_DENOMINATOR as f64).floor();
        if !eps_milli.is_finite() || eps_milli < 1.0 || sensitivity == 0 {
            return None;
        }
        Some(Scale {
            t: sensitivity.checked_mul(EPSILON_DENOMINATOR)?,
            s: eps_milli as u64,
        })
    }

    /// The scale as a number.
    pub fn value(self) -> f64 {
        self.t as f64 / self.s as f64
    }

    /// Draws noise at this scale.
    pub fn sample(self, rng: &mut dyn RandomSource) -> Result<i64, RandomFailure> {
        discrete_laplace(rng, self.t, self.s)
    }
}

/// Variance of the discrete Laplace with scale `b`: 2p/(1−p)², p = e^(−1/b).
pub fn variance(b: f64) -> f64 {
    if b <= 0.0 {
        return 0.0;
    }
    let p = (-1.0 / b).exp();
    2.0 * p / ((1.0 - p) * (1.0 - p))
}

/// Half-width of a 95% interval for a sum of independent noises with total `var`, by the
/// normal approximation (1.96 σ). For a single Laplace it is slightly narrower than exact
/// (b·ln 20 ≈ 3.0 b vs 1.96·√2 b ≈ 2.77 b); the report says "approximate".
pub fn ci95(var: f64) -> f64 {
    Z95 * var.max(0.0).sqrt()
}

/// The normal quantile of a two-sided 95% interval.
pub const Z95: f64 = 1.96;

/// Threshold τ for DP partition selection. A person contributes to at most `g` groups; a group
/// made by them alone (true distinct-person count 1) must be released (noisy count ≥ τ) with
/// probability at most δ/g, so that all of them together stay within δ. The noise on the count
/// is discrete Laplace of scale `b` (P(X ≥ z) = p^z/(1 + p), p = e^(−1/b)), so τ = 1 + z for
/// the least integer z with g·p^z/(1 + p) ≤ δ. Never below `k`.
pub fn partition_threshold(b: f64, delta: f64, k: u64, g: u64) -> f64 {
    let p = (-1.0 / b).exp();
    let g = g.max(1) as f64;
    let z = (b * (g / (delta * (1.0 + p))).ln()).ceil().max(0.0);
    (1.0 + z).max(k as f64)
}

/// A deterministic generator for tests and simulations (SplitMix64). Not for real noise.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl RandomSource for SplitMix64 {
    fn next_u64(&mut self) -> Result<u64, RandomFailure> {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Ok(z ^ (z >> 31))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(t: u64, s: u64, n: usize, seed: u64) -> Vec<i64> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| discrete_laplace(&mut rng, t, s).expect("rng"))
            .collect()
    }

    #[test]
    fn discrete_laplace_has_the_right_mean_variance_and_tails() {
        for (t, s) in [(1u64, 1u64), (3, 1), (10, 1), (7, 2), (1000, 333)] {
            let b = t as f64 / s as f64;
            let n = 200_000;
            let xs = draws(t, s, n, t * 31 + s);
            let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let expected = variance(b);
            assert!(
                mean.abs() < 5.0 * (expected / n as f64).sqrt() + 1e-9,
                "b={b}: mean {mean}"
            );
            assert!(
                (var / expected - 1.0).abs() < 0.05,
                "b={b}: var {var} vs {expected}"
            );
            // Tail: P(|X| ≥ m) = 2 p^m / (1 + p) for the discrete Laplace.
            let p = (-1.0 / b).exp();
            let m = (3.0 * b).ceil() as i64;
            let tail = xs.iter().filter(|&&x| x.abs() >= m).count() as f64 / n as f64;
            let exact = 2.0 * p.powi(m as i32) / (1.0 + p);
            assert!(
                (tail - exact).abs() < 5.0 * (exact / n as f64).sqrt() + 1e-4,
                "b={b}: tail {tail} vs {exact}"
            );
        }
    }

    #[test]
    fn discrete_laplace_is_symmetric_and_hits_zero_with_the_right_mass() {
        let xs = draws(2, 1, 100_000, 7);
        let p = (-0.5f64).exp();
        let p0 = (1.0 - p) / (1.0 + p);
        let zeros = xs.iter().filter(|&&x| x == 0).count() as f64 / xs.len() as f64;
        assert!((zeros - p0).abs() < 0.01, "{zeros} vs {p0}");
        let pos = xs.iter().filter(|&&x| x > 0).count() as f64;
        let neg = xs.iter().filter(|&&x| x < 0).count() as f64;
        assert!((pos / neg - 1.0).abs() < 0.03);
    }

    /// A source that fails after `n` draws.
    struct Failing(u64);
    impl RandomSource for Failing {
        fn next_u64(&mut self) -> Result<u64, RandomFailure> {
            if self.0 == 0 {
                return Err(RandomFailure);
            }
            self.0 -= 1;
            Ok(0)
        }
    }

    #[test]
    fn a_failing_random_source_stops_the_sampler_instead_of_looping() {
        // All-zero bits would make Bernoulli(exp(-1)) loop forever; a failure must surface.
        for n in [0, 1, 5, 100] {
            assert_eq!(discrete_laplace(&mut Failing(n), 3, 1), Err(RandomFailure));
        }
    }

    #[test]
    fn wide_uniform_is_exact_beyond_64_bits() {
        let mut rng = SplitMix64(9);
        let n: u128 = (1u128 << 64) * 3;
        let mut thirds = [0u32; 3];
        for _ in 0..30_000 {
            let x = uniform_below_wide(&mut rng, n).expect("rng");
            assert!(x < n);
            thirds[(x >> 64) as usize] += 1;
        }
        assert!(
            thirds.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{thirds:?}"
        );
        // Huge scales no longer saturate: the draw is still symmetric around 0.
        let big = 1u64 << 60;
        let xs: Vec<i64> = (0..2_000)
            .map(|_| discrete_laplace(&mut rng, big, 1).expect("rng"))
            .collect();
        let pos = xs.iter().filter(|&&x| x > 0).count();
        assert!((800..1200).contains(&pos), "{pos}");
    }

    #[test]
    fn uniform_below_is_unbiased() {
        let mut rng = SplitMix64(1);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[uniform_below(&mut rng, 6).expect("rng") as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn scale_rounds_epsilon_down_and_refuses_nonsense() {
        assert_eq!(Scale::for_epsilon(2, 0.5), Some(Scale { t: 2000, s: 500 }));
        assert_eq!(Scale::for_epsilon(1, 0.0), None);
        assert_eq!(Scale::for_epsilon(1, f64::NAN), None);
        assert_eq!(Scale::for_epsilon(0, 1.0), None);
        assert_eq!(Scale::for_epsilon(1, 1.0009).map(Scale::value), Some(1.0));
    }

    #[test]
    fn epsilon_outside_the_calibratable_range_is_refused_with_the_range() {
        let node = EpsilonRange::Node { max: 1.0 };
        for bad in [
            0.0,
            1e-9,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.000_999,
        ] {
            let err = check_epsilon(bad, node).expect_err("refused");
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("epsilon (ε) = {bad} ")), "{msg}");
            assert!(msg.contains("from 0.001 up to 1 "), "{msg}");
            // Every ε it accepts can be calibrated; every ε it refuses could not be.
            assert_eq!(Scale::for_epsilon(1, bad), None, "{bad}");
        }
        assert!(
            check_epsilon(f64::NAN, node)
                .expect_err("refused")
                .to_string()
                .contains("not a number")
        );
        assert!(
            check_epsilon(-1.0, node)
                .expect_err("refused")
                .to_string()
                .contains("not positive")
        );
        for good in [MIN_EPSILON, 0.5, 1.0, 7.0] {
            assert_eq!(check_epsilon(good, node), Ok(()));
            assert!(Scale::for_epsilon(1, good).is_some(), "{good}");
        }
        let client = check_epsilon(f64::INFINITY, EpsilonRange::Federation).expect_err("refused");
        assert!(client.to_string().contains("not finite"), "{client}");
        assert!(
            client.to_string().contains("their epsilon_per_query"),
            "{client}"
        );
        let k_only = check_epsilon(0.0, EpsilonRange::KOnly).expect_err("refused");
        assert!(k_only.to_string().contains("k-only"), "{k_only}");
    }

    #[test]
    fn threshold_bounds_the_release_of_a_single_person() {
        let b = 2.0;
        let delta = 1e-5;
        let tau = partition_threshold(b, delta, 1, 1);
        // P(1 + noise ≥ τ) ≤ δ, checked by simulation at a larger δ where it is measurable.
        let delta_big = 0.01;
        let mut rng = SplitMix64(3);
        let n = 400_000;
        for g in [1u64, 4] {
            let tau_big = partition_threshold(b, delta_big, 1, g);
            let released = (0..n)
                .filter(|_| {
                    1.0 + Scale { t: 2, s: 1 }.sample(&mut rng).expect("rng") as f64 >= tau_big
                })
                .count() as f64
                / n as f64;
            // Exact: P(X ≥ τ − 1) = p^(τ−1)/(1+p) ≤ δ/g, and not far below it (τ is the least).
            assert!(released <= delta_big / g as f64 * 1.1, "g={g}: {released}");
            let p = (-1.0f64 / b).exp();
            let looser = p.powf(tau_big - 2.0) / (1.0 + p);
            assert!(
                looser > delta_big / g as f64,
                "g={g}: τ is not the least threshold"
            );
        }
        assert!(tau > partition_threshold(b, delta_big, 1, 1));
        assert!(
            partition_threshold(b, delta, 1, 10) > tau,
            "more groups per person, higher τ"
        );
        assert_eq!(partition_threshold(b, delta, 50, 1), 50.0);
    }
}
