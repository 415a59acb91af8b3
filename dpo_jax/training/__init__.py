"""The engine: builds a run from its config (mesh, policy, reference, data, step) and drives it (the loop and its
hooks, eval, outputs, resumable stages)."""
