"""``python -m interplab.zoo train NAME [--steps N] [--seed S] [--fresh]`` and ``... list``."""
import argparse
import importlib
import json
import sys

from . import MODELS, store


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interplab.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a zoo model (resumes an interrupted run) and ship it to data/zoo/NAME")
    tr.add_argument("name", choices=sorted(MODELS))
    tr.add_argument("--steps", type=int, help="training steps (default: the model's shipped setting)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--fresh", action="store_true", help="ignore a saved resumable state")
    sub.add_parser("list", help="each zoo model, its card's gates and whether its files verify")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(MODELS):
            try:
                card = store.verify(name)
                print(f"{name:12s} ok    gates {'pass' if card['gates_pass'] else 'FAIL'}  "
                      f"{card['steps']} steps, {card['wall_time_s']:.0f} s")
            except Exception as e:  # noqa: BLE001 - a listing reports every problem
                print(f"{name:12s} --    {e}")
        return 0
    module = importlib.import_module(f".{MODELS[args.name]}", __package__)
    kw = {"seed": args.seed, "resume": not args.fresh}
    if args.steps is not None:
        kw["steps"] = args.steps
    result = module.train(**kw) if args.name == module.NAME else module.train(args.name, **kw)
    print(json.dumps(result["gates"], indent=1))
    return 0 if all(g["holds"] for g in result["gates"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
