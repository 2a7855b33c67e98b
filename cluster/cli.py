"""The `enat` command line: one entry, one subcommand per job.

Every job takes `--config PRESET_OR_PATH` and trailing `key=value` overrides, validated
into the job's typed config before anything starts. Errors the user can fix (a bad key, a
missing input, refused storage: models/errors.py UserError) end every command the same
way, as one line on stderr and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from typing import Any

from enat.cluster.command import Command
from enat.cluster.config import load_config
from enat.cluster.ray_session import keep_local_ray_on_loopback
from enat.models.errors import UserError

# Each cluster/*_cmd.py lists its subcommands in `commands()` (group -> name -> Command;
# group "" holds top-level commands) and may describe its groups in GROUP_HELP. Their
# top-level imports stay light (configs, no torch): the heavy work is imported when a
# command runs.
COMMAND_MODULES = [
    "enat.cluster.local_cmd",
    "enat.cluster.tokenizer_cmd",
    "enat.cluster.pretokenize_cmd",
    "enat.cluster.train_cmd",
    "enat.cluster.search_train_cmd",
    "enat.cluster.eval_cmd",
    "enat.cluster.search_cmd",
    "enat.cluster.submit_cmd",
]


def all_commands() -> tuple[dict[str, dict[str, Command]], dict[str, str], dict[str, str]]:
    """(groups, group help texts, group default subcommands)."""
    groups: dict[str, dict[str, Command]] = {}
    helps: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        for group, members in module.commands().items():
            groups.setdefault(group, {}).update(members)
        helps.update(getattr(module, "GROUP_HELP", {}))
        defaults.update(getattr(module, "GROUP_DEFAULT", {}))
    return groups, helps, defaults


def with_default_subcommand(argv: list[str], groups: dict, defaults: dict[str, str]) -> list[str]:
    """`enat eval URL` means `enat eval checkpoint URL`: a group may name the subcommand
    its first non-option argument goes to when that argument is not a subcommand."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):  # global options
        index += 1 if "=" in argv[index] or argv[index] in ("-h", "--help") else 2
    word = argv[index] if index < len(argv) else ""
    following = argv[index + 1] if index + 1 < len(argv) else ""
    if word in defaults and following and not following.startswith("-") and following not in groups[word]:
        return [*argv[: index + 1], defaults[word], *argv[index + 1 :]]
    return argv


def _add_command(sub: argparse._SubParsersAction, name: str, command: Command) -> None:
    parser = sub.add_parser(name, help=command.help, description=command.help)
    parser.set_defaults(command=command)
    if command.config_cls is not None:
        folder = f"configs/{command.preset_folder}/ or " if command.preset_folder else ""
        parser.add_argument("--config", metavar="PRESET_OR_PATH",
                            help=f"YAML preset name ({folder}configs/) or path")
        hints = typing.get_type_hints(command.config_cls)
        for flag, key in command.flags.items():
            kind = hints.get(key)
            parser.add_argument(flag, dest=f"flag_{key}", metavar=key.upper(),
                                type=kind if kind in (int, float) else None, help=f"same as {key}=...")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help=(f"[{command.positional.upper()}] " if command.positional else "")
                            + "config overrides, dotted keys allowed")
    if command.add_arguments is not None:
        command.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enat", description="Token-based image synthesis (ENAT, AutoNAT) from laptop to cluster.")
    parser.add_argument("--state-dir", default=os.environ.get("ENAT_STATE_DIR", ".enat"),
                        help="where embedded services keep data and credentials (default .enat)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups, group_help, _ = all_commands()
    for group, members in groups.items():
        if group == "":
            for name, command in members.items():
                _add_command(sub, name, command)
            continue
        group_parser = sub.add_parser(group, help=group_help[group], description=group_help[group])
        group_sub = group_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
        for name, command in members.items():
            _add_command(group_sub, name, command)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """`enat` arguments as main() sees them: default subcommands applied, key=value
    overrides that follow options collected (argparse leaves those as unknown arguments,
    e.g. `search CKPT --steps 4 seed=1`). Exits (argparse) on a bad command line."""
    parser = build_parser()
    groups, _, defaults = all_commands()
    args, unknown = parser.parse_known_args(with_default_subcommand(list(argv), groups, defaults))
    stray = [item for item in unknown if item.startswith("-") or "=" not in item]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = list(args.overrides) + unknown
    args.print_help = parser.print_help
    return args


def command_config(args: argparse.Namespace) -> Any:
    """The parsed command's typed config (None for commands that load their own);
    raises ConfigError naming a bad key or value."""
    command: Command = args.command
    if command.config_cls is None:
        return None
    flags = {key: getattr(args, f"flag_{key}") for key in command.flags.values()
             if getattr(args, f"flag_{key}") is not None}
    overrides = list(args.overrides)
    if command.positional and overrides and "=" not in overrides[0]:
        flags[command.positional] = overrides.pop(0)
    return load_config(command.config_cls, args.config, overrides, flags=flags,
                       preset_folder=command.preset_folder)


def main(argv: list[str] | None = None) -> int:
    keep_local_ray_on_loopback()  # before any command imports Ray
    args = parse(sys.argv[1:] if argv is None else argv)
    if not hasattr(args, "command"):
        args.print_help()
        return 2
    try:
        return args.command.run(command_config(args), args) or 0
    except UserError as err:
        print(f"enat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("enat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
