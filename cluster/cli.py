"""The `enat` command line: one entry, one subcommand per job.

Every job takes `--config PRESET_OR_PATH` and trailing `key=value` overrides, validated
into the job's typed config before anything starts; a bad key exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import load_config
from models.typed_config import ConfigError


@dataclass
class Command:
    """A subcommand: its config class, what runs it, and flags that are config keys."""

    help: str
    config_cls: type | None
    run: Callable[[Any, argparse.Namespace], int | None]
    flags: dict[str, str] = field(default_factory=dict)  # "--out" -> config key "out"


def _services_command(action: str) -> Command:
    def run(_config: Any, args: argparse.Namespace) -> int:
        from cluster import services

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
            for key, value in env.items():
                print(f"export {key}={value}")
        return 0

    helps = {"up": "start SeaweedFS (S3) and the MLflow store (idempotent)",
             "down": "stop the embedded services by PID",
             "status": "report whether the embedded services are healthy (exit 3 when down)",
             "env": "print export lines for AWS_* and MLFLOW_TRACKING_URI"}
    return Command(helps[action], None, run)


def _data_demo(config: Any, _args: argparse.Namespace) -> int:
    from pipelines.demo_data import make_demo_data

    summary = make_demo_data(config)
    print(f"demo data: {summary['images']} images in {len(summary['categories'])} classes")
    print(f"  ImageNet-style tree: {summary['imagenet']}")
    print(f"  CC3M-style tars:     {summary['cc3m']} ({summary['cc3m_tars']} tars)")
    return 0


def _demo(config: Any, args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    return run_demo(config, Path(args.state_dir))


def _config_classes() -> dict[str, type]:
    from cluster.demo import DemoConfig
    from pipelines.demo_data import DemoDataConfig

    return {"demo": DemoConfig, "data demo": DemoDataConfig}


def commands() -> dict[str, dict[str, Command]]:
    """Groups of subcommands; a group named "" holds top-level commands."""
    classes = _config_classes()
    return {
        "": {"demo": Command("run the end-to-end demo on embedded services",
                             classes["demo"], _demo)},
        "services": {a: _services_command(a) for a in ("up", "down", "status", "env")},
        "data": {"demo": Command("write the emoji demo data sets (ImageNet- and CC3M-style)",
                                 classes["data demo"], _data_demo, {"--out": "out"})},
    }


GROUP_HELP = {
    "services": "embedded SeaweedFS (S3) and MLflow: up, down, status, env",
    "data": "demo data sets",
}


def _add_command(sub: argparse._SubParsersAction, name: str, command: Command) -> None:
    parser = sub.add_parser(name, help=command.help, description=command.help)
    parser.set_defaults(command=command)
    if command.config_cls is not None:
        parser.add_argument("--config", metavar="PRESET_OR_PATH",
                            help="YAML preset name (configs/) or path")
        for flag, key in command.flags.items():
            parser.add_argument(flag, dest=f"flag_{key}", metavar=key.upper(),
                                help=f"same as {key}=...")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="config overrides, dotted keys allowed")
    if name == "up":
        parser.add_argument("--mlflow", action="store_true",
                            help="also start an MLflow server (artifacts in the S3 bucket)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enat", description="Token-based image synthesis (ENAT, AutoNAT) from laptop to cluster.")
    parser.add_argument("--state-dir", default=os.environ.get("ENAT_STATE_DIR", ".enat"),
                        help="where embedded services keep data and credentials (default .enat)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group, members in commands().items():
        if group == "":
            for name, command in members.items():
                _add_command(sub, name, command)
            continue
        group_parser = sub.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
        group_sub = group_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
        for name, command in members.items():
            _add_command(group_sub, name, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    command: Command = args.command
    try:
        config = None
        if command.config_cls is not None:
            flags = {key: getattr(args, f"flag_{key}") for key in command.flags.values()
                     if getattr(args, f"flag_{key}") is not None}
            config = load_config(command.config_cls, args.config, args.overrides, flags=flags)
        return command.run(config, args) or 0
    except ConfigError as err:
        print(f"enat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("enat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
