"""`enat demo`: the whole mission on embedded defaults, one resumable stage at a time."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster import services
from pipelines import storage
from pipelines.demo_data import DemoDataConfig, make_demo_data


@dataclass
class DemoConfig:
    work_dir: str = "demo-out"  # local outputs: data, samples, summary
    root: str = f"s3://{services.DEFAULT_BUCKET}/demo"  # object-storage root of the demo
    data: DemoDataConfig = field(default_factory=lambda: DemoDataConfig(out="demo-out/data"))


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def s3_round_trip(root: str) -> str:
    """Publish a small object atomically, read it back, delete it: storage works."""
    url = storage.join(root, "_checks", f"roundtrip-{uuid.uuid4().hex[:8]}.txt")
    payload = f"enat round trip {time.time()}".encode()
    storage.write_bytes(url, payload)
    if storage.read_bytes(url) != payload:
        raise RuntimeError(f"S3 round trip through {url} returned different bytes")
    storage.remove(url)
    return url


def run_demo(config: DemoConfig, state_dir: Path) -> int:
    started = _stage("services")
    env = services.up(state_dir)
    services.apply_environment(state_dir)
    print(f"S3 endpoint {env['AWS_ENDPOINT_URL']}, MLflow {env['MLFLOW_TRACKING_URI']}")

    _stage("demo data")
    summary = make_demo_data(config.data)
    print(f"{summary['images']} images, {len(summary['categories'])} classes -> {config.data.out}")

    _stage("object storage")
    url = s3_round_trip(config.root)
    print(f"round trip through {url}: ok")

    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"  demo data:   {Path(config.data.out).resolve()}")
    print(f"  S3 endpoint: {env['AWS_ENDPOINT_URL']} (root {config.root})")
    print("  stop the services with: enat services down")
    return 0
