"""The demo's summary: what each stage measured, as a table (markdown) and as JSON.

Everything is read back from the stages' own outputs (metrics.json of the evaluations,
the watcher's records, the searches' summaries and state), so the summary of a resumed
demo is the same as that of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from pipelines import storage

if TYPE_CHECKING:
    from cluster.demo import DemoConfig, DemoPaths


def _json(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def search_figures(url: str, steps: int) -> dict[str, Any]:
    """Evaluations run and wall time of the search whose outputs are at `url`."""
    summary, state = _json(storage.join(url, "summary.json")), _json(storage.join(url, "search_state.json"))
    evaluations = len(state.get("history", [])) * (4 * steps - 1) + len(state.get("results", {}))
    return {"evaluations": evaluations, "wall_s": summary.get("wall_s"),
            "best_fid_search_seeds": summary.get("best_fid_search_seeds"),
            "strategy": summary.get("strategy_url")}


def collect(config: DemoConfig, paths: DemoPaths) -> dict[str, Any]:
    from evaluation.watch import read_records

    evals = {name: _json(os.path.join(paths.evals, name, "metrics.json"))
             for name in ("default-8", "searched-8", "searched-4")}
    return {
        "floor": _json(paths.floor),
        "final": evals,
        "watch": {step: record.get("fid") for step, record in sorted(read_records(paths.run).items())},
        "search": {steps: search_figures(paths.search(steps), steps) for steps in (8, 4)},
        "text_samples": os.path.join(paths.text_samples, "grid.png") if not config.skip_text else None,
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render(figures: dict[str, Any], mlflow_uri: str, wall_s: float) -> str:
    final, floor = figures["final"], figures["floor"]
    extractor = next((e.get("extractor_id") for e in final.values() if e), "?")
    samples = next((e.get("num_samples") for e in final.values() if e), "?")
    lines = [f"## enat demo summary (domain FID, extractor {extractor}, {samples} samples, fresh seeds)", "",
             "| strategy | steps | FID | KID | GFLOPs/image (+decoder) | images/s | samples |",
             "|---|---|---|---|---|---|---|"]
    for name, result in final.items():
        if not result:
            continue
        lines.append(f"| {name} | {result['steps']} | {_fmt(result.get('fid'))} "
                     f"| {_fmt(result.get('kid'), '.4f')} "
                     f"| {_fmt(result.get('gflops_per_image'), '.4f')} "
                     f"({_fmt(result.get('gflops_per_image_with_decoder'), '.4f')}) "
                     f"| {_fmt(result.get('images_per_s'), '.1f')} | {result['grid']} |")
    if floor:
        lines.append(f"| real vs real (floor) | - | {_fmt(floor.get('fid'))} "
                     f"| {_fmt(floor.get('kid'), '.4f')} "
                     f"| - | - | {floor.get('num_samples')} vs {floor.get('reference_images')} real images |")
    default, searched = final.get("default-8", {}).get("fid"), final.get("searched-8", {}).get("fid")
    if default and searched:
        lines += ["", f"searched 8-step strategy vs the cosine default: FID {searched:.3f} vs {default:.3f} "
                      f"({100 * (default - searched) / default:+.1f}% better)"]
    for steps, search in figures["search"].items():
        if search["evaluations"]:
            lines.append(f"AutoNAT search, {steps} steps: {search['evaluations']} evaluations, "
                         f"{_fmt(search['wall_s'], '.0f')} s; strategy {search['strategy']}")
    if figures["watch"]:
        curve = ", ".join(f"step {step}: {_fmt(fid)}" for step, fid in figures["watch"].items())
        lines.append(f"FID as checkpoints landed (eval watch, fewer samples): {curve}")
    if figures["text_samples"]:
        lines.append(f"text-to-image samples (captions in the grid order): {figures['text_samples']}")
    lines += ["", f"demo wall time {wall_s / 60:.1f} min",
              f"open MLflow: .venv/bin/mlflow ui --backend-store-uri {mlflow_uri} --port 5000"]
    return "\n".join(lines)


def write_summary(config: DemoConfig, paths: DemoPaths, mlflow_uri: str, wall_s: float) -> str:
    figures = collect(config, paths)
    table = render(figures, mlflow_uri, wall_s)
    os.makedirs(config.work_dir, exist_ok=True)
    with open(os.path.join(config.work_dir, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(config.work_dir, "summary.json"), "w") as handle:
        json.dump({**figures, "wall_s": wall_s}, handle, indent=1, default=str)
    return table
