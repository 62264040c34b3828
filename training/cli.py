"""Sub-commands the training module contributes to ``cag-node`` (via entry points).

Each area keeps its own CLI module, so the areas stay independent:
``training.synthetic.cli``, ``training.selector.cli``, ``training.vlm.cli``.
Each exposes ``register_<verb>(subparsers)`` for the verbs it supports.
"""

from __future__ import annotations

import importlib

_AREAS = {
    "synth": ["training.synthetic.cli"],
    "train": ["training.selector.cli", "training.vlm.cli", "training.lesions.cli"],
    "export": ["training.selector.cli"],
    "evaluate": ["training.selector.cli", "training.vlm.cli", "training.lesions.cli"],
}


def _areas(verb: str):
    for modname in _AREAS[verb]:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue  # area not built yet
            raise
        fn = getattr(mod, f"register_{verb}", None)
        if fn is not None:
            yield fn


def register_synth(sub) -> None:
    for fn in _areas("synth"):
        fn(sub)


def _register_group(sub, verb: str, help_: str) -> None:
    p = sub.add_parser(verb, help=help_)
    group = p.add_subparsers(dest=f"{verb}_what", metavar="WHAT")
    for fn in _areas(verb):
        fn(group)
    p.set_defaults(func=lambda args, _p=p: (_p.print_help(), 2)[1])


def register_train(sub) -> None:
    _register_group(sub, "train", "train a model (selector | vlm | lesions)")


def register_export(sub) -> None:
    _register_group(sub, "export", "export a trained model (selector -> ONNX)")


def register_evaluate(sub) -> None:
    _register_group(sub, "evaluate", "evaluate a model (selector | vlm | lesions); --json prints metrics")
