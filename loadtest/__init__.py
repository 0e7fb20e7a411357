"""Load generation, benchmarks and (later) chaos runs for MNEMOS: ``python -m loadtest``."""

from loadtest.bench import NoopOptions, StreamOptions, bench_noop, bench_stream, local_stack, percentiles

__all__ = ["NoopOptions", "StreamOptions", "bench_noop", "bench_stream", "local_stack", "percentiles"]
