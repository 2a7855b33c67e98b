"""The measurements of bench/gpu.py, one function each; gpu.py chooses sizes and writes the JSON.

Every measurement goes through the project's own code: golden pairs from enat.models.golden,
the trainer's `Trainer` (its DeepSpeed engine, micro-step, EMA and FLOP count), the
evaluation sampler's `generate_images` (generation + VQ decode to uint8), the VQGAN's
encode/decode. Rates are timed after a warm-up, with the device synchronised around the clock.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

import torch

from enat.models import ReuseState, build_model
from enat.models.golden import ReferenceFixtures, fixture_folder, score


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def release(device: torch.device) -> None:
    """Free what the previous measurement left before this one allocates (ENAT-L's weights,
    EMA and optimizer state take ~12 GB); each measurement calls it first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def items_per_second(run: Callable[[int], object], items: int, repeats: int, device: torch.device) -> float:
    """`items` / seconds of `run(i)`, over `repeats` calls after one warm-up call."""
    run(-1)
    synchronize(device)
    started = time.perf_counter()
    for index in range(repeats):
        run(index)
    synchronize(device)
    return items * repeats / (time.perf_counter() - started)


# -- golden fixtures ---------------------------------------------------------------------------

def golden(device: torch.device, bf16: bool, rtol: float | None, atol: float | None,
           id_mismatch_allowed: float) -> dict:
    """Every golden pair on `device`, fp32 (TF32 off: it is not fp32) or under bf16 autocast;
    None tolerances take the fixtures' own."""
    fixtures = ReferenceFixtures(fixture_folder(), device)
    rtol = fixtures.tolerance["rtol"] if rtol is None else rtol
    atol = fixtures.tolerance["atol"] if atol is None else atol
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with autocast(device) if bf16 else contextlib.nullcontext():
            scores = {label: score(ours, reference, rtol, atol, id_mismatch_allowed)
                      for label, (_, ours, reference) in fixtures.all_pairs()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"rtol": rtol, "atol": atol, "ids_mismatch_share_allowed": id_mismatch_allowed,
            "outputs_checked": len(scores), "outputs_failed": sum(not s.passed for s in scores.values()),
            "max_abs_error": max(s.max_abs_error for s in scores.values()),
            "max_ids_mismatch_share": max(s.mismatch_share for s in scores.values()),
            "failed": sorted(label for label, s in scores.items() if not s.passed),
            "passed": all(s.passed for s in scores.values())}


# -- which SDPA kernel the models run ----------------------------------------------------------

# aten ops torch's scaled_dot_product_attention dispatches to, by backend.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(config, device: torch.device) -> dict:
    """The attention kernels one bf16 forward of a model of `config` runs, read from the
    profiler (so it is what runs, not what should). ENAT's forward takes a previous step, so
    its encoder attends to reused features and its decoder to encoded ones, as in training."""
    release(device)
    with torch.device(device):
        model = build_model(config).eval()
    height, width = config.grid_shape
    length, batch = height * width, 2
    ids = torch.randint(0, config.codebook_size, (batch, length), device=device)
    ids[:, : length // 2] = config.mask_id
    cond = torch.zeros(batch, dtype=torch.long, device=device)
    args = (ids, cond)
    if config.kind == "enat":
        prev_masking = torch.zeros_like(ids, dtype=torch.bool)
        prev_masking[:, : 3 * length // 4] = True
        args += (ReuseState(torch.zeros(batch, length, config.width, device=device), prev_masking),)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.no_grad(), autocast(device):
            model(*args)
    ran = sorted({SDPA_OPS[event.name] for event in profile.events() if event.name in SDPA_OPS})
    return {"heads": config.heads, "head_dim": config.width // config.heads, "tokens": length,
            "backends": ran or ["none: plain matmul + softmax (models.layers.attend off GPUs)"]}


# -- training ----------------------------------------------------------------------------------

def train_rates(model_config, data_url: str, root: str, batch_size: int, zero_stage: int,
                compile_backend: str | None, steps: int, peak_flops: float, device: torch.device) -> dict:
    """samples/s and MFU of the trainer's own step (DeepSpeed engine with one rank, masking,
    ENAT's reuse branch through the EMA, bf16 autocast, EMA update) on in-memory batches.

    The warm-up runs the same step numbers as the timed pass: a step's mask ratio comes from
    its number, so every token count the timed steps see is compiled before the clock runs."""
    from enat.trainer.config import DataConfig, TrainConfig
    from enat.trainer.data import Batch
    from enat.trainer.loop import Trainer

    config = TrainConfig(run="bench-gpu", root=root, model=model_config, data=DataConfig(url=data_url),
                         steps=steps, batch_size=batch_size, zero_stage=zero_stage, precision="bf16",
                         warmup_steps=0, tracking=False)
    release(device)
    started = time.perf_counter()
    try:
        trainer = Trainer(config)
        flops_per_sample = trainer.flops_per_sample  # the trainer's own count (trainer/metrics.py)
        if compile_backend:
            # In place (nn.Module.compile): the engine and the EMA keep their modules.
            trainer.engine.module.compile(backend=compile_backend)
            trainer.ema.model.compile(backend=compile_backend)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model_config.codebook_size, (batch_size, model_config.seq_len),
                            generator=generator)
        labels = torch.randint(0, model_config.num_classes, (batch_size,), generator=generator)
        batch = Batch(ids, labels).to(trainer.device)
        for step in range(1, steps + 1):
            trainer.train_step([batch], step)
        synchronize(device)
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(1, steps + 1):
            trainer.train_step([batch], step)
        synchronize(device)
        elapsed = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return {"error": f"out of memory at batch {batch_size}"}
    samples_per_s = steps * batch_size / elapsed
    return {"samples_per_s": samples_per_s, "step_time_s": elapsed / steps, "build_and_warmup_s": warmup,
            "train_gflops_per_sample": flops_per_sample / 1e9,
            "mfu_vs_measured_bf16_peak": samples_per_s * flops_per_sample / peak_flops}


# -- generation and the tokenizer --------------------------------------------------------------

def generation_rate(model_config, tokenizer_config, batch: int, reuse: bool, steps: int, repeats: int,
                    device: torch.device) -> float:
    """Images/s of the evaluation sampler (generation with CFG + VQ decode to uint8)."""
    from enat.evaluation.sampling import Conditions, Sampler, class_balanced_labels, generate_images
    from enat.models.strategy import Strategy

    release(device)
    with torch.device(device):
        model, tokenizer = build_model(model_config).eval(), build_model(tokenizer_config).eval()
    sampler = Sampler(model, "bench", "", tokenizer, "bench", "", device, torch.bfloat16, reuse)
    conditions = Conditions(labels=class_balanced_labels(batch, model_config.num_classes))
    strategy = Strategy.default(steps)
    return items_per_second(lambda index: generate_images(sampler, strategy, conditions, 0, index),
                            batch, repeats, device)


def tokenizer_rates(config, batch: int, repeats: int, device: torch.device) -> dict:
    """Encode (images -> ids) and decode (ids -> images) images/s under bf16 autocast."""
    release(device)
    with torch.device(device):
        model = build_model(config).eval()
    size = config.image_size
    images = torch.rand(batch, 3, size, size, device=device)
    ids = torch.randint(0, config.codebook_size, (batch, *config.grid_shape), device=device)
    with torch.no_grad(), autocast(device):
        encode = items_per_second(lambda _: model.encode(images), batch, repeats, device)
        decode = items_per_second(lambda _: model.decode(ids), batch, repeats, device)
    return {"encode_images_per_s": encode, "decode_images_per_s": decode}
