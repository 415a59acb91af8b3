from dpo_jax.main import console_main

console_main()
