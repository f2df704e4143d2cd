"""Build TensorRT engines from an engine kit (`qvl-compile build-engine KIT`).

One code path for every supported library, with small version shims:

| library                         | import                          | used for                                         |
|---------------------------------|---------------------------------|--------------------------------------------------|
| TensorRT 8.6 (`tensorrt`)       | `tensorrt`                      | sm61 engines: the last TensorRT for Pascal       |
| TensorRT >= 10 (`tensorrt`)     | `tensorrt`                      | sm75+ engines (dropped Pascal: refused for sm61) |
| TensorRT-RTX (`tensorrt-rtx-*`) | `tensorrt_rtx_bindings` / `tensorrt_rtx` | sm75+ engines; CPU-only parse/build proof of any kit with `allow_target_mismatch=True` |

Shims: the explicit-batch network flag (required by 8.6, implied by 10 / RTX); builder flags that exist
only in some versions (`FP16`, `INT8`, `TF32` are absent from strongly-typed TensorRT-RTX); the timing
cache (TensorRT only: RTX ignores it and would need a GPU to create one); `platform_has_fast_fp16` (8.6,
used to tell a Pascal GP10x from newer GPUs when cuda-python is not installed). Everything else --
`parse_from_file`, `set_memory_pool_limit`, optimization profiles, `build_serialized_network`,
`BuilderFlag.REFIT` -- is the same API in 8.6, 10 and RTX.

Per graph the builder writes `<graph>.engine` and, with TensorRT, `<graph>.timing.cache` next to it
(re-used by the next build); `build.json` records library, flags, profiles, sizes, times and the FP16
check and which matrix multiplies take INT8 Q/DQ operands (`int8_matmuls`). FP16 guard for sm61 (FP16 runs at 1/64 rate on GP10x): the parsed network is inspected before
the build -- any layer whose precision, output-type constraint or output tensor is FP16/BF16, or an FP16
builder flag, is a `QvlError`.

Which builder (`builder_kind`, pure): with the full `tensorrt` package (>= 8.6) and Polygraphy (>= 0.49,
the `trt` extra) importable, engines are built through Polygraphy's loaders -- `NetworkFromOnnxPath`,
`CreateConfig` (the kit's profiles as `Profile`s, INT8 for Q/DQ kits, never FP16 for sm61, REFIT, the
workspace pool, the optimization level, the timing cache), `EngineBytesFromNetwork` (which also saves the
merged timing cache), the plan then written atomically (what `SaveEngine` does, without a partial file on a
crash). `tensorrt` without Polygraphy keeps the TensorRT API path below; TensorRT-RTX (`tensorrt_rtx*`)
always takes that API path, unchanged: Polygraphy drives RTX only through a process-wide
`POLYGRAPHY_USE_TENSORRT_RTX=1` switch and the `tensorrt_rtx` module name, and refuses precision flags there.
What each builder gets -- profiles, flags, workspace, timing cache path, notes -- is one pure `build_plan`,
shared by both paths; `polygraphy_config_kwargs` turns it into `CreateConfig`'s arguments.

What has run where: the TensorRT-RTX API path builds every kit on a CPU-only machine in the tests. The
Polygraphy path with real `tensorrt` 8.6 / 10 has NOT run here (`tensorrt` is not installable without
NVIDIA's index and a GPU); its decisions (`builder_kind`, `build_plan`, `polygraphy_config_kwargs`) are
unit-tested, and its loader calls are exercised against TensorRT-RTX through Polygraphy's own RTX switch
(tests/test_inspect_precision.py), which proves the calls and arguments but not a `tensorrt` 8.6 build.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from qvl.artifacts import manifest as mf
from qvl.artifacts.schema import Kit, Manifest
from qvl.errors import QvlError

ENGINES_DIR = "engines"
BUILD_REPORT = "build.json"
MIN_TENSORRT = (8, 6)
MIN_POLYGRAPHY = (0, 49)
INSTALL_HINT = ("on the Pascal laptop: pip install 'tensorrt==8.6.1' (needs NVIDIA's index); "
                "CPU-only parse/build check: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


@dataclass
class TrtLibrary:
    trt: object  # the imported module
    flavor: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.flavor == 'tensorrt-rtx' else 'TensorRT'} {self.version}"


def load_tensorrt(prefer: str | None = None) -> TrtLibrary:
    """The importable TensorRT flavour: `tensorrt` (>= 8.6) first, else TensorRT-RTX."""
    errors = []
    order = [("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx_bindings"), ("tensorrt-rtx", "tensorrt_rtx")]
    if prefer:
        order = [o for o in order if o[0] == prefer]
    for flavor, module in order:
        try:
            mod = __import__(module)
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
            continue
        except Exception as exc:  # a broken install (e.g. missing libnvinfer) is "not usable", not a crash
            errors.append(f"{module}: {type(exc).__name__}: {exc}")
            continue
        version = getattr(mod, "__version__", "0")
        if flavor == "tensorrt" and tuple(int(x) for x in version.split(".")[:2]) < MIN_TENSORRT:
            raise QvlError(f"TensorRT {version} is too old: engine kits need TensorRT >= 8.6", hint=INSTALL_HINT)
        if not hasattr(mod, "Builder"):  # e.g. PyPI's `tensorrt` placeholder without the real bindings
            errors.append(f"{module}: no Builder (placeholder package?)")
            continue
        return TrtLibrary(mod, flavor, version)
    raise QvlError("neither TensorRT (>= 8.6) nor TensorRT-RTX is installed: cannot build engines",
                   hint=INSTALL_HINT)


def device_compute_capability() -> tuple[int, int] | None:
    """GPU 0's compute capability through cuda-python, or None when unknown."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    try:
        attr = cudart.cudaDeviceAttr
        err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0)
        err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0)
        if err != cudart.cudaError_t.cudaSuccess or err2 != cudart.cudaError_t.cudaSuccess:
            return None
        return int(major), int(minor)
    except Exception:
        return None


def target_mismatch(flavor: str, version: str, kit_target: str, device_cc: tuple[int, int] | None,
                    fast_fp16: bool | None = None) -> str | None:
    """Why this library / GPU cannot build engines that run on the kit's target (None: it can)."""
    major = int(version.split(".")[0])
    if kit_target == "sm61":
        if flavor == "tensorrt-rtx":
            return (f"TensorRT-RTX {version} builds for Turing (SM 7.5) and newer only; the kit targets sm61 (Pascal), "
                    "whose last TensorRT is 8.6")
        if major >= 10:
            return f"TensorRT {version} dropped Pascal (SM 6.x); sm61 engines need TensorRT 8.6, the last release for SM 6.1"
        if device_cc is not None and device_cc != (6, 1):
            return f"the GPU is SM {device_cc[0]}.{device_cc[1]}, not SM 6.1: TensorRT engines only run on the GPU kind they were built on"
        if device_cc is None and fast_fp16:
            return "the GPU has fast FP16, so it is not a Pascal GP10x (SM 6.1): the engine would not run on the target"
        return None
    if kit_target == "sm75+":
        if device_cc is not None and device_cc < (7, 5):
            return f"the GPU is SM {device_cc[0]}.{device_cc[1]}: sm75+ engines need Turing (SM 7.5) or newer"
        if flavor == "tensorrt" and device_cc is None and fast_fp16 is False:
            return "the GPU has no fast FP16 (Pascal or older): sm75+ engines need Turing (SM 7.5) or newer"
        return None
    return f"unknown kit target {kit_target!r}"


# -- logger, parse, FP16 guard ----------------------------------------------------------------


def _make_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            name = getattr(severity, "name", str(severity))
            self.messages.append((name, msg))
            if os.environ.get("QVL_TRT_VERBOSE") and int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT {name}] {msg}")

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR", "kERROR", "kINTERNAL_ERROR")]

    return _Logger()


def _network_flags(lib: TrtLibrary) -> int:
    flags = lib.trt.NetworkDefinitionCreationFlag
    if lib.flavor == "tensorrt" and lib.major < 10 and hasattr(flags, "EXPLICIT_BATCH"):
        return 1 << int(flags.EXPLICIT_BATCH)  # 8.6: implicit batch is the default
    return 0  # 10 / RTX: explicit batch always (RTX networks are strongly typed)


@dataclass
class ParsedNetwork:
    lib: TrtLibrary
    builder: object
    network: object
    parser: object
    logger: object
    path: Path


def parse_onnx(lib: TrtLibrary, onnx_path: Path) -> ParsedNetwork:
    trt = lib.trt
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise QvlError(f"{lib.label} could not create a builder (no usable CUDA GPU or driver?)", hint=INSTALL_HINT)
    network = builder.create_network(_network_flags(lib))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise QvlError(f"{lib.label}'s ONNX parser rejected {Path(onnx_path).name}: {(errs or logger.errors() or ['unknown error'])[0]}",
                       hint="the kit graphs must be standard ONNX within the target's opset")
    return ParsedNetwork(lib, builder, network, parser, logger, Path(onnx_path))


_LOW_PRECISION = ("HALF", "BF16")


def fp16_violations(lib: TrtLibrary, network, config=None) -> tuple[int, list[str]]:
    """(layers checked, problems) for a parsed network: layers computing in FP16/BF16, FP16 builder flags."""
    trt = lib.trt
    problems = []
    if config is not None:
        for flag in ("FP16", "BF16"):
            f = getattr(trt.BuilderFlag, flag, None)
            if f is not None and config.get_flag(f):
                problems.append(f"builder flag {flag} is set")
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.dtype.name in _LOW_PRECISION:
            problems.append(f"network input {t.name} is {t.dtype.name}")
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        where = f"{layer.name} ({layer.type.name})"
        if getattr(layer, "precision_is_set", False) and layer.precision.name in _LOW_PRECISION:
            problems.append(f"{where}: precision {layer.precision.name}")
        for j in range(layer.num_outputs):
            out = layer.get_output(j)
            if out is not None and out.dtype.name in _LOW_PRECISION:
                problems.append(f"{where}: output {j} is {out.dtype.name}")
            elif hasattr(layer, "output_type_is_set") and layer.output_type_is_set(j) and layer.get_output_type(j).name in _LOW_PRECISION:
                problems.append(f"{where}: output {j} constrained to {layer.get_output_type(j).name}")
    return network.num_layers, problems


def check_no_fp16(lib: TrtLibrary, network, config, graph: str) -> dict:
    n, problems = fp16_violations(lib, network, config)
    if problems:
        raise QvlError(f"sm61 build of {graph} would compute in FP16/BF16 ({len(problems)} site(s), first: {problems[0]})",
                       hint="Pascal GP10x runs FP16 at 1/64 rate: sm61 kits must be FP32 (+INT8 only with explicit Q/DQ)")
    return {"layers_checked": n, "fp16_layers": [], "fp16_flag": False}


def int8_matmuls(lib: TrtLibrary, network) -> dict:
    """Which matrix multiplies of a parsed network take INT8 Q/DQ operands on both sides.

    Explicit quantization in TensorRT: a MATRIX_MULTIPLY whose two inputs are DEQUANTIZE outputs of INT8
    tensors (a QUANTIZE to INT8, or an INT8 constant) is fused into an INT8 GEMM. This reads that from the
    network definition; the engine inspector would show the chosen kernels, but it needs the engine
    deserialized on a GPU (not available to a CPU-only TensorRT-RTX build)."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            out = layer.get_output(j)
            if out is not None:
                producer[out.name] = layer

    def int8_dq(tensor) -> bool:
        layer = producer.get(tensor.name) if tensor is not None else None
        while layer is not None and layer.type.name == "SHUFFLE":  # a transpose/reshape between DQ and the GEMM
            t = layer.get_input(0)
            layer = producer.get(t.name) if t is not None else None
        if layer is None or layer.type.name != "DEQUANTIZE":
            return False
        src = layer.get_input(0)
        return src is not None and src.dtype.name == "INT8"

    total, int8, names = 0, 0, []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type.name != "MATRIX_MULTIPLY":
            continue
        total += 1
        if int8_dq(layer.get_input(0)) and int8_dq(layer.get_input(1)):
            int8 += 1
            names.append(layer.name)
    return {"matmuls": total, "int8_matmuls": int8, "int8_layers": names,
            "source": "network definition (INT8 Q/DQ on both operands); engine inspector needs a GPU"}


# -- build ----------------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in str(version).split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def polygraphy_version() -> str | None:
    """Polygraphy's version when it is importable (pure Python: its trt loaders import `tensorrt` only when called)."""
    try:
        import polygraphy
    except ImportError:
        return None
    return str(getattr(polygraphy, "__version__", "0"))


def builder_kind(flavor: str, version: str, polygraphy: str | None) -> str:
    """Which builder a library gets: "polygraphy" (full TensorRT >= 8.6 with Polygraphy >= 0.49), "tensorrt"
    (the TensorRT API directly: no usable Polygraphy) or "tensorrt-rtx" (the TensorRT-RTX API, always)."""
    if flavor == "tensorrt-rtx":
        return "tensorrt-rtx"
    if flavor != "tensorrt":
        raise ValueError(f"unknown TensorRT flavour {flavor!r}")
    if _version_tuple(version)[:2] < MIN_TENSORRT:
        raise QvlError(f"TensorRT {version} is too old: engine kits need TensorRT >= 8.6", hint=INSTALL_HINT)
    if polygraphy is not None and _version_tuple(polygraphy)[:2] >= MIN_POLYGRAPHY:
        return "polygraphy"
    return "tensorrt"


@dataclass(frozen=True)
class BuildPlan:
    """What one graph's build gets, decided without TensorRT (`build_plan`)."""

    builder: str  # builder_kind()
    profiles: tuple  # ({"name", "shapes": {input: {"min", "opt", "max"}}}, ...): the kit's, inputs sorted
    flags: dict  # refit / tf32 / fp16 / int8 -> requested on (applied where the library has the flag)
    workspace_bytes: int
    builder_optimization_level: int | None
    timing_cache: Path | None  # TensorRT only: `<graph>.timing.cache` next to the engine
    notes: tuple = ()


def build_plan(builder: str, settings: dict, profiles: list[dict], target: str, input_names: Iterable[str],
               engine_path: Path, *, gpu_present: bool = True, graph_file: str = "the graph",
               label: str | None = None) -> BuildPlan:
    """The build of one graph from the kit's build settings and profiles (pure: no TensorRT import).

    Rules: FP16 never for sm61 (whatever the settings say); INT8 exactly when the kit says so (Q/DQ graphs);
    TF32 as the settings say (off in every kit); REFIT except on TensorRT-RTX without a GPU (its CPU-only AOT
    build fails with it); a timing cache for TensorRT only (RTX ignores it and would need a GPU to create
    one); every profile must give shapes for every network input (a `QvlError` naming the first gap).
    `label` (e.g. "TensorRT-RTX 1.7.1") only words the notes."""
    label = label or ("TensorRT-RTX" if builder == "tensorrt-rtx" else "TensorRT")
    names = sorted(set(input_names))
    notes = []
    plans = []
    for p in profiles:
        missing = sorted(set(names) - set(p["shapes"]))
        if missing:
            raise QvlError(f"profile {p['name']} of {graph_file} has no shapes for input(s) {', '.join(missing)}",
                           hint="re-make the kit with this qvl-compile version")
        plans.append({"name": p["name"], "shapes": {n: {k: [int(d) for d in p["shapes"][n][k]] for k in ("min", "opt", "max")}
                                                    for n in names}})
    refit = bool(settings.get("refit"))
    if refit and builder == "tensorrt-rtx" and not gpu_present:
        refit = False
        notes.append(f"REFIT not applied: {label} cannot build refittable engines without a GPU")
    flags = {
        "refit": refit,
        "tf32": bool(settings.get("tf32")),
        "fp16": bool(settings.get("fp16")) and target != "sm61",
        "int8": bool(settings.get("int8")),
    }
    cache = None
    if builder == "tensorrt-rtx":
        notes.append(f"timing cache not used: {label} ignores timing caches (and needs a GPU to create one)")
    else:
        cache = Path(engine_path).with_suffix(".timing.cache")
    level = settings.get("builder_optimization_level")
    return BuildPlan(builder, tuple(plans), flags, int(settings["workspace_bytes"]),
                     None if level is None else int(level), cache, tuple(notes))


def polygraphy_config_kwargs(plan: BuildPlan, trt) -> dict:
    """`polygraphy.backend.trt.CreateConfig(**kwargs)` for a plan; `trt` is the module Polygraphy drives (its
    `MemoryPoolType`, and which precision flags exist). Pure apart from building Polygraphy's `Profile`s."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for p in plan.profiles:
        prof = Profile()
        for name, s in p["shapes"].items():
            prof.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        profiles.append(prof)

    def has(flag: str) -> bool:  # strongly-typed TensorRT-RTX has no FP16 / INT8 / TF32 flags (Polygraphy refuses them)
        return getattr(trt.BuilderFlag, flag, None) is not None

    kwargs = {
        "profiles": profiles,
        "tf32": plan.flags["tf32"] and has("TF32"),
        "fp16": plan.flags["fp16"] and has("FP16"),
        "int8": plan.flags["int8"] and has("INT8"),
        "refittable": plan.flags["refit"],
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes},
    }
    if plan.builder_optimization_level is not None:
        kwargs["builder_optimization_level"] = plan.builder_optimization_level
    if plan.timing_cache is not None:
        kwargs["load_timing_cache"] = str(plan.timing_cache)
    return kwargs


def _set_flag(trt, config, name: str, on: bool) -> bool | None:
    """Set/clear a builder flag if this TensorRT has it; returns the state applied or None."""
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        return None
    (config.set_flag if on else config.clear_flag)(flag)
    return on


def _applied_flags(trt, config) -> dict:
    """refit / tf32 / fp16 / int8 as set on a builder config (None: this library has no such flag)."""
    out = {}
    for key, name in (("refit", "REFIT"), ("tf32", "TF32"), ("fp16", "FP16"), ("int8", "INT8")):
        flag = getattr(trt.BuilderFlag, name, None)
        out[key] = None if flag is None else bool(config.get_flag(flag))
    return out


def configure(lib: TrtLibrary, builder, plan: BuildPlan):
    """TensorRT API path: a builder config from the plan; returns (config, applied flags)."""
    trt = lib.trt
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if hasattr(config, "builder_optimization_level") and plan.builder_optimization_level is not None:
        config.builder_optimization_level = plan.builder_optimization_level
    flags = {k: _set_flag(trt, config, k.upper(), v) for k, v in plan.flags.items()}
    for p in plan.profiles:
        prof = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)
    return config, flags


def _quiet_polygraphy():
    """Polygraphy logs to stdout: keep it off (stdout is the commands' output) unless QVL_TRT_VERBOSE is set."""
    import contextlib
    import sys

    from polygraphy.logger import G_LOGGER

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
    stack.enter_context(G_LOGGER.verbosity(G_LOGGER.VERBOSE if os.environ.get("QVL_TRT_VERBOSE") else G_LOGGER.CRITICAL))
    return stack


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def polygraphy_parse(lib: TrtLibrary, onnx_path: Path):
    """(builder, network, parser) through `polygraphy.backend.trt.NetworkFromOnnxPath`."""
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    try:
        with _quiet_polygraphy():
            return NetworkFromOnnxPath(str(onnx_path))()
    except PolygraphyException as exc:
        raise QvlError(f"{lib.label}'s ONNX parser (through Polygraphy) rejected {Path(onnx_path).name}: {_first_line(exc)}",
                       hint="the kit graphs must be standard ONNX within the target's opset") from None


def polygraphy_config(lib: TrtLibrary, plan: BuildPlan, builder, network):
    """`CreateConfig(**polygraphy_config_kwargs(plan))` applied to the parsed network; (config, applied flags)."""
    from polygraphy.backend.trt import CreateConfig
    from polygraphy.exception import PolygraphyException

    try:
        with _quiet_polygraphy():
            config = CreateConfig(**polygraphy_config_kwargs(plan, lib.trt))(builder, network)
    except PolygraphyException as exc:
        raise QvlError(f"Polygraphy could not configure the {lib.label} build: {_first_line(exc)}",
                       hint="set QVL_TRT_VERBOSE=1 to see Polygraphy's log") from None
    return config, _applied_flags(lib.trt, config)


def polygraphy_build(lib: TrtLibrary, network_tuple, config, plan: BuildPlan, graph: str):
    """The serialized plan through `EngineBytesFromNetwork` (which also saves the merged timing cache)."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    cache = str(plan.timing_cache) if plan.timing_cache is not None else None
    try:
        with _quiet_polygraphy():
            return EngineBytesFromNetwork(network_tuple, config=config, save_timing_cache=cache)()
    except PolygraphyException as exc:
        raise QvlError(f"{lib.label} (through Polygraphy) could not build {graph}: {_first_line(exc)}",
                       hint="set QVL_TRT_VERBOSE=1 to see Polygraphy's and TensorRT's log") from None


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_graph(lib: TrtLibrary, onnx_path: Path, graph: str, profiles: list[dict], settings: dict, target: str,
                engine_path: Path, gpu_present: bool = True, builder: str | None = None) -> dict:
    """Parse, configure, check and build one graph; `builder` defaults to `builder_kind` for `lib`."""
    trt = lib.trt
    kind = builder or builder_kind(lib.flavor, lib.version, polygraphy_version())
    t0 = time.perf_counter()
    if kind == "polygraphy":
        network_tuple = polygraphy_parse(lib, onnx_path)
        trt_builder, network = network_tuple[0], network_tuple[1]
        logger = None
    else:
        parsed = parse_onnx(lib, onnx_path)
        trt_builder, network, logger = parsed.builder, parsed.network, parsed.logger
    parse_s = time.perf_counter() - t0
    plan = build_plan(kind, settings, profiles, target, (network.get_input(i).name for i in range(network.num_inputs)),
                      engine_path, gpu_present=gpu_present, graph_file=Path(onnx_path).name, label=lib.label)
    notes = list(plan.notes)
    if kind == "polygraphy":
        config, flags = polygraphy_config(lib, plan, trt_builder, network)
        notes.append(f"built through Polygraphy {polygraphy_version()} (NetworkFromOnnxPath, CreateConfig, EngineBytesFromNetwork)")
    else:
        config, flags = configure(lib, trt_builder, plan)
    fp16 = check_no_fp16(lib, network, config, graph) if target == "sm61" else None
    int8 = int8_matmuls(lib, network)
    if kind == "tensorrt":  # the API path's timing cache (Polygraphy's CreateConfig loads it itself)
        blob = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    t1 = time.perf_counter()
    if kind == "polygraphy":
        serialized = polygraphy_build(lib, network_tuple, config, plan, graph)
    else:
        serialized = trt_builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    if serialized is None:
        errs = logger.errors() if logger is not None else []
        raise QvlError(f"{lib.label} could not build {graph}: {errs[-1] if errs else 'unknown error'}",
                       hint="set QVL_TRT_VERBOSE=1 to see TensorRT's log")
    _write_atomic(engine_path, memoryview(serialized))
    if kind == "tensorrt":  # (EngineBytesFromNetwork has saved Polygraphy's, merged with the previous one)
        _write_atomic(plan.timing_cache, memoryview(config.get_timing_cache().serialize()))
    return {
        "file": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "sha256": mf.sha256_file(engine_path),
        "layers": network.num_layers,
        "profiles": [p["name"] for p in profiles],
        "builder": kind,
        "flags": flags,
        "timing_cache": plan.timing_cache.name if plan.timing_cache is not None else None,
        "notes": notes,
        "fp16_check": fp16,
        "int8_check": int8,
        "parse_seconds": round(parse_s, 3),
        "build_seconds": round(build_s, 3),
        "network_inputs": {network.get_input(i).name: network.get_input(i).dtype.name
                           for i in range(network.num_inputs)},
        "strongly_typed": bool(getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) is not None
                               and network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
    }


@dataclass
class BuildReport:
    out: Path
    library: str
    target: str
    target_mismatch: str | None
    engines: dict = field(default_factory=dict)
    seconds: float = 0.0


def read_kit(kit_dir: Path) -> tuple[Manifest, Kit]:
    """The kit's typed manifest and its `kit` section (a QvlError if it is an artifact but not a kit)."""
    manifest = mf.read_manifest(Path(kit_dir))
    kit = manifest.kit
    if kit is None or not kit.is_trt_kit:
        raise QvlError(f"{kit_dir} is an artifact but not a TensorRT engine kit",
                       hint="make one with `qvl-compile compile SOURCE --target sm61 --out KIT`")
    return manifest, kit


def build_engines(kit_dir: Path, out: Path | None = None, *, allow_target_mismatch: bool = False,
                  graphs: tuple[str, ...] | None = None, library: str | None = None,
                  step: Callable[[str], None] | None = None) -> BuildReport:
    """Build every graph of the kit (or `graphs`) into `out` (default KIT/engines)."""
    step = step or (lambda m: None)
    kit_dir = Path(kit_dir)
    manifest, kit = read_kit(kit_dir)
    lib = load_tensorrt(library)
    target = kit.target
    cc = device_compute_capability()
    fast_fp16 = None
    if lib.flavor == "tensorrt" and cc is None and lib.major < 10:
        logger = _make_logger(lib.trt)
        b = lib.trt.Builder(logger)
        fast_fp16 = bool(getattr(b, "platform_has_fast_fp16", False)) if b is not None else None
    mismatch = target_mismatch(lib.flavor, lib.version, target, cc if lib.flavor == "tensorrt" else None, fast_fp16)
    if mismatch and not allow_target_mismatch:
        raise QvlError(f"cannot build {target} engines here: {mismatch}", hint=INSTALL_HINT)
    out = Path(out) if out is not None else kit_dir / ENGINES_DIR
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = BuildReport(out, lib.label, target, mismatch)
    kind = builder_kind(lib.flavor, lib.version, polygraphy_version())
    via = f" through Polygraphy {polygraphy_version()}" if kind == "polygraphy" else ""
    names = graphs or tuple(kit.graphs)
    for name in names:
        if name not in kit.graphs:
            raise QvlError(f"the kit has no graph {name!r}", hint=f"graphs: {', '.join(kit.graphs)}")
        g = kit.graphs[name]
        step(f"building {name} with {lib.label}{via}")
        report.engines[name] = build_graph(lib, manifest.path(g.file), name, list(g.profiles), kit.build.to_json(), target,
                                           out / f"{name}.engine", gpu_present=cc is not None or lib.flavor == "tensorrt",
                                           builder=kind)
    report.seconds = time.perf_counter() - t0
    record = {
        "library": {"flavor": lib.flavor, "version": lib.version},
        "builder": {"kind": kind, "polygraphy": polygraphy_version() if kind == "polygraphy" else None},
        "target": target,
        "target_mismatch": mismatch,
        "device_compute_capability": list(cc) if cc else None,
        "kit_manifest_sha256": mf.sha256_file(kit_dir / mf.MANIFEST),
        "engines": report.engines,
        "seconds": round(report.seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(out / BUILD_REPORT, json.dumps(record, indent=2).encode())
    return report


def build_engine_command(kit: Path, out: Path | None = None, *, allow_target_mismatch: bool = False,
                         echo: Callable[[str], None] | None = None) -> BuildReport:
    """CLI body of `qvl-compile build-engine KIT [--out DIR]`."""
    import sys

    echo = echo or (lambda s: print(s, file=sys.stderr))
    report = build_engines(kit, out, allow_target_mismatch=allow_target_mismatch, step=echo)
    if report.target_mismatch:
        echo(f"warning: {report.target_mismatch} -- these engines prove the kit parses and builds; they do not run on the target")
    for name, e in report.engines.items():
        on = [k for k, v in e["flags"].items() if v]
        fp16 = e["fp16_check"]
        echo(f"  {name:<8} {e['layers']} layers, {e['bytes'] / 1e6:.1f} MB, profiles {'/'.join(e['profiles'])}, "
             f"flags {','.join(on) or 'none'}, parse {e['parse_seconds']:.1f} s + build {e['build_seconds']:.1f} s"
             + (f", fp16 check: {fp16['layers_checked']} layers, none FP16" if fp16 else "")
             + (f", INT8 Q/DQ matmuls {e['int8_check']['int8_matmuls']}/{e['int8_check']['matmuls']}"
                if e.get("int8_check", {}).get("int8_matmuls") else ""))
    echo(f"wrote {len(report.engines)} engine(s) to {report.out} with {report.library} in {report.seconds:.1f} s")
    return report
