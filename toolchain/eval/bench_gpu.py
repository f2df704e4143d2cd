"""The GPU side of `qvl-compile bench --device cuda`: device bandwidth, device memory, GPU facts.

* `measure_device_bandwidth` (in a torch child: the runtime child never imports torch): a device-to-device
  copy of a buffer many times the L2, timed with CUDA events, counting bytes read + written. This is the
  decode roofline's numerator, measured in the same run as the engines (clocks and neighbours vary).
* `device_memory_used` (any child): bytes this process holds on GPU 0, from NVML's per-process accounting
  (nvidia-ml-py), else the device's used memory minus what was used before the engine loaded. ORT's arena
  never shrinks, so the value at the end of a run is its peak.
"""

from __future__ import annotations

import os

COPY_BYTES = 2 << 30  # 2 GiB per direction: far past any L2 (H200: 60 MB)
COPY_SAMPLES = 10


def measure_device_bandwidth(nbytes: int = COPY_BYTES, samples: int = COPY_SAMPLES) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device for the device bandwidth probe")
    n = nbytes // 4
    src = torch.randn(n, device="cuda")  # random, not zeros: what the engines read is not compressible either
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    gbs = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        gbs.append(2 * n * 4 / (a.elapsed_time(b) / 1e3) / 1e9)
    props = torch.cuda.get_device_properties(0)
    return {"samples_gbs": gbs, "bytes_per_copy": 2 * n * 4, "gpu": gpu_facts(props)}


def gpu_facts(props=None) -> dict:
    """Name, compute capability, memory and driver of GPU 0 (torch properties when given, NVML otherwise)."""
    facts: dict = {}
    if props is not None:
        facts.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                     total_memory_bytes=int(props.total_memory), multiprocessors=props.multi_processor_count)
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        facts.setdefault("name", name.decode() if isinstance(name, bytes) else name)
        drv = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        facts["clocks_mhz"] = {"sm": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                               "memory": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)}
    except Exception as exc:  # NVML absent or not permitted: facts stay partial, and say why
        facts["nvml"] = f"unavailable: {type(exc).__name__}"
    return facts


class DeviceMemory:
    """`DeviceMemory()` before loading an engine; `.used()` after: bytes this process holds on GPU 0."""

    def __init__(self):
        self.baseline = self._device_used()

    @staticmethod
    def _handle():
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)

    def _device_used(self) -> int | None:
        try:
            pynvml, h = self._handle()
            return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            return None

    def used(self) -> dict:
        try:
            pynvml, h = self._handle()
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    return {"bytes": int(proc.usedGpuMemory), "method": "nvml per-process"}
        except Exception:
            pass
        now = self._device_used()
        if now is not None and self.baseline is not None:
            return {"bytes": now - self.baseline, "method": "nvml device used minus baseline"}
        return {"bytes": None, "method": "unavailable (no nvidia-ml-py / NVML)"}
