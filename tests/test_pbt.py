"""PBT's decisions on constructed populations: the ranking, the exploit's copy, the perturbation's bounds, and the
same seed giving the same lineage. (End to end, with a resume and a diverging member: tests/test_sweep.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.core.state import gather_members
from dpo_jax.research import pbt
from dpo_jax.training import builders

SCORES = np.asarray([0.1, 0.9, 0.5, -np.inf, 0.7, 0.2, 0.8, 0.3])  # member 3 failed
KW = dict(fraction=0.25, names=("beta", "lr_scale"), factors=(0.8, 1.25))


def test_the_bottom_take_parents_from_the_top():
    decisions = pbt.decide(SCORES, seed=0, step=50, **KW)
    assert [d.member for d in decisions] == [0, 3]  # the two lowest: the failed member and 0.1
    assert all(d.parent in (1, 6) for d in decisions)  # the two highest
    assert all(set(d.factors) == {"beta", "lr_scale"} and set(d.factors.values()) <= {0.8, 1.25} for d in decisions)
    # ties rank by index; a population of 2 exploits one member
    assert [(d.member, d.parent) for d in pbt.decide(np.asarray([1.0, 1.0]), seed=0, step=1, **KW)] == [(1, 0)]


def test_decisions_are_a_pure_function_of_seed_step_and_metrics():
    runs = [[(d.member, d.parent, d.factors) for d in pbt.decide(SCORES, seed=s, step=t, **KW)]
            for s, t in ((0, 50), (0, 50), (1, 50), (0, 100))]  # fmt: skip
    assert runs[0] == runs[1]
    draws = {tuple((p, tuple(sorted(f.items()))) for _, p, f in r) for r in runs[1:]}
    assert len(draws) > 1  # another seed or step draws differently (parents or factors)
    parents = {d.parent for s in range(20) for d in pbt.decide(SCORES, seed=s, step=50, **KW)}
    assert parents == {1, 6}  # both top members are drawn over seeds


def test_perturbation_multiplies_and_clips_to_the_bounds():
    bounds = {"beta": (0.01, 2.0), "lr_scale": (0.5, 4.0)}
    hp = builders.default_hparams(beta=1.9)
    new = pbt.perturb(hp, {"beta": 1.25, "lr_scale": 0.8}, bounds)
    assert float(new.beta) == 2.0 and float(new.lr_scale) == pytest.approx(0.8)
    low = pbt.perturb(new.replace(lr_scale=np.float32(0.55)), {"lr_scale": 0.8}, bounds)
    assert float(low.lr_scale) == 0.5 and float(low.beta) == 2.0  # clipped; the other untouched
    assert float(new.label_smoothing) == float(hp.label_smoothing)


def test_the_exploit_copies_the_parents_state_exactly():
    key = jax.random.split(jax.random.key(0), 3)
    state = {"params": {"w": jax.random.normal(key[0], (4, 3, 5))}, "opt": jax.random.normal(key[1], (4, 7)),
             "rng": jax.random.key_data(jax.random.split(key[2], 4)), "step": jnp.arange(4)}  # fmt: skip
    index = np.asarray([0, 2, 2, 1])  # member 1 takes member 2's state, member 3 member 1's (before the copy)
    out = gather_members(state, jnp.asarray(index))  # what Loop.exploit jits with the population's shardings
    for k, src in enumerate(index):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[src]))


def test_bad_settings_are_one_line_naming_the_field():
    from helpers import tiny_config

    from dpo_jax.errors import ConfigError

    for item, field in (("pbt.hparams=\"beta,gamma\"", "pbt.hparams"), ("pbt.fraction=0.7", "pbt.fraction"),
                        ("pbt.every=7", "pbt.every"), ("pbt.metric=\"speed\"", "pbt.metric")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"config\.{field}:"):
            pbt.settings(tiny_config("pbt.enabled=True", "eval.every=5", item))
    # files with no config.reward: nothing scores the samples; the loss or accuracy rank without one
    files = ('task="files"', "pbt.enabled=True", "eval.every=5", "pbt.every=5")
    with pytest.raises(
        ConfigError, match=r"config\.pbt\.metric: 'reward_kl' .* but no reward \(config\.reward is unset"
    ):
        pbt.settings(tiny_config(*files, 'pbt.metric="reward_kl"'))
    assert pbt.settings(tiny_config(*files, 'pbt.metric="loss"'))["metric"] == "loss"
    bounds = pbt.settings(tiny_config(*files, 'pbt.metric="loss"', "pbt.label_smoothing_bounds=[0.0, 0.49]"))
    assert bounds["bounds"]["label_smoothing"] == (0.0, 0.49)


@pytest.mark.parametrize(
    "override,message",
    [("eval.num_prompts=0", "config.pbt.metric: 'reward' ranks members on eval's sampled reward, but "
                            "eval.num_prompts=0"),
     ("pbt.beta_bounds=(-2,-1)", "config.pbt.beta_bounds: expected (low, high) with low <= high, both a number > 0 "
                                 "(the domain of dpo.beta), got (-2.0, -1.0)"),
     ("pbt.label_smoothing_bounds=(0,0.9)", "config.pbt.label_smoothing_bounds: expected (low, high) with low <= "
                                            "high, both a number in [0, 0.5)"),
     ("pbt.lr_scale_bounds=(0,2)", "config.pbt.lr_scale_bounds: expected (low, high) with low <= high, both a number "
                                   "> 0, got (0.0, 2.0)"),
     ("pbt.every=20", "config.pbt.every: expected fewer than optim.steps=20 steps"),
     ("pbt.every=0", "config.pbt.every: expected a positive multiple of eval.every (10)"),
     ("pbt.seed=-1", "config.pbt.seed: expected an integer >= 0, got -1")],
)  # fmt: skip
def test_pbt_that_would_rank_on_nothing_or_leave_a_domain_is_refused_by_the_command(tmp_path, override, message):
    """``dpo-jax sweep`` on configs/pbt.py: one line and exit 2 before anything compiles (once: members scored -inf
    and exploited by index, beta = -1, label smoothing 0.675, no exploit at all, a crash at the first exploit)."""
    import os

    from conftest import xla_env
    from helpers import ROOT, dpo_jax

    argv = ["sweep", "--config", str(ROOT / "configs/pbt.py:runlocal"), "--workdir", str(tmp_path), "--mode",
            "vectorized", f"--config.{override}"]  # fmt: skip
    out = dpo_jax(argv, {**os.environ, "XLA_FLAGS": xla_env(1)}, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dpo-jax: {message}"), out.stderr
