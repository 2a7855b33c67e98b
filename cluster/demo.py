"""`enat demo`: the whole mission on embedded defaults, one resumable stage at a time.

Every stage after the services is an ordinary `enat` command run in a child process,
printed before it runs so any stage can be rerun (or changed) by hand. A stage whose
output already exists is skipped, and the commands resume on their own, so rerunning
`make demo` after an interruption continues where it stopped. Its settings and output
paths are in cluster/demo_config.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from enat.cluster import services
from enat.cluster.demo_config import DemoConfig, DemoPaths
from enat.cluster.demo_summary import write_summary
from enat.pipelines import runs, storage
from enat.pipelines.demo_data import make_demo_data

FRESH_SEED = 1_000_003  # final evaluations: seeds no search trial used


@dataclass
class Stage:
    title: str
    done: Callable[[], bool]  # its output exists: skip it
    args: list[str]  # `enat` arguments
    # Runs beside the next stage (one core each; its output goes to a log file): for a
    # one-threaded stage that the next one does not need.
    beside_next: bool = False


class DemoError(RuntimeError):
    pass


def _header(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _command(stage: Stage) -> list[str]:
    print("$ enat " + " ".join(shlex.quote(arg) for arg in stage.args), flush=True)
    return [sys.executable, "-m", "enat.cluster.cli", *stage.args]


def _check(stage: Stage, code: int, log: Path | None = None) -> None:
    if code != 0 or not stage.done():
        where = f" (its output: {log})" if log else ""
        raise DemoError(f"stage '{stage.title}' failed (exit {code}){where}; fix the cause and rerun "
                        f"`enat demo`: finished stages are kept")


def run_stage(stage: Stage) -> None:
    _header(stage.title)
    if stage.done():
        print("done before: skipped", flush=True)
        return
    started = time.monotonic()
    _check(stage, subprocess.run(_command(stage), check=False).returncode)
    print(f"({time.monotonic() - started:.0f} s)", flush=True)


def run_beside(first: Stage, second: Stage, log_dir: Path) -> None:
    """`first` in the background (output to a log file) while `second` runs as usual."""
    if first.done():
        _header(first.title)
        print("done before: skipped", flush=True)
        run_stage(second)
        return
    _header(f"{first.title} (in the background, beside the next stage)")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{first.args[0]}-{first.args[1]}.log"
    started = time.monotonic()
    with open(log, "w") as out:
        # One thread: the stage beside it has the other core.
        background = subprocess.Popen(_command(first), stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            run_stage(second)
        finally:
            code = background.wait()
    _check(first, code, log)
    print(f"({first.title}: {time.monotonic() - started:.0f} s, log {log})", flush=True)


def s3_round_trip(root: str) -> str:
    """Publish a small object atomically, read it back, delete it: storage works."""
    url = storage.join(root, "_checks", f"roundtrip-{uuid.uuid4().hex[:8]}.txt")
    payload = f"enat round trip {time.time()}".encode()
    storage.write_bytes(url, payload)
    if storage.read_bytes(url) != payload:
        raise RuntimeError(f"S3 round trip through {url} returned different bytes")
    storage.remove(url)
    return url


def _exists(url: str) -> Callable[[], bool]:
    return lambda: storage.exists(url)


def _evaluated(paths: DemoPaths, step: int) -> Callable[[], bool]:
    from enat.evaluation.watch import record_url

    return lambda: storage.exists(record_url(paths.run, step))


def stages(config: DemoConfig, paths: DemoPaths) -> list[Stage]:
    final = paths.checkpoint(paths.run, config.train_steps)
    nat_final = paths.checkpoint(paths.nat_run, config.train_steps)
    domain = [f"reference={paths.reference}", f"extractor={paths.extractor}"]
    search = ["search", final, *domain, f"updates={config.search_updates}",
              f"hyper.blocks={config.search_blocks}",
              f"num_samples={config.search_samples}", f"batch_size={config.search_samples}"]
    evaluate = ["eval", "checkpoint", *domain, f"num_samples={config.final_samples}",
                f"seed={FRESH_SEED}", "batch_size=250", "isc=false"]
    found = [
        Stage("domain feature extractor (FID features and class consistency for the emoji)",
              _exists(storage.join(paths.extractor, "extractor.json")),
              ["eval", "train-features", "--data", paths.images, "--out", paths.extractor,
               f"epochs={config.extractor_epochs}"], beside_next=True),
        # The tokenizer's perceptual loss reads another classifier than the one that scores
        # the samples (another seed and split): it is never trained against the FID features.
        Stage("perceptual classifier for the tokenizer (another network than the FID extractor)",
              _exists(storage.join(paths.perceptual, "extractor.json")),
              ["eval", "train-features", "--data", paths.images, "--out", paths.perceptual,
               f"epochs={config.extractor_epochs}", "seed=1"]),
        Stage("tokenizer training (VQGAN, 32x32 -> 8x8 ids, perceptual loss)",
              _exists(storage.join(paths.tokenizer, "config.json")),
              ["tokenizer", "train", "--source", os.path.join(paths.images, "train"), "--root", config.root,
               "--run", "tokenizer", f"steps={config.tokenizer_steps}", "dead_code_steps=0",
               f"perceptual={paths.perceptual}"]),
        Stage("pretokenize the ImageNet-style tree to S3",
              _exists(storage.join(paths.tokens, "manifest.json")),
              ["pretokenize", f"source=imagenet:{paths.images}", f"out={paths.tokens}",
               f"tokenizer={paths.tokenizer}", "flip=true", "shard_size=500"]),
        Stage("pretokenize the CC3M-style tars (captions -> MiniLM embeddings) to S3",
              _exists(storage.join(paths.text_tokens, "manifest.json")),
              ["pretokenize", f"source=cc3m:{paths.captions_tars}", f"out={paths.text_tokens}",
               f"tokenizer={paths.tokenizer}", "shard_size=500"]),
        Stage("reference statistics of the real emoji", _exists(paths.reference),
              ["fid-stats", "--images", f"imagenet:{paths.images}", "--out", paths.reference,
               f"extractor={paths.extractor}", "resolution=32"]),
        Stage("real-vs-real floor (two disjoint halves)", lambda: os.path.exists(paths.floor),
              ["eval", "floor", "--images", f"imagenet:{paths.images}", f"extractor={paths.extractor}",
               f"out={paths.floor}"]),
        Stage("tiny ENAT training: 2 Ray workers, ZeRO-2, checkpoints evaluated as they land",
              _evaluated(paths, config.train_steps),
              ["train", "--config", "tiny-enat-demo", f"root={config.root}", f"data.url={paths.tokens}",
               f"steps={config.train_steps}", f"checkpoint_every={config.checkpoint_every}",
               "eval.watch=true", f"eval.reference={paths.reference}", f"eval.extractor={paths.extractor}",
               f"eval.num_samples={config.watch_samples}", f"eval.batch_size={config.watch_samples}",
               "eval.num_cpus=0.5"]),
        Stage("tiny NAT training (the baseline: same width, depth, shards and steps)",
              _exists(storage.join(nat_final, runs.MARKER)),
              ["train", "--config", "tiny-nat-demo", f"root={config.root}", f"data.url={paths.tokens}",
               f"steps={config.train_steps}", f"checkpoint_every={config.checkpoint_every}"]),
    ]
    found += [Stage(f"AutoNAT search, {steps} steps",
                    _exists(storage.join(paths.search(steps), "summary.json")),
                    [*search, "--steps", str(steps), f"name=autonat-{steps}"])
              for steps in config.search_steps]
    for name, checkpoint, strategy, steps in final_evaluations(config, paths, final, nat_final):
        out = os.path.join(paths.evals, name)
        found.append(Stage(f"final evaluation on fresh seeds: {name}", _evaluated_to(out),
                           [evaluate[0], evaluate[1], checkpoint, *evaluate[2:], f"strategy={strategy}",
                            f"steps={steps}", f"out={out}", f"run_name=demo-{name}"]))
    if not config.skip_text:
        found += text_stages(config, paths)
    return found


def final_evaluations(config: DemoConfig, paths: DemoPaths, enat: str,
                      nat: str) -> list[tuple[str, str, str, int]]:
    """(row name, checkpoint, strategy, steps) of the final evaluations: ENAT with the
    default and the searched strategies, NAT with the default one."""
    return [("default-8", enat, "default", 8),
            *[(f"searched-{steps}", enat, storage.join(paths.search(steps), "strategy.yaml"), steps)
              for steps in config.search_steps],
            ("nat-default-8", nat, "default", 8)]


def _evaluated_to(out: str) -> Callable[[], bool]:
    return lambda: os.path.exists(os.path.join(out, "metrics.json"))


def text_stages(config: DemoConfig, paths: DemoPaths) -> list[Stage]:
    """Text to image: a tiny text-conditioned ENAT on the caption shards, evaluated on
    captions (FID, and class consistency through the category each caption names)."""
    final = paths.checkpoint(paths.text_run, config.text_steps)
    out = os.path.join(paths.evals, "text")
    return [
        Stage("tiny text-to-image ENAT training on the CC3M-style shards",
              _exists(storage.join(final, runs.MARKER)),
              ["train", "--config", "tiny-enat-text-demo", f"root={config.root}",
               f"data.url={paths.text_tokens}", f"steps={config.text_steps}"]),
        Stage("text-to-image evaluation from captions", _evaluated_to(out),
              ["eval", "checkpoint", final, f"reference={paths.reference}", f"extractor={paths.extractor}",
               f"captions={paths.captions}", f"num_samples={config.text_samples}",
               f"batch_size={config.text_samples}", f"seed={FRESH_SEED}", "isc=false", f"out={out}",
               "run_name=demo-text"]),
    ]


def write_captions(paths: DemoPaths, per_class: int = 8) -> None:
    """Captions to sample from, `caption<TAB>category` per line: the names of the first
    `per_class` emoji of every category, class by class (the grid shows a row per caption
    block). The category is what class consistency checks the sample against."""
    from enat.pipelines.demo_data import list_emoji

    chosen: dict[str, list[str]] = {}
    for emoji in list_emoji():
        names = chosen.setdefault(emoji.category, [])
        if len(names) < per_class:
            names.append(emoji.name)
    # Sorted like the class folders, so the text grid's rows line up with the other grids'.
    lines = [f"{name}\t{category}" for category, names in sorted(chosen.items()) for name in names]
    Path(paths.captions).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.captions).write_text("\n".join(lines) + "\n")


def previous_timings(config: DemoConfig) -> tuple[float, dict[str, float]] | None:
    """(wall seconds, stage seconds) of the last summary written, if any."""
    path = Path(config.work_dir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary.get("demo_seconds", 0.0), summary.get("stage_seconds", {})


def run_demo(config: DemoConfig, state_dir: Path) -> int:
    started = time.monotonic()
    _header("services")
    env = services.up(state_dir)
    services.apply_environment(state_dir)
    print(f"S3 endpoint {env['AWS_ENDPOINT_URL']}, MLflow {env['MLFLOW_TRACKING_URI']}")

    _header("demo data")
    summary = make_demo_data(config.data)
    print(f"{summary['images']} images, {len(summary['categories'])} classes -> {config.data.out}")
    print(f"object storage round trip through {s3_round_trip(config.root)}: ok")

    paths = DemoPaths(config)
    write_captions(paths)
    timings = {}
    planned_stages = stages(config, paths)
    # A rerun with nothing left to do keeps the times of the run that made the outputs.
    earlier = previous_timings(config) if all(stage.done() for stage in planned_stages) else None
    try:
        planned = iter(planned_stages)
        for stage in planned:
            began = time.monotonic()
            if stage.beside_next:
                following = next(planned)
                run_beside(stage, following, paths.logs)
                stage = following  # noqa: PLW2901 - the pair is timed as one
                timings[f"{stage.title} (+ the stage beside it)"] = time.monotonic() - began
                continue
            run_stage(stage)
            timings[stage.title] = time.monotonic() - began
    except DemoError as err:
        print(f"\nenat: error: {err}", file=sys.stderr)
        return 1
    _header("summary")
    wall_s, timings = earlier or (time.monotonic() - started, timings)
    table = write_summary(config, paths, env["MLFLOW_TRACKING_URI"], wall_s, timings)
    print(table)
    return 0
