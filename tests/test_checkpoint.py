"""Checkpoints: the content digest catches any changed element; a damaged newest step falls back to an intact one."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dpo_jax.errors import NonFiniteLoss, WorkdirError
from dpo_jax.infra import checkpoint


def _state():
    rng = np.random.default_rng(0)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32), "b": jnp.zeros((48,), jnp.bfloat16)},
        "step": jnp.int32(7),
        "rng": jax.random.PRNGKey(3),
        "flag": jnp.asarray([True, False]),
    }


@pytest.mark.parametrize("leaf", ["params/w", "params/b", "step", "rng", "flag"])
def test_digest_changes_when_any_single_element_changes(leaf):
    state = _state()
    before = checkpoint.digest(state)
    assert checkpoint.digest(jax.tree.map(jnp.copy, state)) == before
    *path, last = leaf.split("/")
    node = state
    for p in path:
        node = node[p]
    x = np.array(node[last])
    flat = x.reshape(-1)
    i = flat.size // 2
    if x.dtype == np.bool_:
        flat[i] = ~flat[i]
    elif x.dtype == ml_dtypes.bfloat16:
        flat[i] = ml_dtypes.bfloat16(1.0)  # was 0
    else:  # flip the lowest bit of one element: the smallest change there is
        flat.view(np.uint32)[i] ^= 1
    node[last] = jnp.asarray(x)
    assert checkpoint.digest(state) != before


def _numpy_digest(x) -> list[int]:
    """The digest's two sums, by NumPy: bits as uint32 per element, odd position weights, mod 2**32."""
    x = np.asarray(x).reshape(-1)
    u = x.astype(np.uint64) if x.dtype == np.bool_ else x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint64)
    i = np.arange(u.size, dtype=np.uint64)
    w1, w2 = 2 * (i % 65521) + 1, 2 * (i % 65519) + 1
    return [int((u * w1).sum() % 2**32), int(((u ^ (u >> np.uint64(16))) * w2).sum() % 2**32)]


@pytest.mark.parametrize("chunk", [64, 1 << 22])  # large leaves a chunk at a time, or every leaf in one program
def test_digest_and_finite_check_read_large_leaves_in_chunks_alike(monkeypatch, chunk):
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(1)
    tree = {
        "w": rng.normal(size=(7, 30)).astype(np.float32),  # 210 = 3 full chunks of 64 and a part
        "b": rng.normal(size=(129,)).astype(ml_dtypes.bfloat16),  # prime-ish: chunks of one column
        "q": rng.integers(-128, 127, size=(16, 16)).astype(np.int8),
        "m": rng.random(size=(100,)) < 0.5,
        "s": np.float32(2.5),
    }
    got = checkpoint.digest({k: jnp.asarray(v) for k, v in tree.items()})
    assert got == [_numpy_digest(tree[k]) for k in sorted(tree)]  # leaves in key order
    assert checkpoint.all_finite({k: jnp.asarray(v) for k, v in tree.items()})
    for where in (5, 200):  # in a full chunk, in the last part
        w = tree["w"].copy()
        w.reshape(-1)[where] = np.nan
        assert not checkpoint.all_finite({**tree, "w": jnp.asarray(w)})


def test_a_digest_chunk_holds_two_chunks_of_temporaries_not_two_leaves():
    x = jnp.zeros((4 * checkpoint.CHUNK_ELEMENTS,), jnp.float32)
    compiled = checkpoint._chunk.lower(x, jnp.int32(0), checkpoint.CHUNK_ELEMENTS, 1).compile()
    chunk_bytes = checkpoint.CHUNK_ELEMENTS * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * chunk_bytes  # the whole leaf would be 8 chunks


def _saved(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=5, name="test")
    states = {}
    for step in (1, 2):
        states[step] = jax.tree.map(lambda x, s=step: x + s if jnp.issubdtype(x.dtype, jnp.floating) else x, _state())
        ckpt.save(step, states[step], {"data_step": step}, force=True)
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state())
    return states, abstract


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(f):
    f.write_bytes(f.read_bytes()[:100])


def _flip(f):
    b = bytearray(f.read_bytes())
    for i in range(8):
        b[len(b) // 2 + i] ^= 0x5A
    f.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage",
    [
        ("flipped bytes", lambda d: _flip(_largest_file(d)), "do not match the digest"),
        ("truncated file", lambda d: _truncate(_largest_file(d)), "cannot be read"),
        ("deleted file", lambda d: _largest_file(d).unlink(), "cannot be read"),
    ],
    ids=lambda d: d[0] if isinstance(d, tuple) else d,
)
def test_a_damaged_newest_step_falls_back_to_the_intact_one(tmp_path, capsys, damage):
    _, fn, reason = damage
    states, abstract = _saved(tmp_path)
    fn(tmp_path / "ckpt" / "2")
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=5, name="test")
    step, state, meta = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 1 and meta["data_step"] == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "[test] checkpoint step 2 is damaged" in out[0] and reason in out[0]
    assert "falling back to step 1" in out[0] and (tmp_path / "ckpt" / "damaged-2").is_dir()


def test_non_finite_parameters_are_never_saved_nor_restored(tmp_path, capsys):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=1, name="test")
    bad = _state()
    bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteLoss, match=r"\[test\] the state of step 1 holds NaN/Inf.*none yet in"):
        ckpt.save(1, bad, {"data_step": 1}, force=True)
    ckpt.save(1, _state(), {"data_step": 1}, force=True)
    with pytest.raises(NonFiniteLoss, match="Last good checkpoint: step 1 in"):
        ckpt.save(2, bad, {"data_step": 2}, force=True)  # keep=1: the good step must survive
    ckpt.wait()
    assert ckpt.steps() == [1]
    # written behind the checker's back (as a damaged disk might): refused on restore all the same
    args = ocp.args.Composite(state=ocp.args.StandardSave(bad), meta=ocp.args.JsonSave({"data_step": 3}))
    ckpt.manager.save(3, args=args, force=True)
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), bad)
    assert ckpt.restore_latest(abstract) is None  # step 3 moved aside; step 1 was deleted by keep=1 meanwhile
    ckpt.close()
    out = capsys.readouterr().out
    assert "step 3 is damaged (it holds NaN/Inf values)" in out


def test_a_checkpoint_of_another_config_is_refused_not_moved_aside(tmp_path):
    """A restore that fails because the config makes other shapes (say another lora.rank) is no damage."""
    _saved(tmp_path)
    state = _state()
    state["params"]["w"] = jnp.zeros((64, 32), jnp.float32)  # what a changed config would make
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=5, name="test")
    with pytest.raises(WorkdirError, match=r"checkpoint step 2 in .* was made with another config .*\(64, 48\)"):
        ckpt.restore_latest(abstract)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]  # nothing moved aside
