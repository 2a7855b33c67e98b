"""Tokenizer variants for generation: reconstruction (PSNR, usage) beside predictability.

Each variant is the demo tokenizer preset with a few keys changed, trained with
`enat tokenizer train`'s own code for the same number of steps; its ids of the whole
labelled image set then go through trainer/token_predictability.py (unigram entropy and
the held-out loss of one fixed small generator). One JSON line per variant, then a table:

    .venv/bin/python bench/tokenizer_variants.py --data demo-out/data/imagenet --json out.json
    .venv/bin/python bench/tokenizer_variants.py --only fsq-4444 vq-256-restarts

Variants run one after another on one thread each (`--jobs 2` runs two at once).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

VARIANTS: dict[str, dict] = {
    # today's demo tokenizer: 256 learned unit-sphere codes, dead-code restarts
    "vq-256-restarts": {},
    "vq-256-no-restarts": {"train.dead_code_steps": 0},
    "vq-64-no-restarts": {"codebook_size": 64, "train.dead_code_steps": 0},
    "vq-64-restarts": {"codebook_size": 64},
    "fsq-4444": {"quantizer": "fsq", "fsq_levels": (4, 4, 4, 4), "codebook_size": 256},
    "fsq-555": {"quantizer": "fsq", "fsq_levels": (5, 5, 5), "code_dim": 3, "codebook_size": 125},
    "fsq-444": {"quantizer": "fsq", "fsq_levels": (4, 4, 4), "code_dim": 3, "codebook_size": 64},
    "fsq-865": {"quantizer": "fsq", "fsq_levels": (8, 6, 5), "code_dim": 3, "codebook_size": 240},
}
FSQ_OFF = {"l2_normalize_codes": False}


def run_variant(name: str, data: str, work: str, steps: int, norm_groups: int, probe_steps: int) -> dict:
    import torch

    from enat.cluster.config import preset_path, read_yaml
    from enat.evaluation.image_sets import ImageSet, read_all
    from enat.models import VQGANConfig, build_config
    from enat.models.config import config_to_dict
    from enat.pipelines import model_io
    from enat.trainer.config import TokenizerTrainConfig
    from enat.trainer.token_predictability import ProbeConfig, measure
    from enat.trainer.tokenizer_train import train_tokenizer

    torch.set_num_threads(1)
    overrides = dict(VARIANTS[name])
    train_keys = {k.removeprefix("train."): overrides.pop(k)
                  for k in list(overrides) if k.startswith("train.")}
    if overrides.get("quantizer") == "fsq":
        overrides.update(FSQ_OFF)
    preset = {**read_yaml(preset_path("models/tiny-tokenizer")), **overrides, "norm_groups": norm_groups}
    model_config: VQGANConfig = build_config(preset)
    # Runs live under `work`, so a rerun re-measures a finished variant without training it.
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath(work)}/mlflow.db")
    run = f"{name}-g{norm_groups}-s{steps}"
    config = TokenizerTrainConfig(source=os.path.join(data, "train"), root=work, run=run, steps=steps,
                                  **train_keys)
    started = time.monotonic()
    result = train_tokenizer(config, model_config, progress=False)
    seconds = time.monotonic() - started
    tokenizer = model_io.load_model(result.export_url).model
    images, labels = read_all(ImageSet(f"imagenet:{data}", model_config.image_size))
    with torch.no_grad():
        pixels = torch.from_numpy(images).float() / 255  # uint8 [N, 3, H, W]
        ids = torch.cat([tokenizer.encode(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    labels = torch.as_tensor(labels)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    held, train = order[: len(ids) // 10], order[len(ids) // 10 :]
    figures = measure(ids[train], labels[train], ids[held], labels[held], model_config.codebook_size,
                      int(labels.max()) + 1, ProbeConfig(steps=probe_steps))
    evaluation = result.evaluation
    return {"variant": name, "model": config_to_dict(model_config), "steps": steps,
            "psnr": round(evaluation.psnr, 2), "codebook_usage": round(evaluation.codebook_usage, 3),
            "perplexity": round(evaluation.perplexity, 1),
            "unigram_entropy": round(figures.unigram_entropy, 3),
            "uniform_entropy": round(figures.uniform_entropy, 3),
            "probe_loss": round(figures.probe_loss, 3), "probe_gain": round(figures.gain, 3),
            "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo-out/data/imagenet",
                        help="ImageNet-style tree (train/<class>/...)")
    parser.add_argument("--work", default="/tmp/enat-tokenizer-variants",
                        help="runs kept here (reruns reuse them)")
    parser.add_argument("--steps", type=int, default=1600, help="tokenizer steps of every variant")
    parser.add_argument("--norm-groups", type=int, default=32)
    parser.add_argument("--probe-steps", type=int, default=600)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", default=None, help="write all results to this file")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_variant, n, args.data, args.work, args.steps, args.norm_groups,
                               args.probe_steps) for n in names]
        results = []
        for future in futures:
            results.append(future.result())
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'variant':22} {'PSNR':>6} {'usage':>6} {'H1':>6} {'lnK':>6} {'probe':>6} {'gain':>6}")
    for r in results:
        print(f"{r['variant']:22} {r['psnr']:6.2f} {r['codebook_usage']:6.2f} "
              f"{r['unigram_entropy']:6.3f} {r['uniform_entropy']:6.3f} {r['probe_loss']:6.3f} "
              f"{r['probe_gain']:6.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
