"""``python -m loadtest bench noop|stream`` (see loadtest/bench.py and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator

from loadtest.bench import NoopOptions, StreamOptions, bench_noop, bench_stream, local_stack
from mnemos.config import NatsSettings


@contextlib.contextmanager
def _target(args: argparse.Namespace, slots: int) -> Iterator[NatsSettings]:
    if args.url:
        yield NatsSettings(nats_url=args.url, namespace=args.namespace)
        return
    print(f"starting a local stack (file-backed JetStream, 1 control plane, {args.workers} worker(s), "
          f"{slots} slots each) ...", flush=True)
    with local_stack(workers=args.workers, slots=slots) as settings:
        yield settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    kinds = bench.add_subparsers(dest="kind", required=True)
    for kind in ("noop", "stream"):
        k = kinds.add_parser(kind)
        k.add_argument("--url", default=None, help="use a running deployment instead of a fresh local stack")
        k.add_argument("--namespace", default="mnemos")
        k.add_argument("--workers", type=int, default=1)
        k.add_argument("--json", action="store_true", help="also print the numbers as JSON")
        if kind == "noop":
            k.add_argument("--jobs", type=int, default=10_000)
            k.add_argument("--window", type=int, default=1024, help="outstanding requests")
            k.add_argument("--roundtrips", type=int, default=500)
            k.add_argument("--slots", type=int, default=256, help="concurrent jobs per worker")
        else:
            k.add_argument("--runs", type=int, default=10)
            k.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args(argv)
    if args.kind == "noop":
        with _target(args, args.slots) as settings:
            result = asyncio.run(bench_noop(settings, NoopOptions(args.jobs, args.window, args.roundtrips)))
    else:
        with _target(args, 1) as settings:
            result = asyncio.run(bench_stream(settings, StreamOptions(runs=args.runs, max_tokens=args.max_tokens)))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
