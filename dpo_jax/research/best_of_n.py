"""Best-of-N sampling from the reference: the baseline of the reward-KL frontier.

Draw N completions from pi_ref and keep the one with the highest reward. Its KL to pi_ref is at most
log N - (N - 1) / N (exact for continuous rewards; Beirami et al. 2024), and its expected reward is estimated
without bias from M >= N samples per prompt by the order statistics of the sorted rewards:
E[max of N] = sum_i r_(i) C(i - 1, N - 1) / C(M, N).
"""

from __future__ import annotations

import numpy as np


def bon_kl(n) -> np.ndarray:
    """KL(best-of-N || pi_ref) in nats for distinct rewards: log N - (N - 1) / N."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def bon_kl_levels(rewards_M: np.ndarray, ns) -> np.ndarray:
    """[len(ns)]: exact KL(best-of-N || pi_ref) for one prompt whose reference reward distribution is the
    empirical one of ``rewards_M`` (ties broken at random): the KL between F(l)^N - F(l-)^N and the reference
    level probabilities, F the reference CDF over reward levels l."""
    _, counts = np.unique(np.asarray(rewards_M), return_counts=True)
    ref = counts / counts.sum()
    cdf = np.cumsum(ref)
    prev = np.concatenate([[0.0], cdf[:-1]])
    out = []
    for n in np.atleast_1d(ns):
        bon = cdf**n - prev**n
        keep = bon > 0
        out.append(float(np.sum(bon[keep] * (np.log(bon[keep]) - np.log(ref[keep])))))
    return np.asarray(out)


def bon_n_at_kl(kl) -> np.ndarray:
    """The (real) N whose best-of-N KL is ``kl``: the inverse of ``bon_kl`` on N >= 1, by bisection."""
    kl = np.asarray(kl, np.float64)
    lo, hi = np.zeros_like(kl), np.maximum(kl + 2.0, 1.0)  # log N in [0, kl + 2] brackets the root
    for _ in range(100):
        mid = (lo + hi) / 2
        below = bon_kl(np.exp(mid)) < kl
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.exp((lo + hi) / 2)


def expected_max(rewards_PxM: np.ndarray, ns) -> np.ndarray:
    """[P, len(ns)]: the unbiased estimate of E[max of N rewards] per prompt, from M samples per prompt."""
    r = np.sort(np.asarray(rewards_PxM, np.float64), axis=-1)
    m = r.shape[-1]
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, m + 1)))])

    def log_comb(a, b):
        return log_fact[a] - log_fact[b] - log_fact[a - b]

    i = np.arange(1, m + 1)
    out = []
    for n in np.atleast_1d(ns):
        n = int(n)
        if not 1 <= n <= m:
            raise ValueError(f"best-of-N: N={n} needs 1 <= N <= M={m} samples per prompt")
        w = np.zeros(m)
        k = i[i >= n]  # the i-th smallest is the max of N draws (without replacement) in C(i-1, N-1) of C(M, N) ways
        w[k - 1] = np.exp(log_comb(k - 1, n - 1) - log_comb(m, n))
        out.append(r @ w)
    return np.stack(out, axis=-1)


def exact_bon_policy(ref_probs, rewards, n: int) -> np.ndarray:
    """The best-of-N distribution over a finite set of completions with distinct rewards:
    pi_N(y) = F(y)^N - F(y^-)^N, F the reference CDF in reward order."""
    ref_probs, rewards = np.asarray(ref_probs, np.float64), np.asarray(rewards, np.float64)
    order = np.argsort(rewards)
    cdf = np.cumsum(ref_probs[order])
    mass = cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n
    out = np.empty_like(mass)
    out[order] = mass
    return out
