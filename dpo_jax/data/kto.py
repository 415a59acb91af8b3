"""KTO's unpaired examples, laid out as pairs so that every batch layout, cache and loader serves them.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306) scores single completions labelled desirable or undesirable, and
estimates the reference point z0 = KL(pi || pi_ref) from *mismatched* prompt / completion pairs. An unpaired
example (x_i, y_i, label) becomes a ``TokenizedPair`` whose first completion is y_i and whose second is the KL
completion y' (the completion of the previous example, rotated by one as TRL does, so a different prompt's), with
``prob`` = 1 (desirable) or 0 (undesirable). With the shared-prompt layout x_i runs once for both.
"""

from __future__ import annotations

import numpy as np

from dpo_jax.data.tokenize import TokenizedPair


def split_pairs(pairs: list[TokenizedPair]) -> list[tuple[np.ndarray, np.ndarray, bool, float]]:
    """Paired data as unpaired examples: (x, y_w, desirable) for every pair, then (x, y_l, undesirable)."""
    desirable = [(p.prompt, p.chosen, True, p.weight) for p in pairs]
    return desirable + [(p.prompt, p.rejected, False, p.weight) for p in pairs]


def kto_pairs(examples: list[tuple[np.ndarray, np.ndarray, bool, float]]) -> list[TokenizedPair]:
    """(prompt, completion, desirable, weight) examples -> pairs (completion, KL completion of example i - 1)."""
    if len(examples) < 2:
        raise ValueError(f"KTO needs at least 2 examples for its mismatched KL completions; got {len(examples)}")
    out = []
    for i, (prompt, completion, desirable, weight) in enumerate(examples):
        kl_completion = examples[i - 1][1]
        out.append(TokenizedPair(prompt, completion, kl_completion, 1.0 if desirable else 0.0, weight))
    return out


def from_pairs(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """KTO's examples from paired data (split) or from unpaired rows (``TokenizedPair.unpaired``) as they are."""
    if pairs and all(p.unpaired for p in pairs):
        return kto_pairs([(p.prompt, p.chosen, p.prob == 1.0, p.weight) for p in pairs])
    return kto_pairs(split_pairs(pairs))


def counts(pairs: list[TokenizedPair]) -> tuple[int, int]:
    """(desirable, undesirable) examples."""
    d = sum(p.prob == 1.0 for p in pairs)
    return d, len(pairs) - d
