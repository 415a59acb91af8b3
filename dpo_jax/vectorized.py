"""Vectorised sweeps: K members that differ only in traced values train in one compiled program.

Shape letter: K members. The train state is stacked along a leading [K] axis (parameters, optimizer state,
``hparams`` = beta, label smoothing, soft-target temperature and a learning-rate scale) and
``jax.vmap(train_step)`` runs all members on one shared batch with one shared reference. Members with different
``dpo.seed`` draw their own data order: their batches are stacked to [K, B, 2, L] and vmapped too (the same
compute; the reference log-probs come from the shared cache). Each member is then written out as an ordinary
run: its own checkpoints, metrics, W&B run, eval, summary, plots and export, as ``dpo-jax train`` would leave
them.

Members may differ in ``VECTOR_KEYS`` only; anything else (data, model, loss type, steps) needs separate
programs, i.e. the sequential sweep.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import checkpoint, sharding, signals
from dpo_jax.config import ConfigError
from dpo_jax.data import pad_batches, to_global
from dpo_jax.errors import NonFiniteLoss
from dpo_jax.evaluate import write_outputs
from dpo_jax.signals import Preempted, stop_signals
from dpo_jax.train import (
    TrainState,
    check_stage_configs,
    make_optimizer,
    make_writer,
    prepare,
    run_info,
    stage_checkpointer,
    train_step,
    workdir_lock,
)
from dpo_jax.workdir import ensure_writable

VECTOR_KEYS = ("dpo.beta", "dpo.label_smoothing", "dpo.soft_target_temperature", "dpo.seed", "optim.learning_rate")


def check_vectorizable(members: list[dict[str, Any]]) -> None:
    for m in members:
        bad = sorted(set(m) - set(VECTOR_KEYS))
        if bad:
            raise ConfigError(
                f"sweep: vectorised members may differ only in {VECTOR_KEYS}; {bad} need the "
                "sequential mode (--mode=sequential)"
            )


def _member(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def train_vectorized(cfgs: list, workdirs: list[Path], *, devices=None) -> list[dict]:
    """Train K member configs (equal but for ``VECTOR_KEYS``) together; returns their summaries."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != 1:
        raise ConfigError("sweep: the vectorised mode runs on one device (members are the parallel axis)")
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for wd in workdirs:
            stack.enter_context(workdir_lock(ensure_writable(wd)))
        stack.enter_context(stop_signals())
        for c, wd in zip(cfgs, workdirs, strict=True):
            check_stage_configs(c, wd)
        return _train(cfgs, workdirs, devices, t_start)


def _train(cfgs, workdirs, devices, t_start) -> list[dict]:
    k_members, cfg = len(cfgs), cfgs[0]
    writers = [make_writer(c, wd) for c, wd in zip(cfgs, workdirs, strict=True)]
    try:
        job = prepare(cfg, workdirs[0], devices, writers[0])  # SFT metrics go to the first member's log
        evaluators = [job.evaluator(c) for c in cfgs]
        base_lr = cfg.optim.learning_rate
        stages = [job.dpo_stage(c, None) for c in cfgs]
        stage = stages[0]
        tx = make_optimizer(stage.optim, stage.steps, base_lr, stage.optim.get("warmup_steps", 0))
        hparams = {k: jnp.asarray([s.hparams[k] for s in stages], jnp.float32) for k in stage.hparams}
        hparams["lr_scale"] = jnp.asarray([c.optim.learning_rate / base_lr for c in cfgs], jnp.float32)
        seeds = jnp.asarray([s.seed for s in stages], jnp.int32)
        shared_batch = len({s.seed for s in stages}) == 1
        params = job.reference_params

        def init_one(h, seed):
            return TrainState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(seed), h, jnp.int32(-1))

        ckpts = [stage_checkpointer(c, wd, "dpo") for c, wd in zip(cfgs, workdirs, strict=True)]
        abstract = jax.eval_shape(init_one, _member(hparams, 0), seeds[0])
        shardings = sharding.tree_shardings(abstract, job.mesh)
        restored = [c.restore_latest(checkpoint.abstract_like(abstract, shardings)) for c in ckpts]
        latest = {r[0] if r else None for r in restored}
        if latest == {None}:
            state = jax.jit(jax.vmap(init_one))(hparams, seeds)
        elif len(latest) == 1:
            step0 = latest.pop()
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *[r[1] for r in restored])
            state = state.replace(hparams=hparams)  # the config's values (changes were checked before)
            print(f"[vectorized] resumed {k_members} members from step {step0}", flush=True)
        else:
            raise ConfigError(
                f"sweep: members' checkpoints are at different steps {sorted(latest, key=str)}; "
                "resume them with the sequential mode"
            )
        step_fn = jax.jit(
            jax.vmap(
                functools.partial(train_step, graphdef=job.graphdef, tx=tx, sc=stage.sc),
                in_axes=(0, None if shared_batch else 0, None),
            ),
            donate_argnums=0,
        )
        start = int(state.step[0])
        for w in writers:
            w.rewind(stage.log_offset + start)  # steps about to be redone are not logged twice
        t0, timed = time.perf_counter(), 0
        for step, batch in _batches(stages, start, shared_batch):
            if signals.requested():
                for k, c in enumerate(ckpts):
                    if c.latest_step() != step:
                        c.save(step, _member(state, k), {"data_step": step, "stage": "dpo"}, force=True)
                    c.close()
                raise Preempted(
                    f"[vectorized] {signals.name()}: saved step {step} of {k_members} members; rerun to resume"
                )
            if stage.ref_cache is not None:
                batch["ref_logps"] = stage.ref_cache[np.maximum(batch["index"], 0)] * batch["valid"][..., None]
            batch = to_global(batch, job.mesh) if shared_batch else jax.device_put(batch, devices[0])
            state, metrics = step_fn(state, batch, None)
            done, timed = step + 1, timed + 1
            logged_step = stage.log_offset + done
            if done % cfg.log_every == 0 or done == stage.steps:
                metrics = jax.device_get(metrics)
                _check_finite(state, ckpts)
                dt = time.perf_counter() - t0
                for k, w in enumerate(writers):
                    row = {f"train/{m}": float(v[k]) for m, v in metrics.items()}
                    row.update({f"dpo/{m}": v for m, v in row.items()})
                    row.update(
                        {
                            "train/pairs_per_s": timed * stage.loader.global_batch_size / dt,
                            "train/step_time_s": dt / timed,
                            "vectorized/members": k_members,
                        }
                    )
                    w.write(logged_step, row)
                t0, timed = time.perf_counter(), 0
            if done % cfg.eval.every == 0 or done == stage.steps:
                for k, (ev, w) in enumerate(zip(evaluators, writers, strict=True)):
                    w.write(logged_step, ev(_member(state.params, k), done))
                t0 = time.perf_counter()
            if done % cfg.checkpoint.every == 0 or done == stage.steps:
                _check_finite(state, ckpts)
                for k, c in enumerate(ckpts):
                    c.save(done, _member(state, k), {"data_step": done, "stage": "dpo"}, force=True)
        for c in ckpts:
            c.close()
        summaries = []
        for k, (c, wd, ev) in enumerate(zip(cfgs, workdirs, evaluators, strict=True)):
            params_k = _member(state.params, k)
            summary = {
                **job.summary,
                **ev.final(params_k, stage.steps),
                **run_info(job, devices, t_start),
                "vectorized/members": k_members,
            }
            summaries.append((c, wd, params_k, summary))
        signals.check("after training (the final checkpoints are saved)")
    finally:
        for w in writers:
            w.close()
    out = []
    for c, wd, params_k, summary in summaries:
        write_outputs(c, wd, job.graphdef, params_k, job.tokenizer, summary)
        out.append(summary)
    return out


def _batches(stages, start: int, shared: bool):
    """(step, batch): one shared batch, or the members' own batches stacked to [K, ...] (their seeds differ)."""
    if shared:
        yield from stages[0].loader.iterate(start, stages[0].steps - start)
        return
    iters = [s.loader.iterate(start, s.steps - start) for s in stages]
    for items in zip(*iters, strict=True):
        batches = pad_batches([b for _, b in items])  # packed members' batches differ in their static sizes
        yield items[0][0], {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _check_finite(state, ckpts):
    bad = np.asarray(state.nonfinite_step)
    if (bad >= 0).any():
        k = int(np.argmax(bad >= 0))
        for c in ckpts:
            c.wait()
        raise NonFiniteLoss(
            f"[vectorized] member {k}: the loss or gradient became NaN/Inf at step {int(bad[k])}; "
            f"stopped without saving. Last good checkpoint: step {ckpts[k].latest_step()}"
        )
