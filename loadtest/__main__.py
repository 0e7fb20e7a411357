"""``python -m loadtest bench noop|stream|http|coldstart|burst|actor|batch|generate|affinity|workerstart|scale``
and ``python -m loadtest chaos`` (see the modules of loadtest/ and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from loadtest import scale_bench
from loadtest.bench import NoopOptions, StreamOptions, bench_noop, bench_stream, cpu_per_process, local_stack
from mnemos.config import NatsSettings


@contextlib.contextmanager
def _target(args: argparse.Namespace, slots: int) -> Iterator[NatsSettings]:
    if args.url:
        yield NatsSettings(nats_url=args.url, namespace=args.namespace)
        return
    print(f"starting a local stack (file-backed JetStream, 1 control plane, {args.workers} worker(s), "
          f"{slots} slots each) ...", flush=True)
    with local_stack(workers=args.workers, slots=slots, auth=not args.no_auth) as stack:
        if getattr(args, "cpu", False):
            with cpu_per_process(stack) as usage:
                yield stack.settings
            print(usage.report(args.jobs + args.roundtrips))
        else:
            yield stack.settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    kinds = bench.add_subparsers(dest="kind", required=True)
    http = kinds.add_parser("http", help="the HTTP gateway: jobs/s, latency, OpenAI completions")
    http.add_argument("--gateway-url", default=None, help="a running gateway instead of a fresh local stack")
    http.add_argument("--api-key", default=None)
    http.add_argument("--jobs", type=int, default=3000)
    http.add_argument("--procs", type=int, default=2, help="load-generator processes (aiohttp)")
    http.add_argument("--window", type=int, default=16, help="requests in flight per load-generator process")
    http.add_argument("--roundtrips", type=int, default=300)
    http.add_argument("--completions", type=int, default=50, help="sequential /v1/completions, whole and streamed")
    http.add_argument("--cpu", action="store_true",
                      help="also print the CPU each process spent per job (the local stack's and the generators')")
    http.add_argument("--json", action="store_true")
    for kind in ("noop", "stream"):
        k = kinds.add_parser(kind)
        k.add_argument("--url", default=None, help="use a running deployment instead of a fresh local stack")
        k.add_argument("--namespace", default="mnemos")
        k.add_argument("--workers", type=int, default=1)
        k.add_argument("--no-auth", action="store_true",
                       help="an open NATS server (default: a user per role, as `mnemos up`): what permissions cost")
        k.add_argument("--json", action="store_true", help="also print the numbers as JSON")
        if kind == "noop":
            k.add_argument("--jobs", type=int, default=10_000)
            k.add_argument("--window", type=int, default=1024, help="outstanding requests")
            k.add_argument("--roundtrips", type=int, default=500)
            k.add_argument("--slots", type=int, default=256, help="concurrent jobs per worker")
            k.add_argument("--cpu", action="store_true",
                           help="also print the CPU each process of the stack spent per job (where the time goes)")
        else:
            k.add_argument("--runs", type=int, default=10)
            k.add_argument("--max-tokens", type=int, default=200)
    cold = kinds.add_parser("coldstart", help="zero workers, one job for the demo model: time to first token")
    cold.add_argument("--runs", type=int, default=3)
    cold.add_argument("--no-zygote", action="store_true", help="a fresh process per worker (to compare)")
    cold.add_argument("--json", action="store_true")
    burst = kinds.add_parser("burst", help="a step load up and down on the local provider, with a plot")
    burst.add_argument("--steps", type=int, default=5)
    burst.add_argument("--high", type=float, default=8.0, help="seconds each step is up")
    burst.add_argument("--low", type=float, default=7.0, help="quiet seconds after each step")
    burst.add_argument("--rate", type=float, default=24.0, help="submissions per second while up")
    burst.add_argument("--job-seconds", type=float, default=0.25)
    burst.add_argument("--max-workers", type=int, default=4)
    burst.add_argument("--slots", type=int, default=2, help="concurrent jobs per worker")
    burst.add_argument("--window", type=float, default=3.0, help="the pool's scale-down window (s)")
    burst.add_argument("--kill-autoscaler", action="store_true",
                       help="run a standby autoscaler and SIGKILL the acting one mid-burst")
    burst.add_argument("--out", type=Path, default=Path("burst"), help="writes OUT.json and OUT.png")
    burst.add_argument("--json", action="store_true")
    actor = kinds.add_parser("actor", help="calls to one actor: calls/s and round-trip latency (vs Ray's)")
    actor.add_argument("--n", type=int, default=20_000)
    actor.add_argument("--window", type=int, default=256, help="calls in flight")
    actor.add_argument("--roundtrips", type=int, default=500)
    actor.add_argument("--json", action="store_true")
    batch = kinds.add_parser("batch", help="the demo app's batched embed against one text per call")
    batch.add_argument("--callers", type=int, default=8)
    batch.add_argument("--calls", type=int, default=50, help="per caller and method")
    batch.add_argument("--json", action="store_true")
    gen = kinds.add_parser("generate", help="the demo model in-process: total tokens/s of 1..N concurrent streams")
    gen.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--rounds", type=int, default=5)
    gen.add_argument("--max-batch-size", type=int, default=8)
    gen.add_argument("--json", action="store_true")
    aff = kinds.add_parser("affinity", help="two models alternating on two one-model workers: warm hits")
    aff.add_argument("--jobs", type=int, default=400)
    aff.add_argument("--concurrency", type=int, default=1, help="jobs in flight (alternating models)")
    aff.add_argument("--max-tokens", type=int, default=4)
    aff.add_argument("--json", action="store_true")
    start = kinds.add_parser("workerstart", help="a worker process from start to ready: fresh and forked")
    start.add_argument("--runs", type=int, default=5)
    start.add_argument("--no-zygote", action="store_true", help="only fresh processes")
    start.add_argument("--json", action="store_true")
    scale = kinds.add_parser("scale", help="cost vs queued jobs: submit, jobs.list, memory, storage, drain")
    scale_bench.add_arguments(scale)
    chaos = sub.add_parser("chaos", help="jobs under faults: lost / duplicated summary")
    chaos.add_argument("--jobs", type=int, default=5000)
    chaos.add_argument("--workers", type=int, default=3)
    chaos.add_argument("--slots", type=int, default=16)
    chaos.add_argument("--kill-every", type=float, default=2.0, help="SIGKILL a worker this often (s)")
    chaos.add_argument("--kill-control-plane", action="store_true", help="SIGKILL and restart it mid-run")
    chaos.add_argument("--cluster", action="store_true", help="3-node JetStream cluster, R3")
    chaos.add_argument("--kill-nats-node", nargs="?", const="restart", default="",
                       choices=["restart", "for-good", "leader"],
                       help="SIGKILL one NATS node mid-run: restart it 3 s later (default), never (for-good), "
                            "or kill the dispatch stream's leader (leader)")
    chaos.add_argument("--max-job-ms", type=float, default=20.0)
    chaos.add_argument("--rate", type=float, default=500.0, help="submissions per second")
    chaos.add_argument("--deadline", type=float, default=300.0)
    chaos.add_argument("--log-level", default="WARNING", help="the children's log level (logs kept on failure)")
    chaos.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.command == "chaos":
        from loadtest.chaos import ChaosOptions, run_chaos

        res = asyncio.run(run_chaos(ChaosOptions(
            jobs=args.jobs, workers=args.workers, slots=args.slots, kill_every=args.kill_every,
            kill_control_plane=args.kill_control_plane, cluster=args.cluster, kill_nats_node=args.kill_nats_node,
            max_job_ms=args.max_job_ms, rate=args.rate, deadline_s=args.deadline,
            log_level=args.log_level)))
        print(res.summary())
        if args.json:
            print(json.dumps({k: v for k, v in vars(res).items() if k != "latencies_ms"}))
        return 0 if res.clean else 1
    if args.kind in ("coldstart", "burst"):
        from loadtest.autoscale_bench import BurstOptions, ColdstartOptions, bench_burst, bench_coldstart

        if args.kind == "coldstart":
            env = {"MNEMOS_AUTOSCALER_LOCAL_ZYGOTE": "false"} if args.no_zygote else {}
            print(f"starting a local stack with the autoscaler at zero workers "
                  f"({'fresh processes' if args.no_zygote else 'zygote'}) ...", flush=True)
            with local_stack(workers=0, slots=4, autoscale=True, max_workers=1, env=env) as stack:
                result = asyncio.run(bench_coldstart(stack.settings, ColdstartOptions(runs=args.runs)))
        else:
            burst_options = BurstOptions(steps=args.steps, high_s=args.high, low_s=args.low, rate=args.rate,
                                   job_s=args.job_seconds, max_workers=args.max_workers, slots=args.slots,
                                   window_s=args.window, kill_autoscaler=args.kill_autoscaler, out=args.out)
            print("starting a local stack with the autoscaler at zero workers ...", flush=True)
            with local_stack(workers=0, slots=args.slots, autoscale=True, max_workers=args.max_workers) as stack:
                result = asyncio.run(bench_burst(stack.settings, stack, burst_options))
    elif args.kind in ("actor", "batch"):
        from loadtest.apps_bench import ActorOptions, BatchOptions, bench_actor, bench_batch

        print("starting a local stack (1 worker, 16 slots) ...", flush=True)
        with local_stack(workers=1, slots=16) as stack:
            if args.kind == "actor":
                result = asyncio.run(bench_actor(stack.settings, ActorOptions(args.n, args.window, args.roundtrips)))
            else:
                result = asyncio.run(bench_batch(stack.settings, BatchOptions(args.callers, args.calls)))
    elif args.kind == "generate":
        from loadtest.generate_bench import GenerateOptions, bench_generate

        result = asyncio.run(bench_generate(GenerateOptions(
            streams=tuple(args.streams), max_tokens=args.max_tokens, rounds=args.rounds,
            max_batch_size=args.max_batch_size)))
    elif args.kind == "affinity":
        from loadtest.affinity_bench import AffinityOptions, bench_affinity

        print("starting a local stack (2 workers holding one model each) ...", flush=True)
        result = bench_affinity(AffinityOptions(jobs=args.jobs, concurrency=args.concurrency,
                                                max_tokens=args.max_tokens))
    elif args.kind == "workerstart":
        from loadtest.start_bench import StartOptions, bench_workerstart

        result = bench_workerstart(StartOptions(runs=args.runs, zygote=not args.no_zygote))
    elif args.kind == "scale":
        rows = asyncio.run(scale_bench.bench_scale(scale_bench.options_from_args(args)))
        print(scale_bench.format_table(rows))
        if args.json:
            print(json.dumps(rows))
        return 0
    elif args.kind == "http":
        from loadtest.http_bench import HttpOptions, bench_http

        options = HttpOptions(jobs=args.jobs, window=args.window, procs=args.procs, roundtrips=args.roundtrips,
                              completions=args.completions)
        if args.gateway_url:
            result = bench_http(args.gateway_url, options, args.api_key)
        else:
            print("starting a local stack with the HTTP gateway ...", flush=True)
            with local_stack(workers=1, slots=256, gateway=True) as stack:
                assert stack.gateway_url is not None
                result = bench_http(stack.gateway_url, options,
                                    cpu=(lambda: cpu_per_process(stack)) if args.cpu else None, nats=stack.settings)
    elif args.kind == "noop":
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
