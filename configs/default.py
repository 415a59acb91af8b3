"""The main job: DPO on the built-in synthetic task with a tiny Llama, on one CPU in a few minutes.

Builds the task's tokenizer and data, SFTs a reference policy on its demonstrations, DPO-trains from the
reference, evaluates (held-out preference accuracy, exact token KL, sampled sequence KL, true reward) and
writes checkpoints, a JSONL log, an offline W&B run, plots, a summary and a Hugging Face export to --workdir.

    dpo-jax train --config configs/default.py --workdir runs/default
    dpo-jax train --config configs/default.py --workdir runs/beta03 --config.dpo.beta=0.3
    dpo-jax train --config configs/default.py:runlocal --workdir runs/smoke   # a seconds-long smoke run
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Where preference data comes from: "synthetic" (the built-in task) or "files".
    c.task = "synthetic"
    c.synthetic = dict(
        prompt_length=5,
        completion_length=6,
        n_sft=4096,
        n_train=4096,
        n_eval=256,
        tau=0.1,  # Bradley-Terry temperature of the reward: P(y1 > y2) = sigmoid((r1 - r2) / tau)
        label_noise=0.0,  # probability that a hard label is flipped
        reward="positive",  # positive (fraction of letters a-h) | copy_prompt (letters that occur in the prompt)
        seed=0,
    )
    c.data = dict(
        train_path="",  # task="files": local .jsonl / .json / .parquet / save_to_disk folder
        eval_path="",
        sft_path="",  # optional {prompt, completion} rows for an SFT stage
        tokenizer_path="",  # folder with tokenizer.json (default: the model folder)
        split="",  # for DatasetDict folders
        prompt_column="prompt",
        chosen_column="chosen",
        rejected_column="rejected",
        prob_column="chosen_prob",
        weight_column="weight",
        on_bad_row="error",  # error | skip
        max_length=32,  # prompt + completion tokens
        # rows with a text of more characters are refused before tokenizing (a tokenizer takes hundreds of bytes
        # per character); 0: 100 x max_length
        max_row_chars=0,
        max_prompt_length=16,
        truncation_mode="keep_end",
        packing=True,  # whole pairs packed into rows (padding-free); False: one padded row per pair
        share_prompt=True,  # prompt | chosen | rejected in one segment: the prompt computed once per pair
        pack_length=0,  # tokens per packed row; 0: chosen from the data's lengths
        buckets=(32,),  # padded rows (packing=False): lengths; batches use the smallest that fits
        # at most this many batch shapes (compiled programs) a stage's batches take, chosen from a sample of its
        # steps to pad least; 0: each batch's sizes rounded to a grid (dozens of programs on data of varied lengths)
        max_shapes=4,
    )
    c.model = dict(
        init="scratch",  # scratch | hf (load model.hf_path)
        hf_path="",
        # a new model's family (dpo_jax.models.families): LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM,
        # Olmo2ForCausalLM, Phi3ForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3MoeForCausalLM,
        # MixtralForCausalLM
        architecture="LlamaForCausalLM",
        num_experts=0,  # a new mixture of experts (Qwen3MoeForCausalLM, MixtralForCausalLM): experts per layer,
        experts_per_token=2,  # ... routed to per token,
        expert_intermediate_size=0,  # ... and each expert's MLP width (0: intermediate_size)
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype="float32",  # compute dtype; parameters are always float32
        scan_layers=True,
        remat="none",  # none | full | dots | dots_no_batch
        # auto: splash on a TPU, flashmask on a GPU; elsewhere the einsum for rows of one block, the blockwise
        # kernel (memory linear in the row) for longer ones; or einsum | blockwise | splash (TPU; interpret mode
        # elsewhere: slow) | flashmask (GPU; interpret mode elsewhere: slow) | cudnn (GPU; data.packing=False) |
        # pallas (GPU flash; data.share_prompt=False)
        attention="auto",
        attention_block=512,  # blockwise: query and key tokens per block
        context_attention="ring",  # rows over mesh.context: ring | gather (all-gather the keys; docs/scale.md)
        mlp_chunk=0,  # > 0: the MLP in chunks of this many tokens, each recomputed (memory of long rows)
    )
    # Population-based training over a vectorised sweep's members (dpo_jax.research.pbt; dpo-jax sweep --mode
    # vectorized): every `every` steps (a multiple of eval.every) the bottom `fraction` by `metric` take the state
    # and the hyper-parameters of members drawn from the top, each hyper-parameter in `hparams` times a factor in
    # `factors`, clipped to its bounds. metric: reward (eval/reward) | loss | accuracy | reward_kl (reward - kl_coef
    # * KL).
    c.pbt = dict(
        enabled=False,
        every=50,
        metric="reward",
        kl_coef=0.0,
        fraction=0.25,
        hparams="beta,lr_scale",
        factors=(0.8, 1.25),
        seed=0,
        beta_bounds=(0.01, 2.0),
        lr_scale_bounds=(0.05, 20.0),
        label_smoothing_bounds=(0.0, 0.45),
        target_temperature_bounds=(0.1, 10.0),
    )
    # Mixtures of experts (dpo_jax.models.moe): TRL's router_aux_loss_coef and beyond.
    c.moe = dict(
        aux_loss_coef=-1.0,  # load-balancing loss weight, added to every objective; -1: the checkpoint's (0.001 new)
        freeze_router=False,  # keep the reference's routing: router weights never update
        # blocked: tokens sorted by expert, padded to blocks, a scan over them (the fastest on CPU) | grouped: the same
        # sorted tokens through jax.lax.ragged_dot | dense: every expert on every token (experiments/moe_step.py)
        impl="blocked",
    )
    # Stage that builds the reference policy (skipped when sft.steps == 0).
    c.sft = dict(
        steps=400,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=20,
        schedule="cosine",  # the same optimizer fields as optim (AdamW, clipping, schedule)
        end_lr_fraction=0.1,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        clip_norm=1.0,
        dir="",  # where the SFT stage lives (default <workdir>); sweeps point members at one shared stage
    )
    c.dpo = dict(
        loss_type="sigmoid",  # one of dpo_jax.core.losses.LOSS_TYPES, or "a+b" for a weighted mix
        loss_weights=(),  # one weight per type in a mix; () means all 1
        # > 0: KL coefficient of the underlying RLHF objective. 0.3 on the built-in task: at 0.1 the chosen
        # completions' likelihood falls so fast that where the policy ends depends on the seed (README)
        beta=0.3,
        label_smoothing=0.0,  # conservative-DPO flip rate in [0, 0.5)
        use_soft_targets=False,  # train on the per-pair soft probabilities (data prob_column)
        soft_target_temperature=1.0,  # soft targets become sigmoid(logit(p) / T); 1 keeps them
        seed=-1,  # seed of the DPO stage (data order, train rng); -1: the run's seed. Sweeps vectorise over it
        reference_free=False,  # the reference is the uniform measure (log-probs 0): no reference pass
        # TRL's names, so a TRL config carries over (README "Loss types"):
        f_divergence_type="reverse_kl",  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
        f_alpha_divergence_coef=0.5,  # alpha of alpha_divergence
        discopop_tau=0.05,  # > 0, DiscoPOP's temperature
        simpo_gamma=0.5,  # SimPO's target reward margin (in units of beta * length-averaged log-prob)
        ld_alpha=1.0,  # LD-DPO: weight in [0, 1] of the tokens past the shorter completion; 1 = plain DPO
        use_weighting=False,  # WPO: weight each pair by its policy probability (length-normalised, aligned)
        bco_delta="zero",  # bco_pair's reward offset: zero (TRL 1.16) | batch (this batch's mean reward) | running
        desirable_weight=1.0,  # kto: weight of desirable examples (pairs give one desirable, one undesirable)
        undesirable_weight=1.0,  # kto: weight of undesirable examples
    )
    c.optim = dict(
        steps=300,
        batch_size=64,  # pairs per step, over all devices and processes
        grad_accum=1,  # micro-batches per step
        learning_rate=3e-4,
        warmup_steps=20,
        schedule="cosine",  # cosine | linear | constant (after warmup)
        end_lr_fraction=0.1,  # final learning rate as a fraction of the peak
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        clip_norm=1.0,  # 0 disables clipping
    )
    c.reference = dict(
        mode="cached",  # cached: log-probs precomputed once and stored; frozen: a reference forward every step
        cache_dir="",  # default: <workdir>/../reference_cache, shared by sibling runs
        # TR-DPO (Gorbatovski et al. 2024; TRL's sync_ref_model): every ref_model_sync_steps the reference becomes
        # alpha * policy + (1 - alpha) * reference (alpha 1: a hard copy). Needs mode="frozen".
        sync=False,
        ref_model_mixup_alpha=0.6,
        ref_model_sync_steps=512,
        # BEMA (Block & Zhang 2025; TRL's BEMACallback with update_ref_model): every bema_ref_model_update_freq steps
        # the reference becomes the bias-corrected EMA of the policy, itself updated every bema_update_freq steps
        # (dpo_jax.core.bema has the rule; TRL's argument names after bema_). Needs mode="frozen".
        bema=False,
        bema_update_freq=400,
        bema_ema_power=0.5,
        bema_bias_power=0.2,
        bema_lag=10.0,
        bema_update_after=0,
        bema_multiplier=1.0,
        bema_min_ema_multiplier=0.0,
        bema_ref_model_update_freq=400,
        bema_ref_model_update_after=0,
        hf_path="",  # a local Hugging Face folder to use as the reference instead of the initial policy
    )
    # The true reward of a completion, scored on eval samples (eval/reward) and by `dpo-jax rounds`: "" is the built-in
    # task's (task="synthetic"; none for files), else "module:function" or "path/to/file.py:function" naming a
    # function (prompt: str, completion: str) -> float (a conversational prompt arrives as its JSON).
    c.reward = ""
    c.reward_timeout_s = 60.0  # a reward call that takes longer ends the run with one line naming it
    # Iterative (online) DPO, `dpo-jax rounds`: each round samples `samples` completions per training prompt from the
    # current policy, pairs the best and the worst by `reward` (prompts whose samples all tie are skipped) and trains
    # an ordinary DPO run (optim.steps steps) on them in <workdir>/round_<r>, starting from the previous round's policy.
    c.rounds = dict(
        num=3,  # rounds after round 0 (the initial policy); raise it on a rerun to continue
        samples=8,  # completions per prompt
        prompts=0,  # training prompts per round (0: every distinct prompt of the training data)
        reference="keep",  # keep: the round-0 policy stays the reference | refresh: the previous round's policy
        temperature=1.0,
        max_new_tokens=0,  # 0: eval.max_new_tokens
        # a sample cut off at max_new_tokens: "score" pairs it as cut (marked <column>_cut in pairs.jsonl, tokenized
        # without an end-of-turn); "drop" never pairs it
        cut_samples="score",
        sample_memory_mb=2048.0,  # device memory one sampling call may take; its rows are sized from it
        # online DPO with `dpo-jax train`: every step samples `samples` completions for each of its optim.batch_size
        # prompts from the current policy and trains on the best vs the worst (rounds of one step-batch, one run;
        # num, prompts and reference are `dpo-jax rounds`' only). Needs a reward and reference.mode="frozen".
        online=False,
    )
    c.lora = dict(
        # rank 0: every parameter trains. rank r > 0: LoRA adapters (nnx.LoRA) on a frozen base; the reference is the
        # base with the adapters off; the optimizer holds the adapters' moments only. Exports: hf/ (merged) and
        # adapter/ (PEFT's adapter_config.json + adapter_model.safetensors).
        rank=0,
        alpha=16.0,  # scale alpha / rank (PEFT's lora_alpha)
        targets="all-linear",  # or projection names: "q_proj,v_proj" (q k v o gate up down _proj)
        # how the frozen base is stored (adapters train in float32): float32 | bfloat16 | int8 (qwix: symmetric,
        # a float32 scale per output channel / embedding row / vocabulary column; dequantized at use)
        base_dtype="float32",
        dropout=0.0,  # PEFT's lora_dropout: on each adapter's input, in training steps only (not eval/sampling)
    )
    # member: devices groups a population's members are split over (0: as many as divide the members and devices;
    # a plain run is one member). Within a group: data, fsdp, tensor (-1: all remaining devices).
    # expert: a mixture's experts split (and the batch); context: a row's tokens split (ring attention, docs/scale.md)
    c.mesh = dict(member=0, data=-1, fsdp=1, tensor=1, expert=1, context=1)
    c.logprobs = dict(
        token_chunk=1024,  # chunked LM head: tokens and vocabulary entries per chunk
        vocab_chunk=8192,
        scored_only=True,  # the LM head on completion tokens only (False: every slot, for comparison)
        # scored logits up to this size (MiB) are kept for the backward; above it, chunked. -1: 256 on a CPU,
        # 1/32 of the device's memory on an accelerator
        max_logits_mb=-1.0,
    )
    c.eval = dict(
        every=100,  # steps; and at the end
        batch_size=64,
        num_prompts=256,  # held-out prompts sampled for sequence KL and reward (0: skip)
        max_new_tokens=8,
        temperature=1.0,
    )
    c.checkpoint = dict(
        every=100,
        keep=2,
        reserve_mb=0.0,  # free space (MiB) a save must leave on the disk; a save that would not is refused
    )
    # Resuming checks the config against the one the checkpoints were made with. Fields listed here (comma-separated,
    # from dpo_jax.config.CHANGEABLE_ON_RESUME, e.g. "dpo.beta,optim.steps") may differ: the run continues with them.
    c.resume = dict(allow_changes="")
    c.wandb = dict(
        enabled=True,
        mode="offline",  # offline unless WANDB_MODE / WANDB_API_KEY say otherwise
        project="dpo_jax",
        entity="",
        group="",
        tags=(),
        name="",
    )
    c.log_every = 10
    c.export_hf = True
    c.peak_flops = 0.0  # per device, for MFU; 0: the data sheet's (accelerators), a measured matmul (CPUs)

    if arg == "runlocal":
        c.synthetic.update(n_sft=256, n_train=256, n_eval=64)
        c.sft.steps = 20
        c.optim.steps = 20
        c.optim.batch_size = 16
        c.sft.batch_size = 16
        c.eval.update(every=10, batch_size=16, num_prompts=32)
        c.checkpoint.every = 10
        c.log_every = 5
    elif arg:
        raise ValueError(f"configs/default.py: unknown config argument {arg!r}; expected 'runlocal' or nothing")
    return c
