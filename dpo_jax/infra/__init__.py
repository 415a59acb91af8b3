"""Infrastructure: workdirs and atomic writes, Orbax checkpoints, metric writers, signals, the device mesh's sharding
rules, Hugging Face checkpoints and tokenizers, the hub cache, XLA flags and the throughput accounting. Knows
nothing of the algorithm's objectives."""
