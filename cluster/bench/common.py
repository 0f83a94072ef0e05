"""What every `cluster bench` benchmark shares: option parsing helpers, --quick/default
resolution, and the output convention (a table; with --json the table goes to stderr and
stdout carries exactly one JSON object; --output FILE also writes the JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.bench.loadgen import BenchError


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,32" -> (1, 8, 32), positive integers only."""
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return values


def resolve(args: argparse.Namespace, name: str, defaults: dict, quick: dict):
    """The option's value: as given, else from the --quick or default preset."""
    given = getattr(args, name, None)
    if given is not None:
        return given
    return (quick if getattr(args, "quick", False) else defaults)[name]


def report(result: dict, table: str, args: argparse.Namespace) -> None:
    if not args.json:
        print(table)
    else:
        print(table, file=sys.stderr)
        print(json.dumps(result))
    if args.output is not None:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


def run_reported(args: argparse.Namespace, run: Callable[[], dict],
                 table: Callable[[dict], str]) -> dict:  # fmt: skip
    """Run a benchmark and report it. A target it cannot reach or start (the load
    generator's BenchError, a child that would not serve) prints its message and exits 2."""
    try:
        result = run()
    except (BenchError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report(result, table(result), args)
    return result
