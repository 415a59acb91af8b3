"""Batch layouts: packed rows and the shared prompt give the padded layout's per-pair log-probs and gradients.

The oracle for the values is ``transformers`` (each prompt + completion scored alone, in torch); gradients of
every layout are compared with the padded, one-sequence-per-row layout, whose head scores every slot.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dpo_jax.core import scoring
from dpo_jax.data import DataError, Layout, PreferenceLoader, TokenizedPair, packing
from dpo_jax.data import pad_batches as packing_pad
from dpo_jax.infra import hf

BASELINE = Layout("padded", share_prompt=False, buckets=(64,), scored_only=False)
LAYOUTS = {
    "padded": Layout("padded", share_prompt=False, buckets=(64,)),
    "padded_shared": Layout("padded", share_prompt=True, buckets=(64,)),
    "packed": Layout(share_prompt=False),
    "packed_shared": Layout(share_prompt=True),
    "packed_shared_short_rows": Layout(share_prompt=True, row_length=30),
    "packed_shared_two_shapes": Layout(share_prompt=True, row_length=30, max_shapes=2),
}


def make_pairs(n, vocab=97, seed=0, empty_prompt=True):
    """Pairs of varied lengths (up to 24 tokens), one with an empty prompt and one with an empty completion."""
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).astype(np.int32)

    pairs = [TokenizedPair(ids(1, 9), ids(1, 12), ids(1, 12), 1.0, 1.0) for _ in range(n)]
    if empty_prompt:
        pairs[1] = dataclasses.replace(pairs[1], prompt=np.zeros(0, np.int32))
    pairs[2] = dataclasses.replace(pairs[2], rejected=np.zeros(0, np.int32))
    return pairs


def torch_pair_logps(model, pairs):
    """[N, 2] summed completion log-probs, each prompt + completion run alone through transformers."""
    out = np.zeros((len(pairs), 2))
    for i, p in enumerate(pairs):
        for j, comp in enumerate((p.chosen, p.rejected)):
            seq = np.concatenate([p.prompt, comp])
            if len(seq) < 2 or len(comp) == 0:
                continue
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(seq[None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            first = max(len(p.prompt), 1)
            out[i, j] = sum(logp[t - 1, seq[t]] for t in range(first, len(seq)))
    return out


def layout_logps(graphdef, params, pairs, layout, batch_size, dropout_key=None, grads=True):
    """[N, 2] log-probs, and the gradient of a fixed random combination of them (None when not ``grads``): one
    program for the whole epoch's batches, the values and the gradient together."""
    loader = PreferenceLoader(pairs, batch_size, shuffle=False, drop_last=False, layout=layout)
    coeffs = np.random.default_rng(1).normal(size=(len(pairs), 2))
    batches = [jax.tree.map(jnp.asarray, b) for _, b in loader.epoch(0)]

    def combination(params):
        total, logps_B = 0.0, []
        for b in batches:
            logps = scoring.pair_logps(graphdef, params, b, dropout_key=dropout_key)[0]
            index = b.index_GxP.reshape(-1)
            c = jnp.asarray(coeffs)[jnp.maximum(index, 0)] * (index >= 0)[:, None]
            total, logps_B = total + jnp.sum(logps * c), [*logps_B, logps]
        return total, logps_B

    if grads:
        (_, logps_B), grad = jax.jit(jax.value_and_grad(combination, has_aux=True))(params)
    else:
        (_, logps_B), grad = jax.jit(combination)(params), None
    out = np.zeros((len(pairs), 2))
    for b, logps in zip(batches, logps_B, strict=True):
        index = np.asarray(b.index_GxP).reshape(-1)
        out[index[index >= 0]] = np.asarray(logps)[index >= 0]
    return out, grad


def assert_grads_close(grads, expected):
    """Leaf by leaf, float32 rounding: 1e-4 relative, and 1e-5 of the leaf's largest entry absolute. An entry summed
    over many tokens in another order (an embedding row: 3e-5 apart at 0.15 in a leaf whose largest entry is 28, on
    an AVX2 host) differs by that much; a wrong mask or position differs by orders of magnitude more."""
    for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its saved folder) for every family."""
    from conftest import HF_CASES, make_hf_model

    out = {}
    for name in HF_CASES:
        # Phi-3's longrope picks one factor set per batch (its furthest position, as transformers does for a batch):
        # an original context past every pair here keeps one set whether each sequence runs alone or packed
        extra = dict(original_max_position_embeddings=64) if name == "phi3" else {}
        model = make_hf_model(name, scale=0.1, **extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    """name -> (transformers model, our graphdef, our params)."""
    return {name: (model, *nnx.split(hf.load_pretrained(path)[0])) for name, (model, path) in checkpoints.items()}


@pytest.fixture(scope="module")
def blockwise_graphdefs(checkpoints):
    """name -> the graphdef of the same checkpoint through the blockwise kernel with 8-token blocks (the params are
    the same): every row here is many blocks long."""
    return {
        name: nnx.split(hf.load_pretrained(path, attention="blockwise", attention_block=8)[0])[0]
        for name, (_, path) in checkpoints.items()
    }


@pytest.mark.slow
def test_lora_dropout_masks_do_not_depend_on_the_layout(models):
    """A token's LoRA dropout masks come from (its pair's dataset row, branch, position): the packed layouts (a
    prompt per completion or one per pair) at other batch sizes give the padded layout's per-pair log-probs (and
    gradients, packed shared) under the same step key (the shared prompt's one copy is dropped as both copies of
    the unshared layouts), though dropout changes them."""
    from dpo_jax.models import lora
    from dpo_jax.models.config import LORA_TARGETS

    _, graphdef, params = models["mistral_window"]
    model = lora.attach(nnx.merge(graphdef, params), rank=4, alpha=8.0, target_names=LORA_TARGETS, dropout=0.5)
    graphdef, params = nnx.split(model)
    adapters, base_params = lora.split(params)
    adapters = jax.tree.map(lambda x: x + 0.2 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), adapters)  # B != 0
    params = lora.compose(adapters, base_params)
    pairs, key = make_pairs(10), jax.random.key(7)
    base, base_grad = layout_logps(graphdef, params, pairs, BASELINE, 10, dropout_key=key)
    plain, _ = layout_logps(graphdef, params, pairs, BASELINE, 10, grads=False)
    assert np.abs(base - plain).max() > 1e-2  # dropout acts
    for layout, batch_size in [(LAYOUTS["packed"], 4), (LAYOUTS["packed_shared"], 3)]:
        shared = layout.share_prompt  # the gradient of the last only
        got, grad = layout_logps(graphdef, params, pairs, layout, batch_size, dropout_key=key, grads=shared)
        np.testing.assert_allclose(got, base, rtol=1e-5, atol=2e-5)
    # gradients: the layout furthest from the baseline (packed rows of several pairs, one prompt copy)
    assert_grads_close(grad, base_grad)


# Every layout for the Llama lineage; the default layout (packed rows, the prompt shared by both completions) for
# the other families, whose differences are inside the layer (norms, soft-caps, per-layer windows and RoPE,
# experts), not in the layout
FAMILY_LAYOUTS = ("packed_shared",)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "llama_bias_tied", "mistral_window", "qwen2", "qwen3", "gemma3", "olmo2",
                                  "phi3", "qwen3_moe", "mixtral"])  # fmt: skip
def test_layouts_equal_transformers_and_each_other(models, blockwise_graphdefs, name):
    torch_model, graphdef, params = models[name]
    pairs = make_pairs(10)
    expected = torch_pair_logps(torch_model, pairs)
    base, base_grads = layout_logps(graphdef, params, pairs, BASELINE, 10)
    np.testing.assert_allclose(base, expected, rtol=1e-5, atol=1e-4)
    family = name not in ("llama3", "llama_bias_tied", "mistral_window", "qwen2")
    for key, layout in LAYOUTS.items():
        if family and key not in FAMILY_LAYOUTS:
            continue
        got, grad = layout_logps(graphdef, params, pairs, layout, 10)
        np.testing.assert_allclose(got, base, rtol=1e-5, atol=2e-5)
        assert_grads_close(grad, base_grads)
    # Rows many attention blocks long (the default layout, 8-token blocks): what training, the reference pass and
    # eval compute. Gemma 3's per-layer windows are traced values of the layer scan (once an UnexpectedTracerError).
    got, grad = layout_logps(blockwise_graphdefs[name], params, pairs, LAYOUTS["packed_shared"], 10)
    np.testing.assert_allclose(got, base, rtol=1e-5, atol=2e-5)
    assert_grads_close(grad, base_grads)


def test_shared_rows_window_uses_positions(models):
    """Mistral's window (4) is smaller than every pair: a rejected token near the prompt's end must see the last
    prompt tokens (by position), and a slot-based window would get it wrong."""
    torch_model, graphdef, params = models["mistral_window"]
    pairs = [TokenizedPair(np.arange(3, 9, dtype=np.int32), np.arange(20, 28, dtype=np.int32),
                           np.arange(40, 43, dtype=np.int32), 1.0, 1.0)]  # fmt: skip
    got, _ = layout_logps(graphdef, params, pairs, Layout(share_prompt=True), 1, grads=False)
    np.testing.assert_allclose(got, torch_pair_logps(torch_model, pairs), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_chunked_head_equals_materialised_logits(models):
    _, graphdef, params = models["llama3"]
    pairs = make_pairs(6)
    loader = PreferenceLoader(pairs, 6, shuffle=False, layout=Layout())
    batch = jax.tree.map(jnp.asarray, loader.batch(0))

    def f(p, mb):
        return jnp.sum(scoring.pair_logps(graphdef, p, batch, max_logits_mb=mb, token_chunk=8, vocab_chunk=16)[0])

    direct, chunked = jax.value_and_grad(f)(params, 1e9), jax.value_and_grad(f)(params, 0.0)
    np.testing.assert_allclose(direct[0], chunked[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(direct[1]), jax.tree.leaves(chunked[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- Packing plans ---------------------------------------------------------------------------------------------


def test_one_pair_per_row_and_many_pairs_per_row():
    pairs = make_pairs(16, empty_prompt=False)
    units = [packing.unit_length(p, Layout()) for p in pairs]
    one = PreferenceLoader(pairs, 16, shuffle=False, layout=Layout(row_length=max(units)))
    many = PreferenceLoader(pairs, 16, shuffle=False, layout=Layout(row_length=8 * max(units)))
    b1, bm = one.batch(0), many.batch(0)
    assert b1.valid_GxP.sum() == bm.valid_GxP.sum() == 16
    assert b1.valid_GxP.sum(1).max() <= 2  # the longest pairs sit alone
    assert bm.valid_GxP.sum(1).max() >= 6
    for b, row in ((b1, max(units)), (bm, 8 * max(units))):
        assert b.tokens_GxKxT.shape[-1] == row
        # every row holds whole pairs, within its length; segments are contiguous
        assert ((b.segment_ids_GxKxT > 0).sum(-1) <= row).all()
        real = (b.segment_ids_GxKxT > 0).sum()
        assert real == sum(units)


def test_pair_longer_than_a_row_is_a_clear_error():
    pairs = make_pairs(4, empty_prompt=False)
    longest = max(packing.unit_length(p, Layout()) for p in pairs)
    with pytest.raises(DataError, match=f"pair of {longest} tokens does not fit .*data.pack_length={longest - 1}"):
        PreferenceLoader(pairs, 4, layout=Layout(row_length=longest - 1))


def test_auto_row_length_fits_the_longest_and_rows_are_a_multiple_of_devices():
    pairs = make_pairs(64, seed=3)
    loader = PreferenceLoader(pairs, 32, layout=Layout(row_multiple=8))
    assert loader.row_length >= max(packing.unit_length(p, Layout()) for p in pairs)
    for step in range(4):
        b = loader.batch(step)
        assert b.tokens_GxKxT.shape[0] % 8 == 0 and b.valid_GxP.sum() == 32


def test_auto_row_length_weighs_attention():
    """32 units of 100 tokens, 32 per batch: rows of 104 hold one (32 x 104 = 3328 slots), rows of 200 two
    (16 x 200 = 3200, 4% fewer: chosen without attention cost); with attention at 0.01 per (query, key) slot,
    32 x 104 x 2.04 = 6789 < 16 x 200 x 3 = 9600, and longer rows cost more still."""
    units = np.full(32, 100)
    assert packing.auto_row_length(units, 32, 1) == 200
    assert packing.auto_row_length(units, 32, 1, attention_cost=0.01) == 104


def test_shared_row_masks_and_positions():
    """prompt | chosen | rejected: rejected positions restart at the prompt's end; the first rejected token is
    predicted by the last prompt slot."""
    p = TokenizedPair(np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32), np.array([10, 11, 12], np.int32), 1, 1)
    b = PreferenceLoader([p], 1, layout=Layout(row_length=8)).batch(0)
    assert b.tokens_GxKxT[0, 0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b.positions_GxKxT[0, 0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b.branch_GxKxT[0, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    n = int(b.score_mask_ZxS.sum())
    assert b.score_src_ZxS[0, :n].tolist() == [2, 3, 2, 5, 6]
    assert b.score_target_ZxS[0, :n].tolist() == [8, 9, 10, 11, 12]
    assert b.score_seq_ZxS[0, :n].tolist() == [0, 0, 1, 1, 1]


def test_round_up_grid():
    assert [packing.round_up(n) for n in (1, 3, 4, 5, 9, 17, 100)] == [1, 3, 4, 5, 10, 20, 112]
    assert packing.round_up(9, 8) == 16 and packing.round_up(33, 8) == 40


def test_shape_templates_minimise_the_padded_cost():
    """Nested templates over the steps ordered by cost; the cuts found equal a brute-force search."""
    import itertools

    rng = np.random.default_rng(0)
    needs = [tuple(int(x) for x in rng.integers(1, 9, size=3)) for _ in range(12)]
    weights = (3.0, 1.0, 0.5)
    cost = lambda n: float(np.dot(weights, n))  # noqa: E731
    ordered = sorted(needs, key=cost)

    def padded_cost(templates):  # every step takes the first template that holds it
        return sum(cost(next(t for t in templates if all(a >= b for a, b in zip(t, n, strict=True)))) for n in needs)

    def nested(ends):
        return [tuple(int(v) for v in np.max(ordered[: e + 1], axis=0)) for e in ends]

    for count in (1, 2, 3):
        got = packing.shape_templates(needs, count, weights)
        assert len(got) <= count and got[-1] == tuple(int(v) for v in np.max(needs, axis=0))
        assert all(all(a <= b for a, b in zip(s, t, strict=True)) for s, t in itertools.pairwise(got))
        best = min(padded_cost(nested([*ends, len(needs) - 1]))
                   for ends in itertools.combinations(range(len(needs) - 1), count - 1))  # fmt: skip
        assert padded_cost(got) <= best + 1e-9


def test_a_loader_with_few_shapes_holds_the_same_pairs():
    """Pairs of varied lengths take dozens of grid-rounded shapes; max_shapes=3 takes at most 3, each batch holding
    exactly the grid batch's pairs and scored tokens."""
    rng = np.random.default_rng(1)
    ids = lambda m: np.ones(min(int(rng.lognormal(m, 0.8)) + 1, 50), np.int32)  # noqa: E731
    pairs = [TokenizedPair(ids(3.0), ids(3.5), ids(3.5), 1.0, 1.0) for _ in range(600)]
    grid = PreferenceLoader(pairs, 8, layout=Layout(row_length=160, row_multiple=2))
    few = PreferenceLoader(pairs, 8, layout=Layout(row_length=160, row_multiple=2, max_shapes=3))
    shapes = {"grid": set(), "few": set()}
    for step in range(60):
        a, b = grid.batch(step), few.batch(step)
        for name, batch in (("grid", a), ("few", b)):
            shapes[name].add((batch.tokens_GxKxT.shape, batch.score_src_ZxS.shape, batch.valid_GxP.shape))
        assert sorted(a.index_GxP[a.index_GxP >= 0]) == sorted(b.index_GxP[b.index_GxP >= 0])
        assert a.score_mask_ZxS.sum() == b.score_mask_ZxS.sum() and (a.segment_ids_GxKxT > 0).sum() == (
            b.segment_ids_GxKxT > 0).sum()  # fmt: skip
    assert len(shapes["few"]) <= 3 < len(shapes["grid"])


def test_padded_member_batches_score_the_same(models):
    """Vectorised members' batches (different seeds: different packings) padded to common sizes per block."""
    _, graphdef, params = models["qwen2"]
    pairs = make_pairs(24, seed=5)
    batches = [PreferenceLoader(pairs, 8, seed=s, layout=Layout(row_multiple=2)).batch(0) for s in (0, 1, 2)]
    score = jax.jit(lambda b: scoring.pair_logps(graphdef, params, b)[0])
    for before, after in zip(batches, packing_pad(batches), strict=True):
        index = before.index_GxP.reshape(-1)
        expected = np.asarray(score(before))[index >= 0]
        got_index = after.index_GxP.reshape(-1)
        got = np.asarray(score(after))
        order = {int(i): n for n, i in enumerate(got_index) if i >= 0}
        np.testing.assert_allclose(got[[order[int(i)] for i in index[index >= 0]]], expected, rtol=1e-6)
    assert len({tuple(b.tokens_GxKxT.shape) for b in batches}) > 1 or len({b.score_src_ZxS.shape for b in batches}) > 1


# the mesh beside the context axis: FSDP (the parameters over fsdp x context), data, the experts over their axis
CONTEXT_MESHES = {"llama3": dict(fsdp=2), "gemma3": dict(data=2), "qwen3_moe": dict(expert=2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONTEXT_MESHES))
def test_rows_split_over_a_context_axis_give_the_one_device_logps_and_gradients(
    models, checkpoints, blockwise_graphdefs, name
):
    """Context parallelism (``mesh.context``): under a mesh of 8 devices with a context axis of 4 the decoder attends
    each row by the ring, each device holding a quarter of the row's tokens (rows of several 8-token blocks), beside
    FSDP (Llama: the parameters split over fsdp x context, as the run places them), data (Gemma 3) or the expert
    axis (Qwen3-MoE: half the experts a device). Per-pair log-probs and their gradients equal the unsplit blockwise
    kernel's, for padded, packed and shared-prompt rows (Llama with LoRA adapters and their dropout), with Gemma 3's
    per-layer windows and soft-caps and Qwen3-MoE's experts."""
    from dpo_jax.infra import sharding
    from dpo_jax.models import lora
    from dpo_jax.models.config import LORA_TARGETS

    _, _, params = models[name]
    graphdef = blockwise_graphdefs[name]
    pairs, key = make_pairs(10), None
    if name == "llama3":  # LoRA under the axis: adapters (B != 0) with dropout, whose per-token masks each device
        # draws for its share of the row (from the pair's row, branch and position), on the base as the run splits it
        model = lora.attach(nnx.merge(graphdef, params), rank=4, alpha=8.0, target_names=LORA_TARGETS, dropout=0.5)
        graphdef, params = nnx.split(model)
        adapters, base = lora.split(params)
        params = lora.compose(jax.tree.map(lambda x: x + 0.2 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                           adapters), base)  # fmt: skip
        key = jax.random.key(7)
    mesh = sharding.make_mesh(**{"data": 1, **CONTEXT_MESHES[name]}, context=4)
    placed = jax.device_put(params, sharding.param_shardings(params, mesh))
    split = {"llama3": ("fsdp", "up_proj", "kernel"), "qwen3_moe": ("expert", "gate_proj")}.get(name)
    if split:  # the parameters really are split as the run splits them
        leaf = placed["layers"]["mlp"]
        for part in split[1:]:
            leaf = leaf[part]
        spec = leaf[...].sharding.spec
        assert any(split[0] in (a if isinstance(a, tuple) else (a,)) for a in spec if a), spec
    # every layout on Llama; the default layout on the families whose windows and experts the ring must carry
    # (the layouts' masks are the kernel's, each tested on the ring in tests/test_ring.py)
    for layout in ("padded", "packed", "packed_shared") if name == "llama3" else ("packed_shared",):
        want, want_grads = layout_logps(graphdef, params, pairs, LAYOUTS[layout], 10, dropout_key=key)
        # Gemma 3 also by the all-gather strategy (model.context_attention="gather")
        for strategy in ("ring", "gather") if name == "gemma3" else ("ring",):
            split_graphdef = (
                graphdef
                if strategy == "ring"
                else nnx.split(
                    hf.load_pretrained(
                        checkpoints[name][1], attention="blockwise", attention_block=8, context_attention=strategy
                    )[0]
                )[0]
            )
            with jax.set_mesh(mesh):
                got, grads = layout_logps(split_graphdef, placed, pairs, LAYOUTS[layout], 10, dropout_key=key)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{layout} {strategy}")
            assert_grads_close(grads, want_grads)
