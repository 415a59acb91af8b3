"""Context parallelism in the run: ``mesh.context`` splits every row's tokens over devices (the batch's token axis
and attention's ring, ``dpo_jax.models.context.ring_attention``). Through the ``dpo-jax`` command, a run over a
context axis of 4 ends where the same run on one device ends, and resumes to the same bits."""

import jax
import numpy as np
import pytest
from conftest import xla_env
from helpers import cli, tiny_config, wait_for_checkpoint
from safetensors.numpy import load_file

from dpo_jax.config import validate
from dpo_jax.errors import ConfigError
from dpo_jax.training import train
from dpo_jax.training.outputs import read_history

pytestmark = pytest.mark.slow
COMMON = ("model.attention_block=8", "log_every=1")  # rows of 24 tokens: 6 a device, one 8-token block each


def _history(workdir):
    rows = read_history(workdir / "metrics.jsonl")
    return {k: [r[k] for r in rows if k in r] for k in ("sft/loss", "train/loss", "eval/loss", "eval/kl_token")}


def test_a_run_over_a_context_axis_of_four_ends_where_one_device_ends_and_resumes_exactly(tmp_path):
    one = tiny_config(*COMMON, cache_dir=tmp_path / "cache1")
    train.train(one, tmp_path / "one", devices=jax.devices()[:1])
    ring = cli(tmp_path / "ring", *COMMON, "mesh.context=4", env={"XLA_FLAGS": xla_env(4)})
    assert ring.returncode == 0, ring.stdout[-3000:] + ring.stderr[-3000:]
    assert "(attention: ring over context=4" in ring.stdout + ring.stderr
    assert "| devices | 4 |" in ring.stdout
    want, got = _history(tmp_path / "one"), _history(tmp_path / "ring")
    for key, values in want.items():
        assert len(got[key]) == len(values) > 0, key
        np.testing.assert_allclose(got[key], values, rtol=2e-5, atol=2e-6, err_msg=key)
    w_one, w_ring = (load_file(tmp_path / d / "hf/model.safetensors") for d in ("one", "ring"))
    assert w_one.keys() == w_ring.keys()
    for key in w_one:
        np.testing.assert_allclose(w_ring[key], w_one[key], rtol=1e-4, atol=2e-6, err_msg=key)

    # Killed (SIGKILL) once its step-5 checkpoint is committed; the same command resumes and ends with the same
    # weights, bit for bit.
    proc = cli(tmp_path / "again", *COMMON, "mesh.context=4", env={"XLA_FLAGS": xla_env(4)}, wait=False)
    wait_for_checkpoint(proc, tmp_path / "again/dpo/checkpoints", 5)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "again/summary.json").exists()
    again = cli(tmp_path / "again", *COMMON, "mesh.context=4", env={"XLA_FLAGS": xla_env(4)})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[dpo] resumed from step" in again.stdout + again.stderr
    w_again = load_file(tmp_path / "again/hf/model.safetensors")
    for key in w_ring:
        np.testing.assert_array_equal(w_again[key], w_ring[key], err_msg=key)


def test_context_sizes_that_do_not_fit_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"config\.mesh\.context: expected a divisor of the 8 devices, got 3"):
        validate(tiny_config("mesh.context=3"), num_devices=8)
    per_member = r"config\.mesh\.context: expected a divisor of the 4 devices per member group \(2\), got 3"
    with pytest.raises(ConfigError, match=per_member):
        validate(tiny_config("mesh.context=3", "mesh.member=2"), num_devices=8, members=2)
    strategy = r"config\.model\.context_attention: expected ring \| gather, got 'allgather'"
    with pytest.raises(ConfigError, match=strategy):
        validate(tiny_config('model.context_attention="allgather"'), num_devices=8)


@pytest.mark.parametrize("strategy", ["ring", "gather"])
def test_the_model_under_a_context_mesh_attends_by_the_ring_and_computes_the_same_logits(strategy):
    """What the run's programs do with ``mesh.context`` > 1: the decoder's attention is the ring (collective
    permutes in the compiled program) or, with ``model.context_attention="gather"``, all-gathers of the keys and
    values; the logits equal the unsharded forward's."""
    import jax.numpy as jnp
    from flax import nnx

    from dpo_jax.infra import sharding
    from dpo_jax.models import ModelConfig, init_decoder

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention_block=8, context_attention=strategy)  # fmt: skip
    graphdef, params = nnx.split(init_decoder(cfg))
    t = 64
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, t)), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(2, 0), jnp.int32)

    def logits(p, tok):
        return nnx.merge(graphdef, p)(tok, segment_ids_BxT=segments, attention_mask_BxT=segments > 0).logits_BxTxV

    want = jax.jit(logits)(params, tokens)
    with jax.set_mesh(sharding.make_mesh(data=2, context=4)):
        program = jax.jit(logits).lower(params, tokens).compile()
        got = program(params, tokens)
    assert ("collective-permute" if strategy == "ring" else "all-gather") in program.as_text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
