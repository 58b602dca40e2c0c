"""`corematching plan`: whether a model runs in a memory budget, and how (the library's `plan_memory` on a
local model folder).

    corematching plan --model PATH --memory 12GiB [--dtype float16] [--prune-layer K] [--token-budget N] [--beta B]
"""

import argparse

from ..methods import CoreMatching
from ..plan import PlanError, plan_memory


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`corematching plan --model PATH --memory 12GiB [--dtype float16] [--beta 0.4] ...` as a subcommand."""
    parser = subparsers.add_parser("plan", help=PLAN_HELP)
    add_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    """The subcommand on its own: `main(["--model", PATH, "--memory", "12GiB"])` -> exit status."""
    parser = argparse.ArgumentParser(prog="corematching plan", description=PLAN_HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.run(args)


PLAN_HELP = "say whether a model runs in a memory budget, and how"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a local model folder (its config.json is read)")
    parser.add_argument("--memory", required=True, help="the budget: bytes, or a size such as 12GiB")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cpu", help="where the model computes (offload goes to disk for cpu)")
    parser.add_argument("--prune-layer", type=int, default=None)
    parser.add_argument("--token-budget", type=float, default=None, help="visual tokens kept: a count or share")
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--visual-tokens", type=int, default=None)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = {}
    if args.prune_layer is not None:
        settings["prune_layer"] = args.prune_layer
    if args.token_budget is not None:
        budget = args.token_budget
        settings["token_budget"] = int(budget) if budget >= 1 and budget == int(budget) else budget
    if args.beta is not None:
        settings["beta"] = args.beta
    method = CoreMatching(**settings) if settings else None
    try:
        result = plan_memory(
            args.model, args.memory, args.dtype, method, text_tokens=args.text_tokens,
            visual_tokens=args.visual_tokens, answer_tokens=args.answer_tokens, device=args.device,
        )  # fmt: skip
    except PlanError as error:
        print(f"does not fit: {error}")
        return 1
    print(result.explain())
    if result.method is not None:
        print(f"method: {result.method!r}")
    return 0
