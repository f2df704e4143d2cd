"""Which backend a `device` gets: `resolve` (cheap checks, no sessions) and `load_runner` (builds the runner).

Rules:
* `cpu`  -> ONNX Runtime, CPUExecutionProvider. A note only when the artifact's int8 GEMM weights can saturate on
  this CPU (`int8_saturation_note`).
* `cuda` -> ONNX Runtime, CUDAExecutionProvider. A one-line QvlError (exit 2) when onnxruntime has no CUDA
  provider (hint: pip install onnxruntime-gpu) or the provider cannot start (no GPU / driver).
* `trt`  -> TensorRT engines of an engine kit (`TrtEngine`). A one-line QvlError when the artifact is not a
  kit, the kit has no built engines, or neither `tensorrt` nor TensorRT-RTX is importable.
* `auto` -> CUDA when onnxruntime has the CUDA provider and the artifact is one the CUDA provider runs, else
  CPU; if the CUDA runner then fails to load (no device, out of device memory), CPU. Whenever `auto` ends on
  the CPU, `Selection.note` says why (the CLI prints it once on stderr as `note: ...`), plus the saturation note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError
from qvl.runtime.cpu_flags import cpu_model_and_flags, has_vnni

DEVICES = ("auto", "cpu", "cuda", "trt")
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Selection:
    device: str  # the resolved device: "cpu" | "cuda" | "trt" | "cpu+cuda" (a split placement)
    note: str | None = None  # set when "auto" fell back to the CPU: why
    plan: object | None = None  # the `runtime.placement.Plan` a --ram-budget / --vram-budget load executes


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise QvlError(f"unknown device {device!r}", hint=f"use one of: {', '.join(DEVICES)}")
    return device


def cuda_provider_missing() -> str | None:
    """Why onnxruntime cannot offer CUDA here, or None."""
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return "onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    return None


# The compute capability a CUDA-target artifact needs: fp16 activations want tensor cores (SM 7.5+); on Pascal
# fp16 runs at 1/64 rate, so such an artifact is the wrong build for the card, not merely a slow one.
MIN_COMPUTE_CAPABILITY = {"cuda": (7, 5), "cuda-sm61": (6, 1)}


def gpu_compute_capability() -> tuple[int, int] | None:
    """GPU 0's compute capability from NVML (nvidia-ml-py), or None when NVML is not installed or not usable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(0))
        return int(major), int(minor)
    except Exception:  # no nvidia-ml-py, no driver, no GPU: the CUDA provider's own start decides
        return None


def capability_blocker(target: str | None, capability: tuple[int, int] | None) -> str | None:
    """Why an artifact compiled for `target` should not run on a GPU of `capability`, or None."""
    need = MIN_COMPUTE_CAPABILITY.get(target or "")
    if need is None or capability is None or tuple(capability) >= need:
        return None
    have = ".".join(map(str, capability))
    hint = " (compile it with --target cuda-sm61 for this GPU)" if target == "cuda" else ""
    return f"the artifact is compiled for {target} (SM {need[0]}.{need[1]}+) and this GPU is SM {have}{hint}"


def cuda_blocker(manifest) -> str | None:
    """Why `auto` should not put this artifact on ORT's CUDA provider, or None.

    A `shared`-cache artifact (the CPU targets' fp32 GroupQueryAttention) has no CUDA kernel: ORT's CUDA
    GroupQueryAttention is fp16/bf16 only, so attention would run on the CPU with the cache crossing PCIe
    every layer. `--device cuda` still tries it (explicitly asked); `auto` keeps it on the CPU."""
    if manifest.kv_mode == "shared" and not (manifest.target or "").startswith("cuda"):
        target = manifest.target or "cpu"
        return (f"the artifact is compiled for {target} (fp32 GroupQueryAttention, which ORT's CUDA provider "
                f"does not run)")
    return None


def resolve(artifact: str | Path, device: str = "auto") -> Selection:
    """The device `device` resolves to for `artifact`, without building sessions (the bench resolves once in
    the parent and passes the result to its worker). Raises the one-line QvlErrors of the rules above."""
    check_device(device)
    from qvl.artifacts.manifest import read_manifest

    manifest = read_manifest(Path(artifact), verify_graphs=False)
    if device == "cpu":
        return Selection("cpu", int8_saturation_note(manifest))
    if device == "trt":
        _check_trt(Path(artifact), manifest)
        return Selection("trt")
    missing = cuda_provider_missing()
    if device == "cuda":
        if missing:
            raise QvlError("device 'cuda' needs onnxruntime-gpu: this onnxruntime has no CUDA provider",
                           hint="pip install onnxruntime-gpu (and check the NVIDIA driver with nvidia-smi)")
        wrong = capability_blocker(manifest.target, gpu_compute_capability())
        if wrong:
            raise QvlError(f"--device cuda: {wrong}", hint="use the artifact compiled for this GPU, or --device cpu")
        return Selection("cuda")
    reason = missing or cuda_blocker(manifest) or capability_blocker(manifest.target, gpu_compute_capability())
    if reason:
        extra = int8_saturation_note(manifest)
        return Selection("cpu", f"running on CPU: {reason}" + (f"; {extra}" if extra else ""))
    return Selection("cuda")


def host_has_vnni() -> bool | None:
    """Whether this CPU has an int8 dot product that accumulates in int32 (AVX-512 VNNI or AVX-VNNI); None when
    /proc/cpuinfo cannot be read (not Linux)."""
    info = cpu_model_and_flags()
    return None if info is None else has_vnni(info[1])


def int8_saturation_note(manifest) -> str | None:
    """A note when the artifact's DynamicQuantizeMatMul weights use the full int8 range (a `cpu-avx512` compile, or
    one made before the range was reduced) and this host has no VNNI: MLAS's u8s8 GEMM then sums pairs of products
    in saturating int16, which measured up to 10 % error (passes/base.py, `dynamic_int8_weight_max`)."""
    precision = dict(manifest.precision or {})
    layers = precision.get("layers") or {}
    if not any(isinstance(d, dict) and d.get("decision") == "int8-dynamic" for d in layers.values()):
        return None
    if (precision.get("config") or {}).get("dynamic_int8_weight_max", 127) <= 63 or host_has_vnni() is not False:
        return None
    return (f"the artifact is compiled for {manifest.target} with full-range int8 DynamicQuantizeMatMul weights and this "
            "CPU has no VNNI: its int8 GEMM can saturate (answers may drift); recompile with --target cpu-avx2")


def _check_trt(artifact: Path, manifest) -> None:
    from qvl.runtime.backends.tensorrt import BUILD_REPORT, ENGINES_DIR, _import_tensorrt

    if manifest.kit is None:
        raise QvlError(f"--device trt needs a TensorRT engine kit; {artifact} is an ONNX Runtime artifact",
                       hint="make a kit with `qvl-compile compile --target sm61` and `build-engine`, or use --device cpu or cuda")
    if not (artifact / ENGINES_DIR / BUILD_REPORT).is_file():
        raise QvlError(f"no engines in {artifact / ENGINES_DIR}", hint=f"build them with `qvl-compile build-engine {artifact}`")
    _import_tensorrt()  # one line naming the missing library


def load_runner(artifact: str | Path, device: str = "auto", threads: int | None = None,
                ram_budget: int | None = None, vram_budget: int | None = None, prefetch: bool = True,
                context: int | None = None, vision: bool = True):
    """(runner, Selection) for `artifact` on `device` (rules in the module docstring). With a RAM or VRAM budget
    the artifact must be partitioned: the placement planner's plan runs on a `PartitionedEngine`."""
    artifact = Path(artifact)
    if ram_budget is not None or vram_budget is not None:
        return _load_planned(artifact, device, threads, ram_budget, vram_budget, prefetch, context, vision)
    sel = resolve(artifact, device)
    if sel.device == "trt":
        from qvl.runtime.backends.tensorrt import TrtEngine

        return TrtEngine(artifact, threads=threads), sel
    from qvl.runtime.backends.ort import Engine

    if sel.device == "cuda":
        try:
            return Engine(artifact, device="cuda", threads=threads), sel
        except QvlError as exc:
            if device != "auto":
                raise
            sel = Selection("cpu", f"running on CPU: the CUDA provider could not load the artifact: {exc}")
    return Engine(artifact, device="cpu", threads=threads), sel


def _load_planned(artifact: Path, device: str, threads: int | None, ram_budget: int | None,
                  vram_budget: int | None, prefetch: bool, context: int | None, vision: bool):
    """A partitioned artifact under budgets: `placement.make_plan` decides per part (device, kept or streamed),
    `PartitionedEngine` executes it, a `Prefetcher` reads the next streamed part's weights while one computes."""
    from qvl.artifacts.manifest import read_manifest
    from qvl.runtime.backends.partitioned import release_freed_memory
    from qvl.runtime.placement import make_plan, measure_host, resolve_device

    check_device(device)
    if device == "trt":
        raise QvlError("--ram-budget / --vram-budget place ONNX Runtime parts; TensorRT engine kits are not partitioned",
                       hint="use --device auto, cpu or cuda with a partitioned ONNX Runtime artifact")
    manifest = read_manifest(artifact)  # verified before the planner opens any part graph
    if manifest.partition is None:
        raise QvlError(f"--ram-budget / --vram-budget need a partitioned artifact; {artifact} has one decoder graph",
                       hint=f"make one with `qvl-compile partition {artifact} --out DIR --every 1`")
    planned_device, _ = resolve_device(manifest, device)  # `--device cuda` without a CUDA provider: one line, here
    speeds = measure_host(manifest, threads=threads, device=planned_device)  # ~1 s: the first layer part and the head
    release_freed_memory()  # the measuring sessions' heap, before the budgeted runner loads
    plan = make_plan(manifest, ram_budget=ram_budget, vram_budget=vram_budget, device=device, speeds=speeds,
                     context=context, prompt_tokens=min(256, context or 256), vision=vision,
                     ram_flag="--ram-budget", vram_flag="--vram-budget")
    from qvl.runtime.backends.partitioned import PartitionedEngine

    prefetcher = None
    if prefetch and any(p.residency == "stream" for p in plan.placement().values()):
        from qvl.runtime.residency import Prefetcher

        prefetcher = Prefetcher()
    runner = PartitionedEngine(artifact, plan.placement(), threads=threads, vision_placement=plan.vision_placement(),
                               prefetcher=prefetcher, max_positions=plan.context, vision=vision, overlap=plan.overlap)
    return runner, Selection(runner.device, None, plan)


def plan_note(plan) -> str:
    """One line for stderr: how many parts (and weight bytes) run where, kept or streamed."""
    groups: dict[str, list] = {}
    for d in plan.parts:
        pl = d.placement
        where = f"{pl.residency} on {pl.device}" + (f" (prefill on {pl.prefill_device})"
                                                     if pl.prefill_device and pl.prefill_device != pl.device else "")
        groups.setdefault(where, []).append(d)
    parts = ", ".join(f"{len(ds)} {'part' if len(ds) == 1 else 'parts'} {k} ({sum(x.weight_bytes for x in ds) / 1e6:.0f} MB)"
                      for k, ds in groups.items())
    vision = plan.vision_placement()
    return f"placement: {parts}; vision {vision.residency} on {vision.device} (`qvl-compile plan` explains it)"
