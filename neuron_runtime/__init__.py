"""The MNEMOS worker (NEURON): pulls jobs by priority, warm model cache, runtimes."""

from neuron_runtime.config import WorkerSettings
from neuron_runtime.worker import Worker

__all__ = ["Worker", "WorkerSettings"]
