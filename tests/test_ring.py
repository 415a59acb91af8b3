"""Ring attention (``context.ring_attention``, context parallelism): rows split over a ``context`` mesh axis of the
8 test devices give the reference einsum's values and gradients on every layout the model makes (padding, packed
segments, shared-prompt branches, windows, soft-capping, GQA), at rows many blocks long on every device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import assert_like_einsum, layout_ids

from dpo_jax.models import attention, context
from dpo_jax.models.attention import Ids

CASES = {  # name -> (layout, kv heads, query heads per kv head, window, softcap)
    "padded": ("padded", 2, 2, None, None),
    "packed_gqa": ("packed", 1, 4, None, None),
    "shared_branches": ("shared", 2, 2, None, None),
    "shared_window_softcap": ("shared", 2, 1, 6, 5.0),
}


@pytest.mark.parametrize(
    "name,n,strategy",
    [(name, 4, "ring") for name in CASES]
    + [("shared_window_softcap", 8, "ring"), ("packed_gqa", 4, "gather"), ("shared_window_softcap", 8, "gather")],
)
def test_ring_attention_equals_the_einsum_in_values_and_gradients(name, n, strategy):
    """The ring, and the all-gather strategy (``gather_attention``) on two of the cases."""
    kind, kh, g, window, softcap = CASES[name]
    q_ids, k_ids = layout_ids(kind, t=44)
    b, t, e = q_ids.slot.shape[0], q_ids.slot.shape[1], 8
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8 // n, n), ("data", "context"))
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                  for shape in ((b, t, kh, g, e), (b, t, kh, e), (b, t, kh, e), (b, t, kh, g, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]  # padding queries see nothing: their outputs are not compared

    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window, softcap)  # noqa: E731
    fn = context.CONTEXT_STRATEGIES[strategy]
    ring = lambda q, k, v: fn(q, k, v, q_ids, k_ids, window, mesh=mesh, block=4, softcap=softcap)  # noqa: E731
    assert_like_einsum(ring, ref, (q, k, v), real, w)  # 1e-5 of the values' and gradients' size


@pytest.mark.parametrize("kind,strategy", [("packed", "ring"), ("shared", "ring"), ("shared", "gather")])
def test_rows_in_the_balanced_order_give_the_einsum_in_values_and_gradients(kind, strategy):
    """The decoder's order under the axis: every field of the row's ids, queries, keys and values permuted by
    ``balanced_order`` (device i holds pieces i and 2n-1-i of 8, each two 4-token blocks): the ring's output (or the
    all-gather strategy's, which sorts the gathered keys back by slot), put back by NumPy, and its gradients equal
    the einsum's on the row as it was (segments that span pieces and the gap between a device's two pieces,
    shared-prompt branches, a window)."""
    n, t = 4, 64
    q_ids, k_ids = layout_ids(kind, t=t)
    order = context.balanced_order(t, n)
    assert sorted(order.tolist()) == list(range(t)) and order[:16].tolist() == [*range(8), *range(56, 64)]
    shuffle = lambda x: None if x is None else x[:, order]  # noqa: E731
    b, e, window = q_ids.slot.shape[0], 8, 6 if kind == "shared" else None
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, n), ("data", "context"))
    rng = np.random.default_rng(5)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                  for shape in ((b, t, 2, 2, e), (b, t, 2, e), (b, t, 2, e), (b, t, 2, 2, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]
    back = np.argsort(order)
    ring = lambda q, k, v: context.CONTEXT_STRATEGIES[strategy](  # noqa: E731
        shuffle(q), shuffle(k), shuffle(v), Ids(*map(shuffle, q_ids)), Ids(*map(shuffle, k_ids)), window,
        mesh=mesh, block=4)[:, back]  # fmt: skip
    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window)  # noqa: E731
    assert_like_einsum(ring, ref, (q, k, v), real, w)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_rebalance_moves_each_piece_to_its_device_and_back(n):
    """``rebalance`` on a row split over the context axis equals NumPy's indexing by ``balanced_order`` (floats,
    and typed keys: the dropout keys travel with their tokens); its inverse restores the row; each device ends with
    pieces i and 2n-1-i."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8 // n, n), ("data", "context"))
    t = 2 * n * 3
    x = np.arange(2 * t * 3, dtype=np.float32).reshape(2, t, 3)
    order = context.balanced_order(t, n)
    pieces = np.arange(t).reshape(2 * n, 3)
    assert order.reshape(n, 6).tolist() == [[*pieces[i], *pieces[2 * n - 1 - i]] for i in range(n)]
    moved = jax.jit(lambda x: context.rebalance(x, mesh))(x)
    np.testing.assert_array_equal(moved, x[:, order])
    np.testing.assert_array_equal(jax.jit(lambda y: context.rebalance(y, mesh, inverse=True))(moved), x)
    keys = jax.random.split(jax.random.key(0), 2 * t).reshape(2, t)
    got = jax.jit(lambda k: context.rebalance(k, mesh))(keys)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(keys)[:, order])
    logits = np.arange(3 * 2 * t, dtype=np.float32).reshape(3, 2, t)  # a router's [L, B, T]: tokens on axis 2
    np.testing.assert_array_equal(jax.jit(lambda y: context.rebalance(y, mesh, dim=2))(logits), logits[:, :, order])


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_balanced_order_evens_the_ring_rounds(n):
    """One causal sequence of 2n pieces of m = 3 blocks, on the two-way ring (round r: the chunks of devices d - r
    and d + r, one chunk when 2r = n). In contiguous chunks (2m blocks a device) a chunk before device d's costs it
    all (2m)^2 block pairs, one after it none, its own 2m(2m+1)/2; the busiest device does 8m^2 a round (4m^2 in a
    round of one chunk). In the balanced order every other chunk costs every device 2m^2 (its late piece sees the
    chunk's early piece; its early piece sees the chunk's early piece when that comes first, else its late piece
    sees the chunk's late piece too), its own m(m+1)/2 + m^2 + m(m+1)/2: half as much a round."""
    m, blk = 3, 8
    t = 2 * n * m * blk
    row = lambda slot: Ids(jnp.asarray(slot, jnp.int32), jnp.ones(t, bool), jnp.ones(t, jnp.int32))  # noqa: E731
    contiguous = context.ring_blocks(row(np.arange(t)), n, blk)
    balanced = context.ring_blocks(row(context.balanced_order(t, n)), n, blk)
    for d in range(n):
        assert contiguous[d, 0] == 2 * m * (2 * m + 1) // 2 and balanced[d, 0] == m * (m + 1) + m * m
        for r in range(1, n // 2 + 1):
            chunks = [(d - r) % n] + ([(d + r) % n] if 2 * r != n else [])
            assert contiguous[d, r] == sum(4 * m * m for c in chunks if c < d), (d, r)
            assert balanced[d, r] == 2 * m * m * len(chunks), (d, r)
    assert contiguous.sum() == balanced.sum()  # the same work, spread evenly
    busiest = [8 * m * m if 2 * r != n else 4 * m * m for r in range(1, n // 2 + 1)]
    assert contiguous.max(axis=0)[1:].tolist() == busiest
    assert balanced.max(axis=0)[1:].tolist() == [b // 2 for b in busiest]


def _rounds_for(ids, n, window=None, block=8):
    """``context.ring_rounds`` on a row (repeated for a batch of 2) split over a context axis of n."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("context",))
    rows = Ids(*(None if x is None else jnp.stack([x, x]) for x in ids))
    fn = jax.shard_map(lambda q: context.ring_rounds(q, q, window, "context", n, block)[None], mesh=mesh,
                       in_specs=P(None, "context"), out_specs=P("context"), axis_names=frozenset({"context"}),
                       check_vma=False)  # fmt: skip
    out = jax.jit(fn)(rows)
    assert len(set(out.tolist())) == 1  # the same count on every device
    return int(out[0])


def test_the_two_way_ring_stops_after_the_rounds_the_ids_need():
    """Rows of 16 pieces of 8 tokens in balanced order over 8 devices (device i: pieces i and 15 - i). One causal
    sequence needs every chunk: 4 rounds (n / 2). A window of 8 needs only the piece before each: devices i - 1
    (before piece i) and i + 1 (before piece 15 - i): 1 round. Segments of 16 tokens (pieces 2j and 2j + 1): the
    odd pieces need the piece before them, one device away either way: 1 round. Segments of one piece: none."""
    n, t = 8, 128
    order = context.balanced_order(t, n)
    piece = order // 8
    valid = jnp.ones(t, bool)
    causal = Ids(jnp.asarray(order), valid, jnp.ones(t, jnp.int32))
    assert _rounds_for(causal, n) == 4
    assert _rounds_for(causal._replace(position=jnp.asarray(order)), n, window=jnp.int32(8)) == 1
    assert _rounds_for(Ids(jnp.asarray(order), valid, jnp.asarray(piece // 2 + 1)), n) == 1
    assert _rounds_for(Ids(jnp.asarray(order), valid, jnp.asarray(piece + 1)), n) == 0


@pytest.mark.parametrize("strategy", ["ring", "gather"])
def test_ring_attention_splits_the_rows_over_the_context_axis(strategy):
    """Each device holds 1/n of every row: the output keeps the inputs' split, and the compiled program passes the
    key/value chunks between devices (collective-permute) instead of gathering the row (what it gathers is the
    blocks' int32 summaries the ring's round count is read from) — or, by the all-gather strategy, gathers the keys
    and values and, in the backward, reduce-scatters their gradients."""
    q_ids, k_ids = layout_ids("shared", t=64)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("context",))
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 64, 2, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 64, 2, 8)), jnp.float32) for _ in range(2))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    fn = jax.jit(lambda q, k, v: context.CONTEXT_STRATEGIES[strategy](q, k, v, q_ids, k_ids, None, mesh=mesh,
                                                                         block=4))  # fmt: skip
    out = fn(q, k, v)
    assert out.sharding.spec[1] == "context"
    hlo = fn.lower(q, k, v).compile().as_text()
    gathered = re.findall(r"= (\w+)\[[\d,]*\][^ ]* all-gather", hlo)
    if strategy == "ring":
        assert "collective-permute" in hlo and gathered and set(gathered) == {"s32"}
    else:
        grad = jax.jit(jax.grad(lambda k: jnp.sum(fn(q, k, v) ** 2))).lower(k).compile().as_text()
        assert "all-gather" in hlo and "collective-permute" not in hlo and "reduce-scatter" in grad


def test_a_traced_window_as_gemma_3s_per_layer_windows_are():
    """The window may be a traced value (Gemma 3's layer scan carries each layer's): the same result as a constant."""
    q_ids, k_ids = layout_ids("shared", t=44)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "context"))
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 44, 2, 1, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 44, 2, 8)), jnp.float32) for _ in range(2))
    ring = lambda q, w: context.ring_attention(q, k, v, q_ids, k_ids, w, mesh=mesh, block=4)  # noqa: E731
    real = q_ids.valid[:, :, None, None, None]
    traced = jax.jit(jax.grad(lambda q, w: jnp.sum(ring(q, w) ** 2)))(q, jnp.int32(6))
    ref = lambda q: jnp.where(real, attention.einsum_attention(q, k, v, q_ids, k_ids, 6), 0)  # noqa: E731
    fixed = jax.grad(lambda q: jnp.sum(ref(q) ** 2))(q)
    np.testing.assert_allclose(jnp.where(real, traced, 0), fixed, rtol=1e-5, atol=1e-5 * np.abs(fixed).max())


def test_the_context_cost_counts_each_send_as_often_as_its_loops_run_it():
    """``experiments/context_cost.py`` reads what a step sends from the compiled program: a chunk of [4, 8] float32
    (128 bytes a device) passed round a context axis of 4 five times (a scan), the whole done three times (an outer
    scan), is 15 x 128 bytes a device; a chunk twice as wide twice that."""
    from jax.sharding import PartitionSpec as P

    from dpo_jax.infra import sharding
    from experiments.context_cost import collective_bytes

    mesh = sharding.make_mesh(data=2, context=4)
    perm = [(i, (i + 1) % 4) for i in range(4)]

    def local(x):
        inner = lambda c, _: (jax.lax.ppermute(c, "context", perm) * 1.5, None)  # noqa: E731
        outer = lambda c, _: (jax.lax.scan(inner, c, None, length=5)[0] + 1.0, None)  # noqa: E731
        return jax.lax.scan(outer, x, None, length=3)[0]

    program = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"),
                                    axis_names=frozenset({"context"})))  # fmt: skip
    for columns, chunk in ((32, 128), (64, 256)):  # [4, 8] and [4, 16] float32 a device
        compiled = program.lower(jnp.ones((4, columns), jnp.float32)).compile()
        assert collective_bytes(compiled.as_text()) == {"collective-permute": 15 * chunk}

    # a loop of traced length (the ring's rounds) counts as ``unknown_trips``; a conditional as its costliest branch
    def rounds(x, r):
        x = jax.lax.fori_loop(0, r[0], lambda _, c: jax.lax.ppermute(c, "context", perm) * 1.5, x)
        return jax.lax.cond(r[0] > 1, lambda c: jax.lax.ppermute(c, "context", perm), lambda c: c * 2.0, x)

    program = jax.jit(jax.shard_map(rounds, mesh=mesh, in_specs=(P(None, "context"), P()),
                                    out_specs=P(None, "context"), axis_names=frozenset({"context"})))  # fmt: skip
    hlo = program.lower(jnp.ones((4, 32), jnp.float32), jnp.ones(1, jnp.int32)).compile().as_text()
    assert collective_bytes(hlo, unknown_trips=3) == {"collective-permute": (3 + 1) * 128}


@pytest.mark.slow
def test_the_context_cost_script_reports_sends_only_over_a_split_row(capsys):
    """``python experiments/context_cost.py`` end to end at a tiny shape: no ring sends on one device, sends on two;
    each device's attention FLOPs halve; the steps run."""
    from experiments import context_cost

    rows = context_cost.main(["--model", "tiny", "--row", "64", "--contexts", "1,2", "--time", "--steps", "1"])
    assert [r["context"] for r in rows] == [1, 2]
    assert rows[0]["ring_mb"] == 0 < rows[1]["ring_mb"]
    assert rows[1]["attn_gflop"] == pytest.approx(rows[0]["attn_gflop"] / 2)
    assert all(r["step_ms"] > 0 for r in rows)
    assert "| 2 |" in capsys.readouterr().out
    # the all-gather strategy's bfloat16 step compiles and runs (its gradients' reduce-scatter in float32): fewer
    # permutes (the balanced order's only), more of the other collectives (the keys' gathers, their gradients')
    gather = context_cost.main(["--model", "tiny", "--row", "64", "--contexts", "2", "--strategy", "gather", "--time",
                                "--steps", "1"])[0]  # fmt: skip
    assert 0 < gather["ring_mb"] < rows[1]["ring_mb"] and gather["param_mb"] > rows[1]["param_mb"]
    assert gather["step_ms"] > 0
