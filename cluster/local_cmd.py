"""The local machine's subcommands: the demo, the embedded services, the demo data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from enat.cluster.command import Command
from enat.cluster.demo_config import DemoConfig
from enat.pipelines.config import DemoDataConfig


def _services_command(action: str) -> Command:
    def run(_config: Any, args: argparse.Namespace) -> int:
        from enat.cluster import services
        from enat.cluster.ray_session import KEY_VARIABLES

        state = Path(args.state_dir)
        if action == "up":
            env = services.up(state, with_mlflow_server=args.mlflow)
            print(f"S3 endpoint: {env['AWS_ENDPOINT_URL']} (bucket s3://{services.DEFAULT_BUCKET})")
            print(f"MLflow: {env['MLFLOW_TRACKING_URI']}")
            print("use it from a shell: eval \"$(enat services env)\"")
        elif action == "down":
            services.down(state)
            print("services stopped")
        elif action == "status":
            report = services.status(state)
            for name, text in report.items():
                print(f"{name}: {text}")
            return 0 if report["seaweedfs"].startswith("running") else 3
        elif action == "env":
            env = services.environment(state)
            if not env:
                print("enat: error: services are not running; start them with `enat services up`",
                      file=sys.stderr)
                return 3
            # Keys in the shell would win over the credentials file: they belong to another store.
            print(f"unset {' '.join(KEY_VARIABLES)}")
            for key, value in env.items():
                print(f"export {key}={value}")
        return 0

    helps = {"up": "start SeaweedFS (S3) and the MLflow store (idempotent)",
             "down": "stop the embedded services by PID",
             "status": "report whether the embedded services are healthy (exit 3 when down)",
             "env": "print export lines for AWS_* and MLFLOW_TRACKING_URI"}
    def mlflow_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--mlflow", action="store_true",
                            help="also start an MLflow server (artifacts in the S3 bucket)")

    return Command(helps[action], None, run, add_arguments=mlflow_flag if action == "up" else None)


def _data_demo(config: Any, _args: argparse.Namespace) -> int:
    from enat.pipelines.demo_data import make_demo_data

    summary = make_demo_data(config)
    print(f"demo data: {summary['images']} images in {len(summary['categories'])} classes")
    print(f"  ImageNet-style tree: {summary['imagenet']}")
    print(f"  CC3M-style tars:     {summary['cc3m']} ({summary['cc3m_tars']} tars)")
    return 0


def _demo(config: Any, args: argparse.Namespace) -> int:
    from enat.cluster.demo import run_demo

    return run_demo(config, Path(args.state_dir))


def commands() -> dict[str, dict[str, Command]]:
    return {
        "": {"demo": Command("run the end-to-end demo on embedded services", DemoConfig, _demo)},
        "services": {a: _services_command(a) for a in ("up", "down", "status", "env")},
        "data": {"demo": Command("write the emoji demo data sets (ImageNet- and CC3M-style)",
                                 DemoDataConfig, _data_demo, {"--out": "out"})},
    }


GROUP_HELP = {
    "services": "embedded SeaweedFS (S3) and MLflow: up, down, status, env",
    "data": "demo data sets",
}
