"""enat against the paper's own ENAT code (LeapLabTHU/ENAT), same model, same machine.

The reference is a checkout given by path and imported at run time (nothing of it is in
this repository). The bench builds the reference `DiT` at a preset's size (ENAT-S by
default), perturbs its weights so every block matters (the stock adaLN-Zero init makes
each block the identity), converts them with enat.models.convert, and checks that both
models compute the same function: logits and features of a plain step and of a reuse step,
and the sampler's masked count per step. Then it times, interleaved (the order alternates
every round) so that both see the same machine load:
- generation: the reference's own sampler (NATSchedule.generate, tokens only) against
  enat.models.generate with the same schedule (steps, temperatures, CFG ramp);
- training: forward + backward of the masked-token loss, in fp32 and under bf16 autocast.
Ratios are enat's speed over the reference's (> 1: enat is faster), from median times.

    .venv/bin/python bench/vs_reference.py --reference /path/to/ENAT --json [--repeats 7]

Without --reference it says so and exits 0. Tested at commit 550f22c of the reference; its
vendored timm imports with this venv's torch and torchvision, nothing else is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from enat.models.convert import config_from_reference, load_reference_checkpoint
from enat.models.enat import ReuseState
from enat.models.generate import generate
from enat.models.masking import masked_token_loss
from enat.models.strategy import Strategy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
# The reference sampler's knobs (its train.py arguments); both samplers get these values.
SAMPLER = {"cfg_scale": 2.0, "mask_temp": 3.0, "samp_temp": 1.0}


class ReferenceError(Exception):
    """The --reference folder is not a usable ENAT checkout."""


def import_reference(folder: Path) -> tuple[object, object]:
    """(libs.models, libs.nat_misc) of the checkout at `folder`; its vendored timm comes first."""
    if not (folder / "libs" / "models.py").is_file() or not (folder / "timm").is_dir():
        raise ReferenceError(f"{folder} is not a LeapLabTHU/ENAT checkout (no libs/models.py and timm/)")
    sys.path.insert(0, str(folder.resolve()))
    try:
        import libs.models as models
        import libs.nat_misc as nat_misc
    except ImportError as error:
        raise ReferenceError(f"cannot import the reference from {folder}: {error}") from None
    return models, nat_misc


def reference_arguments(preset: str) -> tuple[dict, list[int]]:
    """The reference DiT's constructor arguments and enc_dec for one of our presets."""
    config = yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text())
    if config.get("kind") != "enat":
        raise ReferenceError(f"preset {preset} is not an ENAT model")
    args = {"input_size": config["grid_size"], "hidden_size": config["width"], "num_heads": config["heads"],
            "mlp_ratio": config["mlp_ratio"], "num_classes": config["num_classes"],
            "codebook_size": config["codebook_size"], "class_dropout_prob": 0.1}
    return args, [config["encoder_depth"], config["decoder_depth"]]


def perturb_(model: nn.Module, seed: int = 1) -> None:
    """Gaussian noise on every parameter (fan_in**-0.5 for matrices, 0.2 for the rest), so a
    comparison cannot pass through identity blocks or zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            matrix = parameter.dim() >= 2 and not name.endswith("bias")
            std = math.prod(parameter.shape[1:]) ** -0.5 if matrix else 0.2
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def build_pair(models, preset: str) -> tuple[nn.Module, nn.Module]:
    """(reference DiT, our ENAT with the same weights through the converter), both in eval mode."""
    args, enc_dec = reference_arguments(preset)
    torch.manual_seed(0)
    reference = models.DiT(**args, args=Namespace(enc_dec=enc_dec))
    perturb_(reference)
    ours = load_reference_checkpoint("enat", reference.state_dict(),
                                     config_from_reference("enat", args, {"enc_dec": enc_dec}))
    return reference.eval(), ours.eval()


# A step function maps (ids [B, L], labels [B], prev or None) to (logits, feat, masking).
Step = Callable[[Tensor, Tensor, object], tuple[Tensor, Tensor, Tensor]]


def reference_step(dit: nn.Module) -> Step:
    def step(ids, labels, prev):
        prev_dict = None if prev is None else {"feat": prev[1], "masking": prev[2]}
        out = dit(ids, context=labels[:, None], prev_dict=prev_dict, return_dict=True)
        return out["logits"], out["feat"], out["masking"]
    return step


def enat_step(model: nn.Module) -> Step:
    def step(ids, labels, prev):
        out = model(ids, labels, None if prev is None else ReuseState(prev[1], prev[2]))
        return out.logits, out.feat, out.masking
    return step


def max_difference(first: Step, second: Step, length: int, mask_id: int, num_classes: int,
                   batch: int = 4, seed: int = 0) -> dict:
    """Largest |difference| of logits and feat over a plain step (60% masked) and a reuse step
    (30% masked, each row's set a subset of the first); masks must agree exactly."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, mask_id, (batch, length), generator=generator)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    labels = torch.randint(0, num_classes + 1, (batch,), generator=generator)  # may be the null class
    result, prev = {"logits": 0.0, "feat": 0.0}, (None, None)
    with torch.no_grad():
        for share in (0.6, 0.3):
            masked = ids.clone().scatter_(1, order[:, : int(share * length)], mask_id)
            outputs = [step(masked, labels, prev[k]) for k, step in enumerate((first, second))]
            (logits_a, feat_a, mask_a), (logits_b, feat_b, mask_b) = outputs
            if not torch.equal(mask_a, mask_b):
                raise AssertionError("the two models disagree on which tokens are masked")
            result["logits"] = max(result["logits"], float((logits_a - logits_b).abs().max()))
            result["feat"] = max(result["feat"], float((feat_a - feat_b).abs().max()))
            prev = tuple(outputs)
    return result


def interleaved(contestants: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contestant, the calls interleaved round by round with
    the order reversed every other round (a load change hits both alike)."""
    names = list(contestants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            contestants[name]()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def speed_ratio(times: dict[str, float]) -> float:
    """enat's speed over the reference's: reference time / enat time."""
    return times["reference"] / times["enat"]


def matching_strategy(steps: int) -> Strategy:
    """Our strategy for the reference sampler's fixed schedule (cosine ratios, temperatures
    decaying as 1 - (k+1)/T, CFG scale (k/T) * cfg_scale, lagging one step)."""
    ratios = [(k + 1) / steps for k in range(steps)]
    return Strategy(
        mask_ratios=tuple(math.cos(math.pi / 2 * r) for r in ratios[:-1]),
        mask_temperatures=tuple(SAMPLER["mask_temp"] * (1 - r) for r in ratios[:-1]),
        sample_temperatures=tuple(max(SAMPLER["samp_temp"] * (1 - r), 1e-3) for r in ratios),
        cfg_scales=tuple(SAMPLER["cfg_scale"] * k / steps for k in range(steps)))


def reference_masked_counts(length: int, steps: int) -> list[int]:
    """Tokens the reference sampler leaves masked after each step: floor(L * cos(pi/2 (k+1)/T))."""
    return [math.floor(length * math.cos(math.pi / 2 * (k + 1) / steps)) for k in range(steps)]


def generation_contestants(nat_misc, reference: nn.Module, ours: nn.Module, batch: int,
                           steps: int) -> dict[str, Callable[[], object]]:
    import numpy as np

    config = ours.config
    labels = torch.arange(batch) % config.num_classes
    schedule = nat_misc.NATSchedule(config.codebook_size, "cpu", args=Namespace(**SAMPLER))
    strategy = matching_strategy(steps)
    counts = strategy.masked_counts(config.seq_len)
    if counts != reference_masked_counts(config.seq_len, steps)[:-1] + [0]:
        raise AssertionError(f"masked counts differ: ours {counts}, the reference's "
                             f"{reference_masked_counts(config.seq_len, steps)}")
    seeds = iter(range(10**6))

    def run_reference():
        np.random.seed(next(seeds))
        torch.manual_seed(next(seeds))
        return schedule.generate(steps, batch, reference, lambda z: z, config.grid_size,
                                 context=labels[:, None])

    def run_enat():
        return generate(ours, labels, strategy, torch.Generator().manual_seed(next(seeds)))

    return {"reference": run_reference, "enat": run_enat}


def training_contestants(nat_misc, reference: nn.Module, ours: nn.Module, batch: int,
                         precision: str) -> dict[str, Callable[[], object]]:
    """Forward + backward of the masked-token loss on one fixed batch (both in train mode)."""
    config = ours.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.codebook_size, (batch, config.seq_len), generator=generator)
    order = torch.rand(batch, config.seq_len, generator=generator).argsort(dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, order[:, : int(0.8 * config.seq_len)], True)
    masked = torch.where(mask, config.mask_id, ids)
    labels = torch.arange(batch) % config.num_classes
    schedule = nat_misc.NATSchedule(config.codebook_size, "cpu", args=Namespace(**SAMPLER))

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run_reference():
        reference.zero_grad(set_to_none=True)
        with autocast():
            pred = reference(masked, context=labels[:, None])
            loss = schedule.loss(pred, torch.where(mask, ids, schedule.ignore_ind))
        loss.backward()

    def run_enat():
        ours.zero_grad(set_to_none=True)
        with autocast():
            loss = masked_token_loss(ours(masked, labels).logits, ids, mask, 0.1)
        loss.backward()

    return {"reference": run_reference, "enat": run_enat}


def run(folder: Path, preset: str, steps: int, gen_batch: int, train_batch: int, repeats: int) -> dict:
    models, nat_misc = import_reference(folder)
    reference, ours = build_pair(models, preset)
    config = ours.config
    difference = max_difference(reference_step(reference), enat_step(ours), config.seq_len,
                                config.mask_id, config.num_classes)
    result = {"preset": preset, "threads": torch.get_num_threads(), "repeats": repeats,
              "max_abs_difference": difference, "steps": steps, "gen_batch": gen_batch,
              "train_batch": train_batch}
    times = interleaved(generation_contestants(nat_misc, reference, ours, gen_batch, steps), repeats)
    result["generate_s"] = times
    result["generate_speed_ratio"] = speed_ratio(times)
    reference.train(), ours.train()
    for precision in ("fp32", "bf16"):
        times = interleaved(training_contestants(nat_misc, reference, ours, train_batch, precision), repeats)
        result[f"train_{precision}_s"] = times
        result[f"train_{precision}_speed_ratio"] = speed_ratio(times)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="a checkout of LeapLabTHU/ENAT")
    parser.add_argument("--preset", default="enat-s")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.reference is None:
        print("vs_reference: no --reference checkout of LeapLabTHU/ENAT given; nothing to compare")
        return 0
    torch.set_num_threads(args.threads)
    try:
        result = run(args.reference, args.preset, args.steps, args.gen_batch, args.train_batch, args.repeats)
    except ReferenceError as error:
        print(f"vs_reference: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
