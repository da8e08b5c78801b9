"""VQ-GAN training (taming-transformers' VQModel + VQLPIPSWithDiscriminator, SPEC §13) on the shared loop.

    python -m llmcxr_jax.train_vqgan --config configs/vqgan.py --workdir runs/vqgan \
        --config.data.data_dir=/path/to/tfds --config.lpips.vgg16_path=vgg16.pth --config.lpips.heads_path=vgg.pth

Fine-tune LLM-CXR's tokenizer instead of training from scratch: `--config.init.vqgan_dir=DIR` with DIR written by
`python -m vqgan_flax.convert` (its loss.safetensors supplies the discriminator and LPIPS when it holds them).

Variants (`--config configs/vqgan.py:NAME`): `` (LLM-CXR's f16 model, taming's loss defaults from
custom_vqgan.yaml), `demo` (64² phantoms → 8×8 codes, no GAN; a few minutes on 2 CPU cores), `tiny` (tests).
"""

import ml_collections

F16 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4),
           num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, n_embed=1024, embed_dim=256)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(F16))
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=10000, disc_weight=0.8, disc_factor=1.0, codebook_weight=1.0, perceptual_weight=1.0,
        perceptual_dropout=0.5, disc_num_layers=3, disc_ndf=64, disc_in_channels=3, beta=0.25, legacy_beta=True))
    # Fresh run: random (taming's init), or fine-tuning from a converted/exported VQ-GAN directory.
    c.init = ml_collections.ConfigDict(dict(vqgan_dir=""))
    # LPIPS weights (nothing is downloaded): a VQ-GAN dir whose loss.safetensors holds loss.perceptual_loss.*
    # (default: init.vqgan_dir), or torchvision's VGG16 state dict + the lpips package's vgg.pth.
    c.lpips = ml_collections.ConfigDict(dict(vqgan_dir="", vgg16_path="", heads_path=""))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds",  # "tfds" (cxr_images or cxr_phantoms builders) or "phantoms" (generated in memory)
        builder="cxr_images/llmcxr256", data_dir="", train_split="train",
        eval_split="validation",  # cxr_phantoms calls it "test"
        num_images=0, num_eval_images=0,  # phantoms only
        eval_batches=16, preview_images=8))
    c.optim = ml_collections.ConfigDict(dict(base_lr=4.5e-6, scale_lr=True, b1=0.5, b2=0.9, eps=1e-8))
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
    c.train = ml_collections.ConfigDict(dict(
        # micro_batches k > 1: both optimizers step once per k micro-batches (Lightning's accumulate_grad_batches);
        # global_batch_size counts all k of them, so the learning rate scales as taming's main.py scales it.
        global_batch_size=16, micro_batches=1, num_steps=200_000, log_every=50, eval_every=2000, image_every=2000,
        checkpoint_every=2000, keep_checkpoints=5, async_checkpoints=True, progress=True, dead_code_steps=1000,
        restart_dead_codes=False))  # True: codes unused for dead_code_steps move onto batch latents (not taming)
    c.export_dir = ""  # "" = WORKDIR/export
    # coordinator_address: "" = one process or a SLURM/Open MPI launch; "auto" = JAX finds the cluster (Cloud TPU).
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, local_device_ids="", timeout_s=300))

    if arg == "tiny":
        c.model.update(z_channels=32, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                       n_embed=64, embed_dim=32)
        c.loss.update(disc_start=4, perceptual_weight=0.0, disc_ndf=16)
        c.data.update(source="phantoms", num_images=64, num_eval_images=16, eval_batches=1, preview_images=4)
        c.optim.update(base_lr=5e-4, scale_lr=False)
        c.train.update(global_batch_size=8, num_steps=6, log_every=2, eval_every=0, image_every=0,
                       checkpoint_every=3, async_checkpoints=False, progress=False, dead_code_steps=4)
    elif arg == "demo":
        # L1 + codebook loss only: LPIPS weights cannot ship with the repository, and at 64² the PatchGAN term
        # degraded reconstructions within its first 50 steps (NOTES.md); disc_factor 0 skips D altogether.
        c.model.update(z_channels=64, resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(8,), n_embed=256, embed_dim=64)
        c.loss.update(disc_start=0, disc_factor=0.0, perceptual_weight=0.0, disc_ndf=32)
        c.data.update(source="phantoms", num_images=2000, num_eval_images=64, eval_batches=8, preview_images=8)
        c.optim.update(base_lr=1e-3, scale_lr=False)  # 2e-4 lost every pacemaker in 300 steps (NOTES.md)
        c.train.update(global_batch_size=8, num_steps=300, log_every=25, eval_every=150, image_every=50,
                       checkpoint_every=150, dead_code_steps=100)
    elif arg:
        raise ValueError(f"configs/vqgan.py: unknown variant {arg!r}; expected '', 'demo' or 'tiny'")
    return c
