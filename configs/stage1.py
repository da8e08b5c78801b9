"""LLM-CXR stage 1: dolly-v2-3b + 1025 new token rows, all views, FINDINGS+IMPRESSION reports (SPEC.md §9).

    python -m llmcxr_jax.train --config configs/stage1.py --workdir runs/stage1 \
        --config.init.hf_dir=/path/to/dolly-v2-3b --config.data.data_dir=/path/to/tfds

Variants (`--config configs/stage1.py:NAME`): `` (the original, 2.8B, 5 epochs, global batch 16, one H100 ≈
18k tokens/s in the original stack), `demo` (the phantom demo's small LM), `tiny` (tests: synthetic data,
a few seconds on a CPU).
"""

import ml_collections

DOLLY_V2_3B = dict(vocab_size=51305, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   intermediate_size=10240, rotary_pct=0.25, rotary_emb_base=10000.0, max_position_embeddings=2048,
                   layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False, initializer_range=0.02)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 1
    c.seed = 42
    # remat dots_no_batch keeps the weight matmuls' outputs: on one H200 (batch 8 x 1024) 22.4k tokens/s and
    # 52.3 GiB against 20.9k and 43.6 GiB for "full" (NOTES.md); "full" where memory is tight.
    # vocab_multiple: the embedding tables are padded with zero rows to a multiple of it (51,305 -> 51,328), so
    # they split over a tensor axis; exported HF weights have 51,305 rows again.
    c.model = ml_collections.ConfigDict(dict(
        DOLLY_V2_3B, dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat_policy="dots_no_batch",
        vocab_multiple=128, scan_layers=True))
    # Where the weights come from on a fresh run: an HF directory (stage 1) or a previous stage's workdir (stage 2).
    # Neither: an error, unless from_scratch (random weights; the tests' and the phantom demo's small models).
    # init.step: the step of init.workdir to start from; 0 = its latest, which must be the run's last step
    c.init = ml_collections.ConfigDict(dict(hf_dir="", workdir="", step=0, from_scratch=False))
    c.tokenizer = ""  # "" = the packaged GPT-NeoX-20B tokenizer with LLM-CXR's layout; else a tokenizer.json dir
    c.vqgan = ml_collections.ConfigDict(dict(num_codes=1024, grid=16, fingerprint=""))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds",  # "tfds" (MIMIC/phantoms + Dolly from data_dir) or "synthetic"
        data_dir="", mimic_builder="mimic_cxr_llmcxr/stage1", vqa_builder="", dolly_builder="dolly15k",
        image_weight=0.8, dolly_weight=0.2,  # SPEC §7: MIMIC (+VQA) 0.8, Dolly 0.2, Dolly recycled
        lengths=(512, 1024, 1536, 2048), max_length=2048,
        seq_len=1024,  # synthetic data only (a dry run of tfds data compiles the longest of `lengths`)
        # Fraction of report→CXR records trained with an empty report, so that classifier-free guidance's
        # unconditional twin is in distribution (not in the original: 0).
        report_dropout=0.0))
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-6, schedule="log_warmup", warmup_steps=50, end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0, mu_dtype=""))
    c.train = ml_collections.ConfigDict(dict(
        # SPEC §8: a mean over 2-sequence groups of their per-token means (the original's per-device means)
        global_batch_size=16, micro_batches=1, num_epochs=5, num_steps=0, loss_mode="original", loss_group_size=2,
        loss_chunk=256,  # positions per chunk of LM head + cross-entropy; 0 = whole sequence at once
        # SPEC §9 "save every epoch, keep 5": epoch_checkpoints epoch ends are kept besides the latest
        # keep_checkpoints of the periodic saves (which a preempted run resumes from).
        log_every=50, eval_every=1500, checkpoint_every=1000, keep_checkpoints=5, epoch_checkpoints=5,
        async_checkpoints=True,
        peak_flops_per_device=0.0, progress=True))
    # coordinator_address: "" = one process or a SLURM/Open MPI launch; "auto" = JAX finds the cluster (Cloud TPU).
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, local_device_ids="", timeout_s=300))

    if arg == "tiny":
        c.model.update(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128, dtype="float32", remat_policy="none")
        c.data.update(source="synthetic", seq_len=32)
        c.init.from_scratch = True
        c.optim.update(lr=3e-3, schedule="constant")
        c.train.update(global_batch_size=8, num_steps=6, log_every=2, eval_every=0, checkpoint_every=3,
                       async_checkpoints=False, progress=False, loss_chunk=8, loss_mode="global")
    elif arg == "demo":
        # The phantom demo (python -m llmcxr_jax.demo fills in data_dir, tokenizer, vocab_size, vqgan and steps).
        # Rotary on every head dimension and a 2e-3 peak: measured to make a from-scratch LM start reading its
        # image input within the demo's budget (NOTES.md); dolly keeps rotary_pct=0.25. Adam b2 0.95, as LMs
        # trained from scratch usually take (the original fine-tunes with HF's 0.999).
        c.model.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                       max_position_embeddings=512, rotary_pct=1.0, dtype="float32", remat_policy="none",
                       scan_layers=False)
        c.data.update(dolly_builder="", lengths=(144, 152, 160, 192, 224), max_length=224, report_dropout=0.1)
        c.init.from_scratch = True  # stage 1 of the demo; its stage 2 starts from stage 1's workdir
        c.vqgan.update(grid=8, num_codes=256)
        c.optim.update(lr=2e-3, schedule="cosine", warmup_steps=20, end_lr_fraction=0.1, b2=0.95)
        c.train.update(global_batch_size=16, num_steps=500, log_every=25, eval_every=0, checkpoint_every=250,
                       epoch_checkpoints=0, async_checkpoints=False, loss_chunk=0, loss_mode="global")
    elif arg:
        raise ValueError(f"configs/stage1.py: unknown variant {arg!r}; expected '', 'demo' or 'tiny'")
    return c
