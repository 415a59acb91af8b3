"""The jitted train step on its own (``dpo_jax.core.step``): what it keeps in memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state
from dpo_jax.data import Layout, PreferenceLoader, TokenizedPair
from dpo_jax.models import ModelConfig, init_decoder
from dpo_jax.training import builders


def test_a_single_runs_step_updates_in_place_and_a_members_keeps_its_last_good_state():
    """A population member's step computes the new parameters and optimizer state beside the old (a member that
    fails keeps its last good state, lr 1e30 here); a single run's step (which stops at a failure without saving)
    writes them in place: its compiled temporaries are at least one copy of the parameters smaller (XLA's buffer
    assignment), and both mark the failure."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)  # fmt: skip
    graphdef, params = nnx.split(init_decoder(cfg, seed=0))
    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(*(rng.integers(3, 4096, n).astype(np.int32) for n in (6, 5, 4)), 1.0, 1.0)
             for _ in range(4)]  # fmt: skip
    batch = jax.tree.map(jnp.asarray, PreferenceLoader(pairs, 4, layout=Layout()).batch(0))
    batch = batch.replace(ref_logps_GxPx2=jnp.zeros(batch.index_GxP.shape + (2,)))
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e30, warmup_steps=0), 10)
    before = [np.asarray(x) for x in jax.tree.leaves(params)]  # the step donates its state
    param_bytes = sum(x.nbytes for x in before)
    temp, after = {}, {}
    for keep in (True, False):
        sc = step.StepConfig("dpo", keep_last_good=keep)
        fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc), donate_argnums=0)
        state = init_state(jax.tree.map(jnp.copy, params), tx, builders.default_hparams(), 0)
        compiled = fn.lower(state, batch, None).compile()
        temp[keep] = compiled.memory_analysis().temp_size_in_bytes
        after[keep], _ = compiled(state, batch, None)
    assert temp[False] <= temp[True] - 0.9 * param_bytes, (temp, param_bytes)
    for keep in (True, False):
        assert int(after[keep].nonfinite_step) == 0 and int(after[keep].step) == 1
    kept, in_place = (jax.tree.leaves(after[k].params) for k in (True, False))
    for a, p in zip(kept, before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), p)  # the last good state, bit for bit
    # written in place (~1e30: their norm overflows): the run must stop, which Loop.check_finite does
    assert np.abs(np.asarray(in_place[0])).max() > 1e20
