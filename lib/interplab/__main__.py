"""Command line: ``python -m interplab figures [--profile tiny|paper] [--only ch03 ...] [--force] [--list]``."""
import argparse
import sys

import yaml

from .errors import BadParameter, InterplabError


def parse_param(text: str):
    if "=" not in text:
        raise BadParameter(f"-p {text!r}: write parameters as name=value, e.g. -p seed=1")
    name, value = text.split("=", 1)
    return name.strip(), yaml.safe_load(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interplab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="regenerate figures and tables by running the chapter notebooks")
    fig.add_argument("--profile", default="tiny", help="tiny (CPU, toy world, minutes) or paper (GPU, hours)")
    fig.add_argument("--only", nargs="+", metavar="CHAPTER", help="chapters to run, e.g. ch03 or ch05a_causal_tracing")
    fig.add_argument("--force", action="store_true", help="run even if nothing changed since the last success")
    fig.add_argument("--list", action="store_true", help="print each notebook's parameters and exit")
    fig.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                     help="override a notebook parameter (YAML value), e.g. -p seed=1")
    args = parser.parse_args(argv)

    from .runner import Runner, summary_table
    try:
        runner = Runner(profile=args.profile)
        if args.list:
            for chapter in runner.select(args.only):
                print(chapter)
                for name, p in runner.parameters(chapter).items():
                    print(f"  {name} = {p['default']}" + (f"  # {p['help']}" if p.get("help") else ""))
            return 0
        overrides = dict(parse_param(p) for p in args.param)
        results = runner.run(args.only, overrides, args.force)
    except InterplabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(results))
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
