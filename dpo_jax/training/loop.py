"""The one training loop, for a population of K >= 1 members, that knows nothing of the algorithm.

A ``Stage`` hands it a pure per-member step (``dpo_jax.core.step.train_step`` with its static parts bound), the
members (hyper-parameters, data, checkpoints, writers) and its periodic work as ``Hook``s with a cadence: logging,
eval, checkpointing, the finite check, pre-emption and any diagnostics (levanter's ``add_hook(fn, every=n)``,
nanodo's periodic actions). The loop owns the population's state: it makes it (``jax.vmap`` over members, split
over the mesh's ``member`` axis) or restores it from the members' checkpoints, jits the step once per batch shape
through a ``StepCache`` (an object a caller may keep across runs: a sequential sweep compiles once), feeds the
batches and calls the hooks.

Resume order: the newest checkpoint step every member holds intact (``checkpoint.restore_common``); the data
loader restarts at that step (batches are a pure function of it); this stage's log rows after it are forgotten
(``Writer.rewind``), and an eval that was interrupted (or step 0's, when no checkpoint followed it) is redone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from dpo_jax.core.state import gather_members, member, stack
from dpo_jax.data import PreferenceLoader, pad_batches, to_global
from dpo_jax.data.loader import stack as stack_batches
from dpo_jax.data.packing import batch_stats
from dpo_jax.errors import NonFiniteLoss
from dpo_jax.infra import checkpoint, sharding, signals, xla_flags
from dpo_jax.infra.logging import ConsoleWriter, Writer
from dpo_jax.infra.signals import Preempted


@dataclasses.dataclass
class Member:
    """One member of a population: its hyper-parameters, data order, checkpoints and log."""

    hparams: Any  # dpo_jax.core.state.HParams of this member
    seed: int  # data order and the train state's rng
    loader: PreferenceLoader
    ckpt: checkpoint.Checkpointer
    writer: Writer
    warnings: list = dataclasses.field(default_factory=list)  # what diagnostics found (into the run's summary)
    failed_step: int | None = None  # the step its loss, gradient or parameters became NaN/Inf (frozen since)


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(loop, step)`` after every ``every``-th step of a stage and after its last; ``at_start``: also before the
    first step of a stage that starts at step 0 (or resumes with a pending one); ``paused``: its time is not
    training time (the throughput figures leave it out). Hooks from outside the package go to
    ``dpo_jax.training.train.train(..., hooks=[...])`` (docs/hooks.md)."""

    fn: Callable[[Loop, int], None]
    every: int = 1
    at_start: bool = False
    paused: bool = False
    resume: Callable[[int], None] | None = None  # told the step a run resumes from (to forget what came after)
    name: str = ""  # how the run names it ("pbt": the population's exploit-and-explore)
    summary: Callable[[Member], dict] | None = None  # entries it adds to each member's summary.json at the end

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last


KEPT_BYTES = 1 << 30  # free heap kept between steps, at least (xla_flags.release_memory)
SYNC_SAVE_BYTES = 256 << 20  # a CPU run's state past this is saved one member at a time, each before the next step


class StepProgram:
    """A population's jitted step, compiled ahead of time once per batch shape; remembers each compile."""

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, {}
        self.pending: list[tuple[str, float, int]] = []  # (batch shape, seconds, row length) since ``take_new``

    def __call__(self, state, batch, frozen):
        key = (jax.tree.structure(batch), *(x.shape for x in jax.tree.leaves(batch)))
        key += tuple(x.shape for x in jax.tree.leaves(state.hparams))
        key += (jax.tree.structure(frozen), *((x.shape, x.dtype) for x in jax.tree.leaves(frozen)))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.jitted.lower(state, batch, frozen).compile()
            tokens = batch.tokens_GxKxT
            shape = "x".join(map(str, tokens.shape)) + f", S={batch.score_src_ZxS.shape[-1]}"
            self.pending.append((shape, time.perf_counter() - t0, tokens.shape[-1]))
            # a new program: the blocks kept for the others' temporaries (and the compiler's) rarely fit its own, so
            # they go back first; programs met again reuse what they left (no trimming between them)
            jax.block_until_ready(state)
            xla_flags.release_memory()
        return self.compiled[key](state, batch, frozen)

    def take_new(self) -> list[tuple[str, float, int]]:
        """(batch shape, compile seconds, row length) of the programs compiled since the last call."""
        new, self.pending = self.pending, []
        return new


class StepCache:
    """Jitted steps by their static identity: a caller that keeps one across runs (a sequential sweep) compiles
    each step once, since members differ only in traced values."""

    def __init__(self):
        self.programs: dict[Hashable, StepProgram] = {}

    def get(self, key: Hashable, make: Callable[[], StepProgram]) -> StepProgram:
        if key not in self.programs:
            self.programs[key] = make()
        return self.programs[key]


@dataclasses.dataclass
class Stage:
    """What the loop trains: ``steps`` optimizer steps of the ``members`` from ``one`` (one member's abstract
    state: shapes and dtypes) made by ``init(seeds, hparams_K)``."""

    name: str
    steps: int
    members: list[Member]
    step_fn: Callable  # (state, batch, frozen) -> (state, metrics) of one member: pure, static parts bound
    program_key: Hashable  # the step's static identity (what a StepCache keys it by)
    one: Any  # one member's abstract state (jax.ShapeDtypeStruct leaves)
    init: Callable  # (seeds [K], hparams_K, shardings) -> the population's state, fresh, laid out as ``shardings``
    frozen: Any = None  # the step's frozen argument (a frozen reference, a LoRA base)
    hooks: list[Hook] = dataclasses.field(default_factory=list)
    log_offset: int = 0  # logged step = log_offset + stage step (one increasing axis across stages, W&B's)
    flops: Callable[[dict], float] | None = None  # a step's FLOPs from its ``batch_stats``
    note: str = ""  # a line the console prints at the start
    compiled: list = dataclasses.field(default_factory=list)  # seconds each new step program took to compile
    # the members' hyper-parameters change during the stage (PBT): a resume takes them from the checkpoints
    hparams_from_checkpoints: bool = False


class Loop:
    """One stage's run: the population's state, the batches, the step and the hooks. Hooks read and use
    ``state``, ``console``, ``members``, ``figures()``, ``save``, ``stop`` and ``check_finite``."""

    def __init__(self, stage: Stage, mesh, cache: StepCache):
        self.stage, self.mesh, self.cache = stage, mesh, cache
        self.members = stage.members
        self.shared = len({m.seed for m in self.members}) == 1  # one batch for all, or each member its own
        one_sh = sharding.tree_shardings(stage.one, mesh)
        self.population_sh = sharding.tree_shardings(self.population_shape(), mesh, members=True)
        self.hparams = jax.device_put(stack([m.hparams for m in self.members]), self.population_sh.hparams)
        # A checkpoint is member k's state as an ordinary run's, without hyper-parameters: they always come from the
        # config (recorded in its meta), so a member can resume alone or in a population of other loss types.
        self.saved, self.saved_sh = stage.one.replace(hparams=None), one_sh.replace(hparams=None)
        self._take = jax.jit(lambda s, k: member(s, k).replace(hparams=None), out_shardings=self.saved_sh)
        self.console: Writer = Writer()
        self.state = self.metrics = None
        self.last_eval: tuple[int, list[dict]] | None = None  # (step, the members' eval rows), for hooks after it
        self._gather = jax.jit(gather_members, out_shardings=self.population_sh)
        self._clock = time.perf_counter()
        self._acc: dict[str, float] = {}
        self._steps_timed = 0

    def population_shape(self):
        k = len(self.members)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), self.stage.one)

    # --- state ---------------------------------------------------------------------------------------------------

    def restore_or_init(self) -> tuple[int, bool]:
        """(first step, whether an eval is pending): the newest step all members hold, or a fresh state."""
        stage, members = self.stage, self.members
        abstract = checkpoint.abstract_like(self.saved, self.saved_sh)
        restored = checkpoint.restore_common([m.ckpt for m in members], abstract)
        if restored is None:
            seeds = np.asarray([m.seed for m in members], np.int32)
            self.state = stage.init(seeds, self.hparams, self.population_sh)
            return 0, False
        step, per_member = restored
        states = [s for s, _ in per_member]
        self.state = jax.jit(stack, out_shardings=self.population_sh.replace(hparams=None))(states)
        if stage.hparams_from_checkpoints:  # each member's values when it was saved (PBT changes them)
            for m, (_, meta) in zip(members, per_member, strict=True):
                m.hparams = m.hparams.replace(**{k: np.asarray(v, np.asarray(getattr(m.hparams, k)).dtype)
                                                 for k, v in meta["hparams"].items()})  # fmt: skip
            self.hparams = jax.device_put(stack([m.hparams for m in members]), self.population_sh.hparams)
        self.state = self.state.replace(hparams=self.hparams)
        meta = per_member[0][1]
        who = f" {len(members)} members" if len(members) > 1 else ""
        print(f"[{stage.name}] resumed{who} from step {step} (data step {meta['data_step']})", flush=True)
        return int(sharding.fetch(self.state.step)[0]), any(m.get("eval_pending") for _, m in per_member)

    def save(self, step: int, **meta):
        """Every member's state at ``step`` (the step's data position and its hyper-parameters in the meta). On a CPU
        host memory is the devices' memory: a state past ``SYNC_SAVE_BYTES`` has each member's saved copy written
        before the next is made and before the next step's temporaries come (a 270M model's copy is 3.2 GB, its
        step's temporaries 2 GB), and where it can be, it is no copy at all (``sharding.member_view``)."""
        sync = jax.default_backend() == "cpu" and checkpoint.state_bytes(self.saved) > SYNC_SAVE_BYTES
        for k, m in enumerate(self.members):
            if k and (sync or jax.process_count() > 1):  # Orbax's cross-host commit barriers are named by step
                self.members[k - 1].ckpt.wait()
            record = {f.name: np.asarray(getattr(m.hparams, f.name)).tolist() for f in dataclasses.fields(m.hparams)}
            info = {"data_step": step, "stage": self.stage.name, **meta, "hparams": record}
            view = sharding.member_view(self.state.replace(hparams=None), k, self.saved_sh) if sync else None
            m.ckpt.save(step, self._take(self.state, k) if view is None else view, info, force=True)
            del view  # read in place: written before the next member's and before the next step
        if sync:
            self.members[-1].ckpt.wait()

    def exploit(self, index_K: np.ndarray, hparams: list):
        """Member k takes member ``index_K[k]``'s whole state (a gather along the member axis) and ``hparams[k]``."""
        self.state = self._gather(self.state, jax.numpy.asarray(index_K, jax.numpy.int32))
        for k, (m, hp) in enumerate(zip(self.members, hparams, strict=True)):
            m.hparams = hp
            if index_K[k] != k:
                m.failed_step = None  # a failed member replaced by an exploit trains again
        self.hparams = jax.device_put(stack(hparams), self.population_sh.hparams)
        self.state = self.state.replace(hparams=self.hparams)

    def stop(self, step: int, *, eval_pending: bool = False):
        """Save ``step`` (unless the regular save has it) and raise ``Preempted``; a NaN/Inf state is never saved
        (a single run's step updates in place: ``check_finite`` raises first)."""
        self.check_finite()
        if self.members[0].ckpt.latest_step() != step or eval_pending:
            self.save(step, eval_pending=eval_pending)
        self.close()
        raise Preempted(f"[{self.stage.name}] {signals.name()}: saved step {step}; rerun the same command to resume")

    def check_finite(self, log: bool = True):
        """A member whose step was not finite: a run stops (``NonFiniteLoss`` naming the step and the last good
        checkpoint); a population marks it failed (console, summary, log) and trains the others on, until none is
        left. The failed member's state is its last good one (``step.train_step`` keeps it). ``log=False``: a
        resumed member that failed before its checkpoint (its log row is there already)."""
        bad = sharding.fetch(self.state.nonfinite_step)
        if not (bad >= 0).any():
            return
        if len(self.members) == 1 or (bad >= 0).all():
            k = int(np.argmax(bad >= 0))
            for m in self.members:
                m.ckpt.wait()
            who = f"member {k}: " if len(self.members) > 1 else ""
            every = "every member has failed; " if len(self.members) > 1 else ""
            raise NonFiniteLoss(
                f"[{self.stage.name}] {every}{who}the loss or gradient became NaN/Inf at step {int(bad[k])}; stopped "
                f"without saving. Last good checkpoint: {self.members[k].ckpt.last_good()}"
            )
        for k, m in enumerate(self.members):
            if bad[k] >= 0 and m.failed_step is None:
                m.failed_step = int(bad[k])
                line = (
                    f"[{self.stage.name}] member {k}: the loss, gradient or parameters became NaN/Inf at step "
                    f"{m.failed_step}: frozen at its last good state, marked failed; the others train on"
                )
                m.warnings.append(line)
                self.console.note(line)
                if log:
                    m.writer.write(
                        self.stage.log_offset + m.failed_step, {f"{self.stage.name}/failed_step": m.failed_step}
                    )

    def close(self):
        for m in self.members:
            m.ckpt.close()

    # --- throughput ----------------------------------------------------------------------------------------------

    def _count(self, batch, slices: int):
        """Accumulate the step's batch statistics: a shared batch counts once per member."""
        k = len(self.members)
        each = [batch_stats(batch)] * k if self.shared else [batch_stats(member(batch, i)) for i in range(k)]
        for stats in each:
            stats = {n: v * slices for n, v in stats.items()}
            if self.stage.flops is not None:
                stats["flops"] = self.stage.flops(stats)
            self._acc = {n: self._acc.get(n, 0.0) + v for n, v in stats.items()}
        self._steps_timed += 1

    def figures(self, peak: float) -> dict[str, float]:
        """Throughput since the last call (compiles and paused hooks left out): step time, pairs/s, tokens/s,
        packing and head efficiency, MFU against ``peak``; resets the interval."""
        acc, name = self._acc, self.stage.name
        dt = max(time.perf_counter() - self._clock - acc.get("compile_s", 0.0) - acc.get("paused_s", 0.0), 1e-9)
        out = {
            f"{name}/step_time_s": dt / max(self._steps_timed, 1),
            f"{name}/pairs_per_s": acc.get("pairs", 0.0) / dt,
            f"{name}/tokens_per_s": acc.get("real_tokens", 0.0) / dt,
            f"{name}/packing_efficiency": acc.get("real_tokens", 0.0) / max(acc.get("slots", 0.0), 1.0),
            f"{name}/padding_fraction": 1.0 - acc.get("real_tokens", 0.0) / max(acc.get("slots", 0.0), 1.0),
            f"{name}/head_efficiency": acc.get("scored_tokens", 0.0) / max(acc.get("head_entries", 0.0), 1.0),
            f"{name}/programs": len(self.stage.compiled),  # compiled so far in this process
            f"{name}/compile_s_total": sum(self.stage.compiled),
        }
        if peak and "flops" in acc:
            out[f"{name}/mfu"] = acc["flops"] / dt / peak
        if acc.get("compile_s"):
            out[f"{name}/compile_s"] = acc["compile_s"]
        self._clock, self._acc, self._steps_timed = time.perf_counter(), {}, 0
        return out

    # --- the loop --------------------------------------------------------------------------------------------------

    def batches(self, start: int):
        """(step, batch): the batch all members share, or the members' own batches stacked to [K, ...]."""
        stage = self.stage
        if self.shared:
            yield from self.members[0].loader.iterate(start, stage.steps - start)
            return
        iters = [m.loader.iterate(start, stage.steps - start) for m in self.members]
        for items in zip(*iters, strict=True):
            yield items[0][0], stack_batches(pad_batches([b for _, b in items]))  # members' sizes differ

    def program(self, sample) -> StepProgram:
        stage, mesh, shared = self.stage, self.mesh, self.shared
        batch_sh = sharding.batch_shardings(mesh, sample, members=not shared)
        frozen_sh = None if stage.frozen is None else sharding.param_shardings(stage.frozen, mesh)
        frozen_key = (jax.tree.structure(frozen_sh), tuple(jax.tree.leaves(frozen_sh)))  # e.g. an int8 LoRA base
        key = (stage.program_key, mesh, jax.tree.structure(sample), frozen_key, shared, len(self.members))

        def make():
            step = jax.vmap(stage.step_fn, in_axes=(0, None if shared else 0, None))
            outs = (self.population_sh, sharding.replicated(mesh))
            ins = (self.population_sh, batch_sh, frozen_sh)
            return StepProgram(jax.jit(step, in_shardings=ins, out_shardings=outs, donate_argnums=0))

        return self.cache.get(key, make)

    def _run_hooks(self, step: int, *, start: bool = False):
        for hook in self.stage.hooks:
            if hook.at_start if start else hook.due(step, self.stage.steps):
                t0 = time.perf_counter()
                if hook.paused:  # an eval, sampling: programs of their own, which the steps' kept blocks rarely fit
                    jax.block_until_ready(self.state)
                    xla_flags.release_memory()
                hook.fn(self, step)
                if hook.paused:
                    jax.block_until_ready(self.state)
                    xla_flags.release_memory()
                    self._acc["paused_s"] = self._acc.get("paused_s", 0.0) + time.perf_counter() - t0

    def run(self, on_compile: Callable[[Loop, str, float, int], None] | None = None):
        """Train the stage from its newest checkpoint; returns the members' [K] parameters."""
        stage = self.stage
        start, eval_pending = self.restore_or_init()
        if start >= stage.steps and not eval_pending:
            self.close()
            return self.state.params
        for m in self.members:  # this stage's rows of steps that will be redone, and of an eval that will be redone
            m.writer.rewind(stage.log_offset + start, stage=stage.name, keep_evals=not (eval_pending or start == 0))
        for hook in stage.hooks:
            if hook.resume is not None:
                hook.resume(start)
        sample = next(self.batches(min(start, stage.steps - 1)))[1]
        program = self.program(sample)
        if jax.process_index() == 0:
            self.console = ConsoleWriter(stage.steps, start, stage.name, stage.log_offset)
        slices = sharding.batch_slice(self.mesh)[1]  # processes holding alike slices of the batch
        if stage.note:
            self.console.note(stage.note)
        if start and len(self.members) > 1:
            self.check_finite(log=False)  # members that failed before the checkpoint stay failed, logged once
        try:
            if start == 0 or eval_pending:
                self._run_hooks(start, start=True)  # step 0: the reference itself, the first point of every curve
                self.console.restart_clock()  # the bar's rate and ETA count training steps
            self._clock, self._acc, self._steps_timed = time.perf_counter(), {}, 0
            for step, batch in self.batches(start):
                self.state, self.metrics = program(self.state, to_global(batch, self.mesh, members=not self.shared),
                                                   stage.frozen)  # fmt: skip
                self._count(batch, slices)
                xla_flags.release_memory(KEPT_BYTES, of_used=0.5)  # free blocks beyond half what is in use go back
                for shape, seconds, row in program.take_new():
                    self._acc["compile_s"] = self._acc.get("compile_s", 0.0) + seconds
                    stage.compiled.append(seconds)
                    if on_compile is not None:
                        on_compile(self, shape, seconds, row)
                self._run_hooks(step + 1)
        finally:
            self.console.close()  # before any error line, so the message is the last thing printed
        self.close()
        return self.state.params


# --- Hooks every stage takes --------------------------------------------------------------------------------------


def checkpoint_hook(every: int) -> Hook:
    """Save every member's state (after the finite check: a NaN/Inf state is never a checkpoint)."""

    def save(loop: Loop, step: int):
        loop.check_finite()
        loop.save(step)

    return Hook(save, every)


def preemption_hook() -> Hook:
    """SIGTERM / Ctrl-C: save this step and stop (``signals``); checked after every step."""

    def check(loop: Loop, step: int):
        if signals.requested() and step < loop.stage.steps:
            loop.stop(step)

    return Hook(check, 1)
