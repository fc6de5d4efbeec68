//! Noise *shares* for distributed differential privacy: each of the n nodes of a query adds one
//! share to its partial, and the sum of the shares of **any h** of them is exactly the discrete
//! Laplace that [`discrete_laplace`](crate::dp::discrete_laplace) draws, scale `t/s`
//! (P(X = x) ∝ α^|x|, α = e^(−s/t)). Extra shares (the n − h nodes the steward does not count on
//! being honest) only add noise. Integer arithmetic only; exact, like [`crate::dp`].
//!
//! # Why the sum is exact
//! 1. Discrete Laplace(α) = G₁ − G₂ with G₁, G₂ independent geometric, P(G = g) = (1 − α) α^g.
//! 2. The geometric is infinitely divisible: it is the sum of h independent negative binomials
//!    NB(1/h, α), P(Y = k) = Γ(k + 1/h) / (k! Γ(1/h)) · (1 − α)^(1/h) α^k. So a node adding
//!    Y₁ − Y₂ with Y₁, Y₂ ~ NB(1/h, α) contributes a share, and h shares sum to G₁ − G₂
//!    (Goryczka & Xiong, "A Comprehensive Comparison of Multiparty Secure Additions with
//!    Differential Privacy", IEEE TDSC 2017; Harrison & Manurangsi, FORC 2025, arXiv 2504.05202).
//!
//! # The exact NB(1/h, α) sampler ([`negative_binomial`])
//! Draw G ~ Geo(α) exactly (the CKS20 geometric of [`crate::dp`]), cut {1, …, G} into the cycles
//! of a uniformly random permutation, keep each cycle with probability 1/h, and return the number
//! of points in the kept cycles. The cycles are drawn one at a time (the Feller coupling): the
//! cycle through the smallest remaining point of m points has a length uniform on {1, …, m}, and
//! the rest is again a uniform permutation of m minus that length. Why this is NB(1/h, α):
//! - By Cauchy's formula a uniform permutation of g points has a_k cycles of length k with
//!   probability Π_k (1/k)^(a_k) / a_k! (Σ k·a_k = g). Times P(G = g) = (1 − α) Π_k α^(k·a_k), and
//!   since 1 − α = Π_k e^(−α^k/k), the a_k are *independent* Poisson(α^k / k) (Arratia, Barbour &
//!   Tavaré, *Logarithmic Combinatorial Structures: a Probabilistic Approach*, EMS 2003: the
//!   conditioning relation for permutations, θ = 1; the Feller coupling is in the same book).
//! - Keeping each cycle with probability 1/h thins them to independent Poisson(α^k / (h k)), so
//!   the kept total has generating function Π_k exp((α^k / (h k))(z^k − 1)) =
//!   ((1 − α) / (1 − αz))^(1/h): that of NB(1/h, α) (its compound-Poisson form with logarithmic
//!   summands).
//!
//! With h = 1 every cycle is kept, the share is G₁ − G₂, and it has exactly the distribution of
//! `discrete_laplace(rng, t, s)`. The cost is two geometric draws plus, for h > 1, about
//! ln G + 0.58 pairs of uniform draws per geometric: logarithmic in the scale, so the large scales
//! of sums and sums of squares stay cheap.
//!
//! # What the shares protect, and against whom
//! The steward's `assume_honest_nodes` h says how many of a query's n nodes are trusted not to
//! collude with the coordinator. The coordinator plus up to n − h nodes can subtract their own
//! shares from the released sum, and what remains still holds at least h honest shares: at
//! least one full discrete Laplace, so the release keeps its ε against that coalition. A share
//! for h > 1 is *not* enough noise on its own: a node's partial with one share must never be
//! seen alone, only inside a secure-aggregation sum (see `cxfed_protocol::secagg`). With h = 1
//! each share is a full draw and each node's partial is ε-DP by itself, at n times the central
//! variance; with h = n the released sum carries exactly the central variance.
//!
//! A magnitude beyond `i64::MAX` (probability below 2^-60 at every scale cxfed uses) is clamped,
//! as in [`crate::dp`].

use crate::dp::{RandomFailure, RandomSource, bernoulli_exp, uniform_below, variance};

/// A geometric variable with P(G = g) = (1 − α) α^g, α = e^(−s/t) (t, s ≥ 1), exactly: the
/// magnitude step of CKS20 Algorithm 2. X = U + t·V with U uniform on 0..t accepted with
/// probability e^(−U/t) and V ~ Geo(e^(−1)) has P(X = x) ∝ e^(−x/t), so X ~ Geo(e^(−1/t)); then
/// ⌊X/s⌋ ~ Geo(e^(−s/t)), since P(⌊X/s⌋ ≥ k) = P(X ≥ ks) = e^(−ks/t). Clamped to `i64::MAX`.
///
/// # Panics
/// If `t` or `s` is 0 (no scale), like [`discrete_laplace`](crate::dp::discrete_laplace).
pub fn geometric(rng: &mut dyn RandomSource, t: u64, s: u64) -> Result<u64, RandomFailure> {
    assert!(
        t >= 1 && s >= 1,
        "a geometric needs a positive rational scale"
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
        return Ok(u64::try_from(y).map_or(i64::MAX as u64, |y| y.min(i64::MAX as u64)));
    }
}

/// A negative binomial NB(1/h, α), α = e^(−s/t): P(Y = k) = Γ(k + 1/h) / (k! Γ(1/h)) ·
/// (1 − α)^(1/h) α^k, mean α / (h(1 − α)). The sum of h independent draws is [`geometric`].
/// Exact: a geometric cut into the cycles of a uniform permutation, each kept with probability
/// 1/h (see the module documentation for the proof). At most `i64::MAX`.
///
/// # Panics
/// If `t`, `s` or `h` is 0.
pub fn negative_binomial(
    rng: &mut dyn RandomSource,
    t: u64,
    s: u64,
    h: u64,
) -> Result<u64, RandomFailure> {
    assert!(h >= 1, "a noise share needs at least one honest node");
    let g = geometric(rng, t, s)?;
    if h == 1 {
        return Ok(g);
    }
    keep_cycles(rng, g, h)
}

/// Cuts {1, …, g} into the cycles of a uniform random permutation (Feller coupling) and returns
/// the number of points in the cycles kept, each with probability 1/h. Given g, this is
/// Beta-binomial(g, 1/h, 1 − 1/h): the law of one NB(1/h) given the sum of it and an independent
/// NB(1 − 1/h).
fn keep_cycles(rng: &mut dyn RandomSource, g: u64, h: u64) -> Result<u64, RandomFailure> {
    let mut rest = g;
    let mut kept = 0u64;
    while rest > 0 {
        // The cycle through the smallest remaining point: length uniform on 1..=rest.
        let cycle = 1 + uniform_below(rng, rest)?;
        if uniform_below(rng, h)? == 0 {
            kept += cycle;
        }
        rest -= cycle;
    }
    Ok(kept)
}

/// One node's noise share for a statistic whose central noise is the discrete Laplace of scale
/// `t/s` (t, s ≥ 1), shaped so that the shares of any `honest` nodes sum to exactly that
/// discrete Laplace: Y₁ − Y₂ with Y₁, Y₂ ~ NB(1/honest, e^(−s/t)) independent. With
/// `honest` = 1 the share alone has the distribution of
/// [`discrete_laplace`](crate::dp::discrete_laplace)`(rng, t, s)`.
///
/// `honest` is the steward's `assume_honest_nodes` (h, 1 ≤ h ≤ n); a random source failure
/// releases nothing.
///
/// # Panics
/// If `t`, `s` or `honest` is 0.
pub fn noise_share(
    rng: &mut dyn RandomSource,
    t: u64,
    s: u64,
    honest: u64,
) -> Result<i64, RandomFailure> {
    let plus = negative_binomial(rng, t, s, honest)?;
    let minus = negative_binomial(rng, t, s, honest)?;
    // Both are at most i64::MAX, so the difference fits.
    Ok(plus as i64 - minus as i64)
}

/// Variance of the sum of `n` shares each shaped for `h` honest nodes, at scale `b`: each share
/// has variance 1/h of the central discrete Laplace's 2α/(1 − α)² (α = e^(−1/b)), so the sum has
/// n/h times it (n = h: exactly the central variance). 0 for `h` = 0 or `b` ≤ 0.
pub fn share_variance(b: f64, n: u64, h: u64) -> f64 {
    if h == 0 {
        return 0.0;
    }
    variance(b) * n as f64 / h as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::{SplitMix64, discrete_laplace};

    /// α = e^(−s/t).
    fn alpha(t: u64, s: u64) -> f64 {
        (-(s as f64) / t as f64).exp()
    }

    /// Pearson's statistic of integer draws against a pmf on the integers, with the cells
    /// `lo..=hi` chosen so every expected count is at least 20 and the two tails (< lo, > hi)
    /// each a cell of their own. Returns (statistic, degrees of freedom).
    fn chi_square(xs: &[i64], pmf: &dyn Fn(i64) -> f64) -> (f64, usize) {
        let n = xs.len() as f64;
        let (mut lo, mut hi) = (0i64, 0i64);
        while pmf(lo - 1) * n >= 20.0 {
            lo -= 1;
        }
        while pmf(hi + 1) * n >= 20.0 {
            hi += 1;
        }
        let width = (hi - lo + 1) as usize;
        let mut observed = vec![0f64; width + 2];
        for &x in xs {
            let cell = if x < lo {
                width
            } else if x > hi {
                width + 1
            } else {
                (x - lo) as usize
            };
            observed[cell] += 1.0;
        }
        let mut expected: Vec<f64> = (lo..=hi).map(|x| pmf(x) * n).collect();
        let inside: f64 = expected.iter().sum::<f64>() / n;
        // The tails share what is left, split by the pmf's own tail masses.
        let below: f64 = (1..2000).map(|d| pmf(lo - d)).sum();
        let above: f64 = (1..2000).map(|d| pmf(hi + d)).sum();
        let rest = (1.0 - inside).max(0.0);
        let split = if below + above > 0.0 {
            below / (below + above)
        } else {
            0.5
        };
        expected.push(rest * split * n);
        expected.push(rest * (1.0 - split) * n);
        let mut stat = 0.0;
        let mut cells = 0;
        for (o, e) in observed.iter().zip(&expected) {
            if *e > 0.0 {
                stat += (o - e) * (o - e) / e;
                cells += 1;
            } else {
                assert_eq!(*o, 0.0, "a draw where the pmf has no mass");
            }
        }
        (stat, cells - 1)
    }

    /// The pass mark: df + 6·√(2·df), six standard deviations above the χ² mean (the normal
    /// approximation; far beyond the 1 − 10⁻⁶ quantile for the df seen here). Loose on purpose:
    /// seeds are fixed, so a pass is reproducible, and a wrong distribution at 200,000 draws
    /// lands orders of magnitude above it (see the power check below).
    fn threshold(df: usize) -> f64 {
        df as f64 + 6.0 * (2.0 * df as f64).sqrt()
    }

    fn laplace_pmf(t: u64, s: u64) -> impl Fn(i64) -> f64 {
        let a = alpha(t, s);
        move |x: i64| (1.0 - a) / (1.0 + a) * a.powi(x.unsigned_abs() as i32)
    }

    /// P(Y = k) for NB(1/h, α): Π_{j<k} (hj + 1)/(h(j + 1)) · (1 − α)^(1/h) α^k.
    fn nb_pmf(t: u64, s: u64, h: u64) -> impl Fn(i64) -> f64 {
        let a = alpha(t, s);
        let hf = h as f64;
        move |k: i64| {
            if k < 0 {
                return 0.0;
            }
            let mut p = (1.0 - a).powf(1.0 / hf);
            for j in 0..k {
                p *= (hf * j as f64 + 1.0) / (hf * (j as f64 + 1.0)) * a;
            }
            p
        }
    }

    const DRAWS: usize = 200_000;

    /// Beta-binomial(g, a, 1 − a) pmf: C(g, k) · a^(k↑) (1 − a)^((g−k)↑) / g!, with x^(m↑) the
    /// rising factorial (a + b = 1, so the denominator (a + b)^(g↑) is g!).
    fn beta_binomial(g: u64, a: f64, k: u64) -> f64 {
        let rising = |x: f64, m: u64| (0..m).map(|i| x + i as f64).product::<f64>();
        let choose = (0..k)
            .map(|i| (g - i) as f64 / (i + 1) as f64)
            .product::<f64>();
        let factorial = (1..=g).map(|i| i as f64).product::<f64>();
        choose * rising(a, k) * rising(1.0 - a, g - k) / factorial
    }

    #[test]
    fn noise_share_cycle_cut_law_is_the_beta_binomial() {
        // Exactly, by the recursion the algorithm follows: P_g(k) = (1/g) Σ_c [(1/h) P_{g−c}(k−c)
        // + (1 − 1/h) P_{g−c}(k)]. It equals the Beta-binomial for every g ≤ 40, which is the
        // conditional law an NB(1/h) variable must have given the geometric it is part of.
        for h in [2u64, 3, 5] {
            let p = 1.0 / h as f64;
            let mut law: Vec<Vec<f64>> = vec![vec![1.0]];
            for g in 1..=40usize {
                let mut next = vec![0.0; g + 1];
                for c in 1..=g {
                    for (k, &q) in law[g - c].iter().enumerate() {
                        next[k + c] += q * p / g as f64;
                        next[k] += q * (1.0 - p) / g as f64;
                    }
                }
                for (k, &q) in next.iter().enumerate() {
                    let want = beta_binomial(g as u64, p, k as u64);
                    assert!((q - want).abs() < 1e-12, "h={h} g={g} k={k}: {q} vs {want}");
                }
                law.push(next);
            }
        }
        // And the code draws it: χ² of keep_cycles against the Beta-binomial.
        for (g, h) in [(10u64, 3u64), (25, 2)] {
            let mut rng = SplitMix64(g * h);
            let xs: Vec<i64> = (0..100_000)
                .map(|_| keep_cycles(&mut rng, g, h).expect("rng") as i64)
                .collect();
            let pmf = |k: i64| {
                if (0..=g as i64).contains(&k) {
                    beta_binomial(g, 1.0 / h as f64, k as u64)
                } else {
                    0.0
                }
            };
            let (stat, df) = chi_square(&xs, &pmf);
            assert!(stat < threshold(df), "g={g} h={h}: χ² = {stat:.1}, {df} df");
        }
    }

    #[test]
    fn noise_share_sum_of_h_shares_is_the_discrete_laplace() {
        for h in [1u64, 2, 3] {
            for (t, s) in [(1u64, 1u64), (7, 2), (12, 1)] {
                let mut rng = SplitMix64(1000 * h + 10 * t + s);
                let xs: Vec<i64> = (0..DRAWS)
                    .map(|_| {
                        (0..h)
                            .map(|_| noise_share(&mut rng, t, s, h).expect("rng"))
                            .sum()
                    })
                    .collect();
                let (stat, df) = chi_square(&xs, &laplace_pmf(t, s));
                assert!(
                    stat < threshold(df),
                    "h={h} scale {t}/{s}: χ² = {stat:.1} with {df} df (pass below {:.1})",
                    threshold(df)
                );
            }
        }
    }

    #[test]
    fn noise_share_h1_matches_the_existing_sampler() {
        // Same pmf, drawn both ways; and the existing sampler passes the same test, so the
        // statistic is calibrated the same for both.
        for (t, s) in [(3u64, 1u64), (1000, 333)] {
            let pmf = laplace_pmf(t, s);
            let mut rng = SplitMix64(t + s);
            let shares: Vec<i64> = (0..DRAWS)
                .map(|_| noise_share(&mut rng, t, s, 1).expect("rng"))
                .collect();
            let central: Vec<i64> = (0..DRAWS)
                .map(|_| discrete_laplace(&mut rng, t, s).expect("rng"))
                .collect();
            for xs in [&shares, &central] {
                let (stat, df) = chi_square(xs, &pmf);
                assert!(
                    stat < threshold(df),
                    "scale {t}/{s}: χ² = {stat:.1}, {df} df"
                );
            }
        }
    }

    #[test]
    fn noise_share_negative_binomial_has_the_nb_pmf() {
        for (h, t, s) in [(2u64, 5u64, 1u64), (3, 7, 2), (5, 20, 1)] {
            let mut rng = SplitMix64(77 + h);
            let ys: Vec<i64> = (0..DRAWS)
                .map(|_| negative_binomial(&mut rng, t, s, h).expect("rng") as i64)
                .collect();
            let (stat, df) = chi_square(&ys, &nb_pmf(t, s, h));
            assert!(
                stat < threshold(df),
                "NB(1/{h}) scale {t}/{s}: χ² = {stat:.1}, {df} df"
            );
        }
    }

    #[test]
    fn noise_share_test_has_power_too_few_shares_fail() {
        // The sum of h − 1 shares shaped for h is not the full discrete Laplace (too little
        // noise): the same test must reject it, and by far, so the pass mark is not too loose to
        // mean anything. (One share for h = 2 scores ≈ 54,000 against a pass mark of 113.)
        let (t, s) = (7u64, 2u64);
        for h in [2u64, 3] {
            let mut rng = SplitMix64(5 + h);
            let xs: Vec<i64> = (0..DRAWS)
                .map(|_| {
                    (0..h - 1)
                        .map(|_| noise_share(&mut rng, t, s, h).expect("rng"))
                        .sum()
                })
                .collect();
            let (stat, df) = chi_square(&xs, &laplace_pmf(t, s));
            assert!(
                stat > 10.0 * threshold(df),
                "h={h}: χ² = {stat:.1}, {df} df"
            );
        }
    }

    fn moments(xs: &[i64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn noise_share_variance_is_n_over_h_times_central_and_mean_zero() {
        // (n, h): three shares each a full draw (today's per-node noise) carry 3× the central
        // variance; shaped for h = n they carry exactly the central variance.
        for (n, h) in [(3u64, 1u64), (3, 3), (3, 2)] {
            for (t, s) in [(4u64, 1u64), (1000, 100)] {
                let b = t as f64 / s as f64;
                let mut rng = SplitMix64(31 * n + h + t);
                let draws = 60_000;
                let xs: Vec<i64> = (0..draws)
                    .map(|_| {
                        (0..n)
                            .map(|_| noise_share(&mut rng, t, s, h).expect("rng"))
                            .sum()
                    })
                    .collect();
                let (mean, var) = moments(&xs);
                let expected = share_variance(b, n, h);
                assert!(
                    (var / expected - 1.0).abs() < 0.05,
                    "n={n} h={h} b={b}: variance {var:.2} vs {expected:.2}"
                );
                assert!(
                    mean.abs() < 5.0 * (expected / draws as f64).sqrt(),
                    "n={n} h={h} b={b}: mean {mean}"
                );
            }
        }
        assert_eq!(share_variance(2.0, 3, 3), variance(2.0));
        assert_eq!(share_variance(2.0, 3, 1), 3.0 * variance(2.0));
        assert_eq!(share_variance(2.0, 3, 0), 0.0);
    }

    #[test]
    fn noise_share_large_scales_are_cheap_and_symmetric() {
        // A sum-of-squares scale: the cycle cut costs ~ln G draws, not G.
        let t = 1u64 << 40;
        let mut rng = SplitMix64(11);
        let xs: Vec<i64> = (0..4_000)
            .map(|_| noise_share(&mut rng, t, 1, 3).expect("rng"))
            .collect();
        let pos = xs.iter().filter(|&&x| x > 0).count();
        assert!((1_800..2_200).contains(&pos), "{pos}");
        let (_, var) = moments(&xs);
        let expected = share_variance(t as f64, 1, 3);
        assert!(
            (var / expected - 1.0).abs() < 0.2,
            "{var:e} vs {expected:e}"
        );
    }

    /// A source that fails after `n` draws.
    struct Failing(u64);
    impl RandomSource for Failing {
        fn next_u64(&mut self) -> Result<u64, RandomFailure> {
            if self.0 == 0 {
                return Err(RandomFailure);
            }
            self.0 -= 1;
            Ok(0x5555_5555_5555_5555u64.rotate_left(self.0 as u32))
        }
    }

    #[test]
    fn noise_share_a_failing_random_source_stops_with_random_failure() {
        for h in [1u64, 2, 3] {
            // A share needs at least six draws (three per geometric), so these all fail.
            for n in [0u64, 1, 2, 5] {
                assert_eq!(
                    noise_share(&mut Failing(n), 10, 1, h),
                    Err(RandomFailure),
                    "h={h} n={n}"
                );
            }
        }
        // All-zero bits would loop forever in the Bernoulli(e^-1) step: failure must surface.
        struct Zeros(u64);
        impl RandomSource for Zeros {
            fn next_u64(&mut self) -> Result<u64, RandomFailure> {
                if self.0 == 0 {
                    return Err(RandomFailure);
                }
                self.0 -= 1;
                Ok(0)
            }
        }
        assert_eq!(noise_share(&mut Zeros(1000), 3, 1, 2), Err(RandomFailure));
    }
}
