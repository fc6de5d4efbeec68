//! Differential privacy primitives: an exact discrete Laplace sampler on integers, calibration
//! of scales to ε, the DP partition-selection threshold, and 95% noise intervals.
//!
//! The sampler is Canonne, Kamath and Steinke's (NeurIPS 2020) algorithm: it draws only
//! uniform integers and Bernoulli trials with rational probabilities, so its output
//! distribution is exactly the discrete Laplace — no floating-point Laplace (Mironov 2012).
//! Randomness comes from a [`RandomSource`]: nodes use the OS CSPRNG (`ring::rand::SystemRandom`
//! in the node crate); tests use a seeded generator.

/// A source of uniform random bits.
pub trait RandomSource {
    /// A uniform `u64`.
    fn next_u64(&mut self) -> u64;
}

/// A uniform integer in `0..n` (n > 0), without modulo bias (rejection sampling).
pub fn uniform_below(rng: &mut dyn RandomSource, n: u64) -> u64 {
    debug_assert!(n > 0);
    if n.is_power_of_two() {
        return rng.next_u64() & (n - 1);
    }
    let zone = u64::MAX - (u64::MAX % n) - 1;
    loop {
        let x = rng.next_u64();
        if x <= zone {
            return x % n;
        }
    }
}

/// Bernoulli(num/den), exactly.
fn bernoulli(rng: &mut dyn RandomSource, num: u64, den: u64) -> bool {
    uniform_below(rng, den) < num
}

/// Bernoulli(exp(-num/den)), exactly (CKS20 Algorithm 1).
fn bernoulli_exp(rng: &mut dyn RandomSource, num: u64, den: u64) -> bool {
    if num <= den {
        // γ = num/den ∈ [0, 1]
        let mut k: u64 = 1;
        loop {
            // Bernoulli(γ / k)
            if !bernoulli(rng, num, den.saturating_mul(k)) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// A draw from the discrete Laplace distribution with scale `t/s` (t, s ≥ 1):
/// P(X = x) ∝ exp(−|x|·s/t) (CKS20 Algorithm 2).
pub fn discrete_laplace(rng: &mut dyn RandomSource, t: u64, s: u64) -> i64 {
    assert!(
        t >= 1 && s >= 1,
        "discrete Laplace needs a positive rational scale"
    );
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u64 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + t.saturating_mul(v);
        let y = x / s;
        let negative = bernoulli(rng, 1, 2);
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return if negative { -y } else { y };
    }
}

/// Denominator used to turn ε into an exact rational (ε is read in thousandths).
pub const EPSILON_DENOMINATOR: u64 = 1_000;

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
        if eps_milli.is_nan() || eps_milli < 1.0 || sensitivity == 0 {
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
    pub fn sample(self, rng: &mut dyn RandomSource) -> i64 {
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

/// Threshold τ for DP partition selection: a group whose true distinct-person count is 1 is
/// released (noisy count ≥ τ) with probability at most δ, given Laplace noise of scale `b` on
/// the count: τ = 1 + b·ln(1/(2δ)). Never below `k`.
pub fn partition_threshold(b: f64, delta: f64, k: u64) -> f64 {
    let tau = 1.0 + b * (1.0 / (2.0 * delta)).ln();
    tau.max(k as f64)
}

/// A deterministic generator for tests and simulations (SplitMix64). Not for real noise.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl RandomSource for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(t: u64, s: u64, n: usize, seed: u64) -> Vec<i64> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| discrete_laplace(&mut rng, t, s)).collect()
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

    #[test]
    fn uniform_below_is_unbiased() {
        let mut rng = SplitMix64(1);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[uniform_below(&mut rng, 6) as usize] += 1;
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
    fn threshold_bounds_the_release_of_a_single_person() {
        let b = 2.0;
        let delta = 1e-5;
        let tau = partition_threshold(b, delta, 1);
        // P(1 + noise ≥ τ) ≤ δ, checked by simulation at a larger δ where it is measurable.
        let delta_big = 0.01;
        let tau_big = partition_threshold(b, delta_big, 1);
        let mut rng = SplitMix64(3);
        let n = 200_000;
        let released = (0..n)
            .filter(|_| 1.0 + Scale { t: 2, s: 1 }.sample(&mut rng) as f64 >= tau_big)
            .count();
        assert!(
            (released as f64 / n as f64) <= delta_big * 1.2,
            "{released}"
        );
        assert!(tau > tau_big && partition_threshold(b, delta, 50) == 50.0);
    }
}
