"""The demo's summary: what each stage measured, as a table (markdown) and as JSON, and
one picture of real against generated emoji.

Everything is read back from the stages' own outputs (metrics.json of the evaluations,
the watcher's records, the searches' summaries and state), so the summary of a resumed
demo is the same as that of an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from enat.cluster.demo_config import DemoConfig, DemoPaths
from enat.pipelines import runs, storage

# Columns of the comparison picture: (title, evaluation whose grid it shows; None = real).
PICTURE_COLUMNS = (("real", None), ("ENAT 8 steps", "default-8"), ("NAT 8 steps", "nat-default-8"),
                   ("text to image", "text"))


def _json(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def search_figures(url: str) -> dict[str, Any]:
    """Evaluations run and wall time of the search whose outputs are at `url`."""
    summary, state = _json(storage.join(url, "summary.json")), _json(storage.join(url, "search_state.json"))
    # A full update is its base point and one point per direction of its gradient (4T-2
    # coordinates, or 4 kinds); the last step's point alone is one (no gradient).
    evaluations = sum(1 + len(update.get("gradient") or [])
                      for update in state.get("history", [])) + len(state.get("results", {}))
    return {"evaluations": evaluations, "wall_s": summary.get("wall_s"),
            "best_fid_search_seeds": summary.get("best_fid_search_seeds"),
            "strategy": summary.get("strategy_url")}


def training_figures(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    """Each generator's last training loss (the last logging window, with the preset's label
    smoothing) and val_loss (EMA weights, no smoothing), beside the unigram entropy of the training ids:
    a model whose loss sits near that entropy has learned only how often each id occurs."""
    import math

    import numpy as np
    import torch

    from enat.pipelines.shards import read_manifest, read_shard
    from enat.trainer.token_predictability import unigram_entropy

    figures: dict[str, Any] = {}
    if storage.exists(storage.join(paths.tokens, "manifest.json")):
        manifest = read_manifest(paths.tokens)
        ids = [sample.tokens.astype(np.int64) for url in manifest.shard_urls(paths.tokens)
               for sample in read_shard(url)]
        figures["unigram_entropy"] = unigram_entropy(torch.from_numpy(np.stack(ids)), manifest.codebook_size)
        figures["uniform_entropy"] = math.log(manifest.codebook_size)
    for name, run in (("enat", paths.run), ("nat", paths.nat_run)):
        marker = storage.join(paths.checkpoint(run, config.train_steps), runs.MARKER)
        if metrics := _json(marker).get("metrics"):
            figures[name] = {"loss": metrics.get("loss"), "val_loss": metrics.get("val_loss")}
    return figures


def collect(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    from enat.evaluation.watch import read_records

    rows = ["default-8", *[f"searched-{steps}" for steps in config.search_steps], "nat-default-8", "text"]
    evals = {name: _json(os.path.join(paths.evals, name, "metrics.json")) for name in rows}
    accuracy = next((e["classifier_real_accuracy"] for e in evals.values()
                     if e.get("classifier_real_accuracy") is not None), None)
    return {
        "floor": _json(paths.floor),
        "final": evals,
        "classifier_real_accuracy": accuracy,
        "training": training_figures(config, paths),
        "watch": {step: record.get("fid") for step, record in sorted(read_records(paths.run).items())},
        "search": {steps: search_figures(paths.search(steps)) for steps in config.search_steps},
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render(figures: dict[str, Any], mlflow_uri: str, wall_s: float, picture: str | None = None) -> str:
    final, floor, accuracy = figures["final"], figures["floor"], figures["classifier_real_accuracy"]
    extractor = next((e.get("extractor_id") for e in final.values() if e), "?")
    lines = [f"## enat demo summary (domain FID, extractor {extractor}, fresh seeds)", "",
             "| row | steps | samples | FID | KID | class consistency | GFLOPs/image (+decoder) "
             "| images/s | grid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in final.items():
        if not result:
            continue
        lines.append(f"| {name} | {result['steps']} | {result.get('num_samples')} "
                     f"| {_fmt(result.get('fid'))} "
                     f"| {_fmt(result.get('kid'), '.4f')} | {_fmt(result.get('class_consistency'))} "
                     f"| {_fmt(result.get('gflops_per_image'), '.4f')} "
                     f"({_fmt(result.get('gflops_per_image_with_decoder'), '.4f')}) "
                     f"| {_fmt(result.get('images_per_s'), '.1f')} | {result['grid']} |")
    if floor:
        lines.append(f"| real vs real (floor) | - "
                     f"| {floor.get('num_samples')} vs {floor.get('reference_images')} "
                     f"| {_fmt(floor.get('fid'))} | {_fmt(floor.get('kid'), '.4f')} "
                     f"| {_fmt(accuracy)} (classifier, held-out real) | - | - | - |")
    default, searched = final.get("default-8", {}).get("fid"), final.get("searched-8", {}).get("fid")
    if default and searched:
        lines += ["", f"searched 8-step strategy vs the cosine default: FID {searched:.3f} vs {default:.3f} "
                      f"({100 * (default - searched) / default:+.1f}% better)"]
    nat = final.get("nat-default-8", {})
    if default and nat.get("fid"):
        enat = final["default-8"]
        pair = lambda key, spec=".3f": f"{_fmt(enat.get(key), spec)} vs {_fmt(nat.get(key), spec)}"  # noqa: E731
        lines.append(f"ENAT vs NAT (same width, depth, data, steps; 8-step default): FID {pair('fid')}, "
                     f"class consistency {pair('class_consistency')}, GFLOPs/image "
                     f"{pair('gflops_per_image', '.4f')}, images/s {pair('images_per_s', '.1f')}")
    training = figures.get("training", {})
    for name in ("enat", "nat"):
        if name in training and "unigram_entropy" in training:
            run = training[name]
            lines.append(f"{name.upper()} training: loss {_fmt(run['loss'])} (last logging window), "
                         f"val_loss {_fmt(run['val_loss'])} (EMA, no smoothing) vs the unigram entropy of "
                         f"the training ids {training['unigram_entropy']:.3f} (uniform "
                         f"{training['uniform_entropy']:.3f}) nats per token")
    for steps, search in figures["search"].items():
        if search["evaluations"]:
            lines.append(f"AutoNAT search, {steps} steps: {search['evaluations']} evaluations, "
                         f"{_fmt(search['wall_s'], '.0f')} s; strategy {search['strategy']}")
    if figures["watch"]:
        curve = ", ".join(f"step {step}: {_fmt(fid)}" for step, fid in figures["watch"].items())
        lines.append(f"FID as checkpoints landed (eval watch, fewer samples): {curve}")
    if picture:
        lines.append(f"real vs generated, one row per class ({', '.join(t for t, _ in PICTURE_COLUMNS)}): "
                     f"{picture}")
    lines += ["", f"demo wall time {wall_s / 60:.1f} min",
              f"open MLflow: .venv/bin/mlflow ui --backend-store-uri {mlflow_uri} --port 5000"]
    return "\n".join(lines)


def comparison_picture(paths: DemoPaths, out: str) -> str | None:
    """Real emoji beside the generated grids, one row per class, saved as a PNG at `out`."""
    import torch
    from PIL import Image, ImageDraw

    from enat.evaluation.image_sets import ImageSet, read_all
    from enat.evaluation.sampling import GridCollector

    panels = []
    for title, name in PICTURE_COLUMNS:
        if name is None:
            images, labels = read_all(ImageSet(f"imagenet:{paths.images}", 32))
            collector = GridCollector()
            collector.add(torch.from_numpy(images), labels)
            panel = collector.image()
        else:
            grid = os.path.join(paths.evals, name, "grid.png")
            if not os.path.exists(grid):
                continue
            with Image.open(io.BytesIO(storage.read_bytes(grid))) as image:
                panel = image.convert("RGB")
        panels.append((title, panel))
    if len(panels) < 2:
        return None
    gap, header = 12, 14
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, header + max(p.height for _, p in panels)), "white")
    draw, left = ImageDraw.Draw(canvas), 0
    for title, panel in panels:
        draw.text((left + 2, 1), title, fill="black")
        canvas.paste(panel, (left, header))
        left += panel.width + gap
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(out)
    return out


def write_summary(config: DemoConfig, paths: DemoPaths, mlflow_uri: str, wall_s: float,
                  stage_seconds: dict[str, float] | None = None) -> str:
    figures = collect(config, paths)
    os.makedirs(config.work_dir, exist_ok=True)
    picture = comparison_picture(paths, os.path.join(config.work_dir, "real-vs-generated.png"))
    table = render(figures, mlflow_uri, wall_s, picture)
    seconds = {k: round(v, 1) for k, v in (stage_seconds or {}).items()}
    table += "\n\nstage seconds:\n" + "\n".join(f"- {k}: {v:.0f}" for k, v in seconds.items())
    with open(os.path.join(config.work_dir, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(config.work_dir, "summary.json"), "w") as handle:
        json.dump({**figures, "demo_seconds": wall_s, "stage_seconds": seconds, "picture": picture},
                  handle, indent=1, default=str)
    return table
