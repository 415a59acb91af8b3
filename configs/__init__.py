"""The shipped configs, importable as ``dpo_jax.configs.<name>`` (see dpo_jax/config.py)."""
