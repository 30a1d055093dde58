"""The `unified-vl` command: one entry point, each subcommand a function in its own module.

    unified-vl --help

The table below is the only place subcommands are named; a subcommand's module parses its own
arguments (``main(argv) -> int``) and is imported only when it is used.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (
        "data_tools.cli:main",
        "synthetic world, dataset converters, and a look at the data (synth | convert | show)",
    ),
    "tokenizer": ("unified_vl.app.tokenizer_cli:main", "train a SentencePiece tokenizer with location tokens (train)"),
    "pretrain": (
        "unified_vl.app.jobs.pretrain:main",
        "multi-task pretraining on DeepSpeed (no arguments: the built-in main job)",
    ),
    "finetune": ("unified_vl.app.jobs.finetune:main", "fine-tune one task (full, frozen parts, few-shot)"),
    "eval": ("unified_vl.app.jobs.evaluate:main", "evaluate a model folder on stored data with the official metrics"),
    "predict": (
        "unified_vl.app.inference.cli:predict_main",
        "predict on one image; prints JSON, optionally draws the result",
    ),
    "serve": (
        "unified_vl.app.inference.cli:serve_main",
        "HTTP server with dynamic batching (OpenAI-compatible chat endpoint)",
    ),
    "presets": ("unified_vl.app.presets:main", "list the model presets with their parameter counts"),
}


def exit_2_on_bad_model_files(main_function):
    """Wraps a command's ``main(argv) -> int``: a missing, truncated or malformed model file
    (`unified_vl.checkpoint.ModelFileError`) ends it with one line naming the file, and status 2."""
    import functools

    @functools.wraps(main_function)
    def wrapped(argv=None) -> int:
        from unified_vl.checkpoint import ModelFileError

        try:
            return main_function(argv)
        except ModelFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapped


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: unified-vl COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`unified-vl COMMAND --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unified-vl: unknown command {name!r}; known commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
