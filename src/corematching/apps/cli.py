"""The `corematching` command: a dispatcher over the subcommands, each a module with its own `main(argv)`.

    corematching [demo]                           demo.py: both bundled models, dense vs CoreMatching vs random
    corematching --image cat.png --question "What animal is this?" [--model ID_OR_PATH]     ask.py
    corematching eval --method corematching --budget 0.25 --output runs/cm.jsonl            eval_command.py
    corematching bench | plan | serve ...         bench.py, plan_command.py, serve/cli.py

Errors a user can fix (a missing file, a bad setting, an unsupported model) end in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UnsupportedModelError
from . import demo, method_spec

SUBCOMMANDS = {"eval": "eval_command", "bench": "bench", "plan": "plan_command", "serve": "serve.cli"}  # demo: see main

# the method options and building live in method_spec; kept here under their old names
build_method = method_spec.from_args


def make_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `corematching eval` ("eval") or of one question (anything else)."""
    from . import ask, eval_command

    return eval_command.make_parser() if command == "eval" else ask.make_parser()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if demo.wants_demo(argv):  # the demo keeps its own first word (`corematching demo --questions N`)
        return demo.main(argv)
    name = argv[0] if argv[0] in SUBCOMMANDS else None
    module = importlib.import_module("." + (SUBCOMMANDS[name] if name else "ask"), __package__)
    if name == "serve":  # the server reports its own errors
        return module.main(argv[1:])
    try:
        return module.main(argv[1:] if name else argv)
    except (FileNotFoundError, ValueError, TypeError, UnsupportedModelError) as error:
        print(f"corematching: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corematching: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
