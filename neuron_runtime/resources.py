"""What the worker machine has: CPU, memory, disk from psutil; GPUs from NVML when present."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from mnemos.messages import GPUInfo, SystemResources

__all__ = ["ResourceMonitor"]

log = logging.getLogger("mnemos.resources")


class ResourceMonitor:
    """Cheap snapshots for heartbeats. No GPU (NVML missing or no device) is normal."""

    def __init__(self, disk_path: Path) -> None:
        self._disk_path = disk_path
        self._proc = psutil.Process()
        psutil.cpu_percent(interval=None)  # prime the non-blocking counter
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            log.info("NVML: %d GPU(s)", pynvml.nvmlDeviceGetCount())
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
            log.info("no GPU monitoring (%s); reporting CPU resources only", type(e).__name__)

    def gpus(self) -> list[GPUInfo]:
        nv = self._nvml
        if nv is None:
            return []
        out: list[GPUInfo] = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                name = nv.nvmlDeviceGetName(h)
                try:
                    temp: float | None = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                except nv.NVMLError:
                    temp = None
                try:
                    power: float | None = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                except nv.NVMLError:
                    power = None
                out.append(
                    GPUInfo(
                        index=i,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        uuid=str(nv.nvmlDeviceGetUUID(h)),
                        total_memory_mb=int(mem.total // 2**20),
                        available_memory_mb=int(mem.free // 2**20),
                        utilization_percent=float(util.gpu),
                        temperature_celsius=temp,
                        power_watts=power,
                    )
                )
        except nv.NVMLError as e:
            log.warning("NVML query failed: %s", e)
        return out

    def rss_mb(self) -> float:
        return float(self._proc.memory_info().rss) / 2**20

    def snapshot(self) -> SystemResources:
        vm = psutil.virtual_memory()
        path = self._disk_path if self._disk_path.exists() else Path("/")
        disk = psutil.disk_usage(str(path))
        return SystemResources(
            cpu_count=psutil.cpu_count() or 1,
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_total_mb=int(vm.total // 2**20),
            memory_available_mb=int(vm.available // 2**20),
            disk_total_gb=round(disk.total / 2**30, 2),
            disk_available_gb=round(disk.free / 2**30, 2),
            process_rss_mb=round(self.rss_mb(), 1),
            gpus=self.gpus(),
        )
