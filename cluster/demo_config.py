"""The demo's settings (DemoConfig) and where each of its stages writes (DemoPaths): what
the stages (cluster/demo.py) and the summary (cluster/demo_summary.py) both read.

The sizes fit ~20 minutes on 2 CPU cores; they are demo sizes, not a recipe for quality.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from enat.cluster import services
from enat.pipelines import runs, storage
from enat.pipelines.config import DemoDataConfig


@dataclass
class DemoConfig:
    work_dir: str = "demo-out"  # local outputs: data, evaluations, summary
    root: str = f"s3://{services.DEFAULT_BUCKET}/demo"  # object-storage root of the demo
    data: DemoDataConfig = field(default_factory=lambda: DemoDataConfig(out="demo-out/data"))
    tokenizer_steps: int = 1600
    extractor_epochs: int = 12
    # Tiny ENAT and, for the comparison, tiny NAT; 2 Ray workers each. 2,000 -> 2,300 steps
    # took default-8 FID from 5.90 to 5.20 for ~100 s more (~19 of the 20 minutes).
    train_steps: int = 2300
    checkpoint_every: int = 1150  # each ENAT checkpoint is evaluated as it lands
    watch_samples: int = 200  # images per checkpoint evaluation
    # AutoNAT updates of each search, with one finite difference per kind of parameter
    # (5 evaluations each, + 1): at 250 images per evaluation, per-step differences are
    # mostly sampling noise (README, "Strategy search").
    search_updates: int = 3
    search_blocks: Literal["step", "kind"] = "kind"
    search_samples: int = 250  # images per search evaluation
    # Strategies searched and evaluated (searched-<T> rows); `search_steps=[8,4]` adds a
    # 4-step search (~1 min more).
    search_steps: list[int] = field(default_factory=lambda: [8])
    final_samples: int = 1000  # images of the final evaluations (fresh seeds)
    text_steps: int = 500  # the text-to-image model on the CC3M-style shards
    text_samples: int = 200  # images of the text-to-image evaluation
    skip_text: bool = False


class DemoPaths:
    """Where each stage writes; the stages and the summary read them from here."""

    def __init__(self, config: DemoConfig):
        root, work = config.root, config.work_dir
        self.images = os.path.join(config.data.out, "imagenet")
        self.captions_tars = os.path.join(config.data.out, "cc3m")
        self.tokenizer = storage.join(runs.run_url(root, "tokenizer"), "export")
        self.extractor = storage.join(root, "extractor")
        self.perceptual = storage.join(root, "perceptual")
        self.tokens = storage.join(root, "tokens", "imagenet")
        self.text_tokens = storage.join(root, "tokens", "cc3m")
        self.reference = storage.join(root, "reference", "imagenet-domain.npz")
        self.floor = os.path.join(work, "floor.json")
        self.run = runs.run_url(root, "tiny-enat-demo")
        self.nat_run = runs.run_url(root, "tiny-nat-demo")
        self.text_run = runs.run_url(root, "tiny-enat-text-demo")
        self.evals = os.path.join(work, "eval")
        self.captions = os.path.join(work, "captions.txt")
        self.logs = Path(work) / "logs"

    def checkpoint(self, run_url: str, step: int) -> str:
        return runs.step_url(*runs.split_run_url(run_url), step)

    def search(self, steps: int) -> str:
        return storage.join(self.run, "search", f"autonat-{steps}")
