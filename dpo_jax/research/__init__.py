"""Research tools on top of the engine: sweeps, population-based training, iterative rounds, best-of-n."""
