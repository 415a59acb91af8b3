"""The loop's own machinery, without a model: hook cadences, one compile per batch shape, steps shared across runs
(``dpo_jax.training.loop``). Hooks run in a real run: tests/test_hooks.py; resume: test_distributed, test_bema."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.training.loop import Hook, StepCache, StepProgram


@pytest.mark.parametrize("every,last,due", [(5, 12, [5, 10, 12]), (1, 3, [1, 2, 3]), (4, 8, [4, 8]), (100, 7, [7])])
def test_a_hook_is_due_every_n_steps_and_after_the_last(every, last, due):
    hook = Hook(lambda loop, step: None, every)
    assert [s for s in range(1, last + 1) if hook.due(s, last)] == due


@flax.struct.dataclass
class FakeBatch:  # the two fields a step program reads for its shape
    tokens_GxKxT: jax.Array
    score_src_ZxS: jax.Array


def _batch(rows, t, s):
    return FakeBatch(jnp.ones((rows, 1, t), jnp.int32), jnp.zeros((rows, s), jnp.int32))


@flax.struct.dataclass
class FakeState:
    x: jax.Array
    hparams: jax.Array


def test_a_step_program_compiles_once_per_batch_shape_and_reports_each_compile():
    def step(state, batch, frozen):
        return state.replace(x=state.x + jnp.sum(batch.tokens_GxKxT)), {"n": jnp.sum(batch.score_src_ZxS)}

    program = StepProgram(jax.jit(step))
    state = FakeState(jnp.float32(0.0), jnp.zeros(2))
    shapes = [(2, 8, 4), (2, 8, 4), (2, 16, 4), (2, 8, 4), (2, 16, 6)]
    for rows, t, s in shapes:
        state, _ = program(state, _batch(rows, t, s), None)
    new = program.take_new()
    assert [(shape, row) for shape, _, row in new] == [("2x1x8, S=4", 8), ("2x1x16, S=4", 16), ("2x1x16, S=6", 16)]
    assert program.take_new() == [] and len(program.compiled) == 3
    assert float(state.x) == sum(r * t for r, t, _ in shapes)  # every call ran, compiled or not
    program(state.replace(hparams=jnp.zeros(3)), _batch(2, 8, 4), None)  # a population of another size: its own
    assert len(program.compiled) == 4


def test_a_step_cache_makes_each_program_once_for_every_run_that_asks():
    cache, made = StepCache(), []

    def make():
        made.append(1)
        return StepProgram(jax.jit(lambda s, b, f: (s, {})))

    first, again, other = cache.get("dpo", make), cache.get("dpo", make), cache.get("sft", make)
    assert first is again and first is not other and len(made) == 2
    np.testing.assert_array_equal(len(cache.programs), 2)


def test_a_members_view_reads_the_population_in_place_on_every_device():
    """``sharding.member_view``: member k of a [K, ...] population, its values and member k's sharding, and (on a
    CPU) the very buffers of the population (member 0 starts where the population does: no copy); a member axis
    split over devices gets None (each device holds some members only)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dpo_jax.infra import sharding

    mesh = sharding.make_mesh(data=1, fsdp=4, devices=jax.devices()[:4])
    values = np.arange(3 * 8 * 6, dtype=np.float32).reshape(3, 8, 6)
    split = jax.device_put(values, NamedSharding(mesh, P(None, "fsdp")))  # 3 members, rows over 4 devices
    whole = jax.device_put(values[:, 0], NamedSharding(mesh, P()))  # replicated
    member_sh = (NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P()))
    for k in range(3):
        got = sharding.member_view((split, whole), k, member_sh)
        np.testing.assert_array_equal(np.asarray(got[0]), values[k])
        np.testing.assert_array_equal(np.asarray(got[1]), values[k, 0])
        assert got[0].sharding == member_sh[0] and got[1].sharding == member_sh[1]
    view = sharding.member_view((split, whole), 0, member_sh)
    pointers = lambda x: sorted(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)  # noqa: E731
    assert pointers(view[0]) == pointers(split) and pointers(view[1]) == pointers(whole)
    two = sharding.make_mesh(data=1, fsdp=1, member=2, devices=jax.devices()[:2])
    spread = jax.device_put(values[:2], NamedSharding(two, P("member")))
    assert sharding.member_view((spread,), 0, (NamedSharding(mesh, P()),)) is None
