"""Command line: ``shadowvmm run | migrate | scenario`` plus the commands plugins add (``probe``).

Every command is a :class:`Command` in one table: :func:`builtin_commands` for the core's,
the ``shadowvmm.commands`` entry-point group for the plugins'. ``-v`` (INFO: lifecycle
transitions) and ``--trace`` (DEBUG: every backend message) work before or after the
subcommand; ``--version`` names the package and every plugin distribution with its version.
Every report command takes ``--json``; progress goes to stderr only when it is a terminal.

Every :class:`~shadowvmm.errors.ShadowVmmError` (a bad config above all: the
file, the key path and what was expected) ends the command with one line,
``shadowvmm: error: ...``, on stderr and exit code 2; an OS error outside
them (out of file descriptors) with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Protocol, TextIO

from . import config as configmod
from .errors import PluginError, ShadowVmmError
from .job import run as job
from .migration import cli as migration_cli
from .scenarios import cli as scenario_cli
from .testing.conformance.command import COMMAND as CHECK_COMMAND
from .timeline import Timeline

COMMANDS_GROUP = "shadowvmm.commands"
#: Entry-point groups through which a distribution plugs into shadowvmm (``--version`` lists them).
PLUGIN_GROUPS = ("shadowvmm.backends", COMMANDS_GROUP, "shadowvmm.scenarios")
PACKAGE = "shadowvmm"
#: Columns of a command's description in its --help (its examples are kept as written).
HELP_WIDTH = 88
#: What ``shadowvmm --help`` says first (the module docstring is for the source's readers).
DESCRIPTION = ("shadowvmm: a VMM device layer for virtio devices. It runs guest driver models against "
               "vhost-user, vDPA and in-process backends, stops them behind the guest's back, migrates "
               "them, and runs the nested-virtualisation scenarios. -v and --trace work anywhere on the "
               "line; every report takes --json; errors end with one 'shadowvmm: error:' line, exit 2.")


class Command(Protocol):
    """A subcommand (entry-point group ``shadowvmm.commands`` for a plugin's). ``add_arguments``
    may set ``parser.description`` and ``parser.epilog`` (examples); ``shadowvmm --help`` lists
    each command with the first example of its epilog."""

    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    async def run(self, args: argparse.Namespace, out: TextIO) -> int: ...


async def run(cfg: configmod.MachineConfig, out: TextIO = sys.stdout, err: TextIO | None = None) -> int:
    """The main job of *cfg* with its text report on *out*; the exit code (0 pass or skipped, 1 fail)."""
    return (await job.run(cfg, out, err)).exit_code


def _check_text(cfg: configmod.MachineConfig) -> str:
    devices = ", ".join(f"{d.name} ({d.backend}{', peer ' + d.peer if d.peer else ''})" for d in cfg.devices)
    peers = ", ".join(f"{p.name} ({p.kind})" for p in cfg.peers) or "none"
    return f"{cfg.source}: OK: {len(cfg.devices)} device(s): {devices or 'none'}; peers: {peers}"


class RunCommand:
    help = "run the configured machine's main job (every device's workload) and report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Bring up every device of CONFIG (starting its [[peer]]s, stopping them after), run "
            "each device type's workload (blk: random writes with a transparent stop mid-I/O and a "
            "read-back; rng: entropy; fs: FUSE create/write/read/readdir/unlink; net: frames echoed "
            "by the peer), report. A device type without a workload is SKIPPED; RESULT is PASS only "
            "if every device with a workload passed. Exit 0 pass or skipped, 1 fail, 2 bad config.")
        parser.epilog = ("examples:\n  shadowvmm run configs/default.toml\n"
                         "  shadowvmm run configs/blk-qsd.toml --json\n"
                         "  shadowvmm run --check configs/fs-virtiofsd.toml\n"
                         "  shadowvmm run configs/default.toml --set run.requests=200")
        parser.add_argument("config", help="machine config (TOML)")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--check", action="store_true",
                            help="validate the config (and --set) and exit without starting anything")
        parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                            help="override a config value (repeatable): run.requests=200, device[0].packed=true")

    async def run(self, args: argparse.Namespace, out: TextIO) -> int:
        cfg = configmod.load(args.config, args.overrides)
        if args.check:
            text = json.dumps({"config": cfg.source, "ok": True, "devices": [d.name for d in cfg.devices],
                               "peers": [p.name for p in cfg.peers]}, indent=2) if args.json else _check_text(cfg)
            print(text, file=out)
            return 0
        report = await job.run(cfg, None if args.json else out, sys.stderr)
        if args.json:
            print(json.dumps(report.as_dict(), indent=2), file=out)
        return report.exit_code


class MigrateCommand:
    help = migration_cli.HELP

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        migration_cli.add_arguments(parser)

    async def run(self, args: argparse.Namespace, out: TextIO) -> int:
        timeline = Timeline() if args.timeline or args.plot else None
        code = await migration_cli.run(args, out=out, timeline=timeline)
        if timeline is not None:
            scenario_cli.write_outputs(timeline, args.timeline, args.plot, "shadowvmm migrate")
        return code


class ScenarioCommand:
    help = scenario_cli.HELP

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        scenario_cli.add_arguments(parser)

    async def run(self, args: argparse.Namespace, out: TextIO) -> int:
        return await scenario_cli.run(args, out)


def builtin_commands() -> dict[str, Command]:
    """The core's commands, in the order ``--help`` lists them."""
    return {
        "run": RunCommand(),
        "migrate": MigrateCommand(),
        "scenario": ScenarioCommand(),
        "check": CHECK_COMMAND,
    }


def plugin_commands() -> dict[str, Command]:
    """The registered plugin commands; an entry point that fails to import raises PluginError."""
    found: dict[str, Command] = {}
    for ep in metadata.entry_points(group=COMMANDS_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:
            raise PluginError(f"command {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    return found


def all_commands() -> dict[str, Command]:
    """Built-in commands, then the plugins' (sorted); a plugin may not take a built-in name."""
    builtin = builtin_commands()
    plugins = plugin_commands()
    for name in sorted(plugins):
        if name in builtin:
            raise PluginError(f"command {name!r} of a plugin clashes with the built-in command")
    return {**builtin, **dict(sorted(plugins.items()))}


def plugin_versions() -> list[dict[str, Any]]:
    """Each distribution (other than the core) with an entry point in :data:`PLUGIN_GROUPS`:
    its name, version and entry points (discovered, not imported)."""
    found: dict[str, dict[str, Any]] = {}
    for group in PLUGIN_GROUPS:
        for ep in metadata.entry_points(group=group):
            dist = ep.dist
            name = dist.name if dist is not None else ep.module.partition(".")[0]
            if name == PACKAGE:
                continue
            entry = found.setdefault(name, {"name": name, "version": dist.version if dist else "?",
                                            "entry_points": []})
            entry["entry_points"].append(f"{group.rpartition('.')[2]}:{ep.name}")
    return sorted(found.values(), key=lambda e: e["name"])


def version_text() -> str:
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    lines = [f"{PACKAGE} {version}", f"python {sys.version.split()[0]}"]
    plugins = plugin_versions()
    lines.append("plugins:" if plugins else "plugins: none")
    lines += [f"  {p['name']} {p['version']} ({', '.join(p['entry_points'])})" for p in plugins]
    return "\n".join(lines)


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of shadowvmm and of every plugin, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def _runner() -> asyncio.Runner:
    """An event loop for one command, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines()) or type(exc).__name__


def _verbosity() -> argparse.ArgumentParser:
    """The logging options, accepted before and after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log lifecycle transitions (INFO)")
    common.add_argument("--trace", action="store_true", default=argparse.SUPPRESS,
                        help="log every backend message in both directions (DEBUG)")
    return common


def _first_example(epilog: str | None) -> str:
    lines = [ln.strip() for ln in (epilog or "").splitlines() if ln.strip().startswith("shadowvmm ")]
    return lines[0] if lines else ""


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    common = _verbosity()
    parser = argparse.ArgumentParser(prog="shadowvmm", description=textwrap.fill(DESCRIPTION, HELP_WIDTH),
                                     parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    examples = []
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.help, description=command.help, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.description = "\n\n".join(textwrap.fill(par, HELP_WIDTH) for par in (p.description or "").split("\n\n"))
        examples.append(f"  {name:<10} {command.help}\n             e.g. {_first_example(p.epilog) or '-'}")
    parser.epilog = "commands (shadowvmm COMMAND --help for each one's options and examples):\n" + "\n".join(examples)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        commands = all_commands()
    except ShadowVmmError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    args = build_parser(commands).parse_args(argv)
    level = logging.DEBUG if getattr(args, "trace", False) else \
        logging.INFO if getattr(args, "verbose", False) else logging.ERROR
    logging.basicConfig(level=level, format="%(relativeCreated)9.3f %(levelname)s %(name)s: %(message)s")
    try:
        with _runner() as runner:
            return runner.run(commands[args.command].run(args, sys.stdout))
    except ShadowVmmError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
