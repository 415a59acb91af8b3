"""Orbax checkpoints of the train state, with the data position and stage beside it.

Resume order: (1) restore the latest step's state (params, optimizer state, step, RNG, hyper-parameters)
onto the same shardings; (2) read its metadata; the data loader restarts at ``data_step`` (batches are a pure
function of the step, so this is exact); (3) training continues from ``step``. A save is atomic (Orbax
commits a step only when it is complete), so an interrupted run keeps its last good checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Asynchronous save (every ``every`` steps, or now with ``force``); returns whether one started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """``abstract_state``: ``jax.ShapeDtypeStruct`` leaves carrying the target shardings."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
