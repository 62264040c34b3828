"""The ``cag-node`` command line.

Each sub-command lives in its own module under ``dicom_node/commands/`` and
exposes ``register(subparsers)``; the parser it adds sets ``func`` to a callable
``func(args) -> int``.  Commands contributed by other packages (the training
module's ``synth``, ``train``, ``export``, ``evaluate``) are discovered through
the ``cag_node.commands`` entry-point group, so this package never imports
``training`` by name and a serving-only install simply lacks those commands.

Exit status: 0 success, 2 bad usage or invalid configuration (the message names
the key), 1 any other failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from dicom_node import __version__

# Built-in commands: module names under dicom_node.commands.
BUILTIN_COMMANDS = ["serve", "studies", "retry", "select", "report", "demo"]


class UsageError(Exception):
    """Bad usage: exit status 2."""


_PLUGIN_HELP = {
    "synth": "synthetic angiography studies + labels.jsonl (training module)",
    "train": "train a model: selector | vlm (training module)",
    "export": "export a trained model: selector -> ONNX (training module)",
    "evaluate": "evaluate a model: selector | vlm, --json (training module)",
}


def _chosen_command(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser.  Plugin commands are imported only when chosen (torch is slow to import)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen_command(argv)
    parser = argparse.ArgumentParser(
        prog="cag-node",
        description="DICOM AI node for coronary angiography: key frames, laterality and a draft "
        "bilingual report, returned to the PACS as DICOM SR + KOS.",
    )
    parser.add_argument("--version", action="version", version=f"cag-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in BUILTIN_COMMANDS:
        try:
            mod = importlib.import_module(f"dicom_node.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dicom_node.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    for ep in sorted(entry_points(group="cag_node.commands"), key=lambda e: e.name):
        if ep.name != chosen:
            p = sub.add_parser(ep.name, help=_PLUGIN_HELP.get(ep.name, "(training module)"), add_help=False)
            p.set_defaults(func=None)
            continue
        try:
            register = ep.load()
        except Exception as exc:  # e.g. training extras absent: never stops `serve`
            def _missing(args, _exc=exc, _name=ep.name):
                print(f"cag-node {_name}: unavailable ({_exc}); install the [train] extra", file=sys.stderr)
                return 1
            p = sub.add_parser(ep.name, help=f"(unavailable: {exc.__class__.__name__})")
            p.set_defaults(func=_missing)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dicom_node.config import ConfigError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"cag-node: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"cag-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
