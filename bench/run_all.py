"""Run every benchmark in bench/ and write a results table (date, machine, figures).

    .venv/bin/python bench/run_all.py [--out bench/results.md]

Each bench prints one JSON object with --json; this collects them into bench/results.json
and a Markdown table. Benches run one after another: the machine has two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name in the table, script, its arguments besides --json)
BENCHES = [
    ("generate.py", "generate.py", []),
    ("pretokenize.py", "pretokenize.py", []),
    # A real ImageNet job's shapes: MaskGIT-VQGAN at 256 px over 500x375 JPEGs (~5 min).
    ("pretokenize.py vqgan", "pretokenize.py",
     ["--preset", "maskgit-vqgan-f16", "--input-size", "500x375", "--input-format", "jpeg", "--images", "64",
      "--batch-size", "16", "--shard-size", "64", "--rounds", "1", "--no-scaling"]),
    ("train.py", "train.py", []),
    ("zero_overhead.py", "zero_overhead.py", []),
]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, {platform.node()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results.md"))
    args = parser.parse_args()
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "benches": {}}
    for name, script, script_args in BENCHES:
        print(f"running {name} ...", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), "--json", *script_args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            results["benches"][name] = {"error": done.stderr.strip().splitlines()[-1:]}
            continue
        results["benches"][name] = json.loads(done.stdout.strip().splitlines()[-1])
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# Benchmarks, {results['date']}", "", f"Machine: {results['machine']}", "",
             "| bench | key | value |", "|---|---|---|"]
    for bench, figures in results["benches"].items():
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
            lines.append(f"| {bench} | {key} | {shown} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
