"""The placement planner of a partitioned artifact (`qvl-compile plan`; `run/chat/serve --ram-budget/--vram-budget`):
per decoder part and for the vision encoder, where it runs (`PartPlacement`: device, residency, prefill device,
VRAM cap), why, and what that predicts (time to first token, decode tok/s). `make_plan` is pure arithmetic on the
manifest's byte counts and a `HostSpeeds`; `measure_host` makes that from this machine (or from stated constants):
both in `runtime/host_speeds.py`.

Memory model. RAM: `process` (this process's RSS after importing numpy + onnxruntime; stated 100 MB) + `tokenizer`
(the RSS a load of the artifact's tokenizer.json adds; stated 10x the file) + `embedding_rows` (the mmap pages a
context of token ids can touch: context x pages per row, at most the table) + the KV cache of the parts decoding on
the CPU (2 x layers x kv_heads x head_dim x itemsize x context, per part) + resident weights (ORT copies every
initializer into its heap) + the one stream slot (the largest streamed part, alive only while it runs) + the vision
weights when resident on the CPU + `cuda_runtime` (CUDA_HOST_BYTES, stated) when anything runs on CUDA. VRAM:
CUDA_CONTEXT_BYTES + the resident parts' weights and KV + their session's workspace (`_Costs.prefix_vram`: WORKSPACE_BYTES
stated, plus MatMulNBits' fp32 dequantization scratch of the largest quantized layer: once for the one session the
resident prefix runs in; per part with QVL_PART_JOIN=0), plus the largest transient
session (a CPU part's prefill on the GPU, a streamed vision encoder).

Rules (deterministic; tests/test_plan.py):
1. Device: `cpu`, or `auto` without a usable CUDA provider (`select.cuda_provider_missing`) or with a blocked artifact
   (`select.cuda_blocker`: a `shared` KV artifact's fp32 GroupQueryAttention has no CUDA kernel): every part on the
   CPU, with a note. `make_plan(device="cuda")` plans for the GPU that `gpu_memory` (else NVML, else the VRAM
   budget) describes without probing the provider; `resolve_device` / `require_cuda` probe it (the CLI does).
   A `scatter` KV artifact (cuda-sm61, the Pascal form: ONNX TensorScatter + Attention) splits like the others
   where this onnxruntime's CPU provider has TensorScatter (`cpu_runs_scatter`, onnxruntime >= 1.23). With an older
   CPU provider its parts cannot run on the CPU: every part goes to CUDA, its KV in VRAM, and the parts that do not
   fit stream to the GPU each use (rule 3's choice, applied to VRAM).
2. GPU: the GPU takes a prefix of the parts in execution order (one crossing per step): of the prefixes whose
   weights + KV at context + workspace fit, the one whose whole decode step is predicted fastest (ties: the
   shorter); each part gets `vram_limit` = weights + workspace (a group of joined parts: the sum).
   A CPU part gets `prefill_device="cuda"` when prompt_tokens >= the engine's prefill_min_tokens, its session fits
   the VRAM left, and GPU prefill + session + copying its weights (file -> host -> device at h2d) + its KV back beats
   the CPU prefill. The vision encoder: on CUDA when that beats the CPU for a REFERENCE_PATCHES image, `vram` if it
   fits beside the residents and the largest prefill session, else `stream`.
3. RAM: without a budget every CPU part is resident ("ram"). With one, parts stream smallest first (ties: later in
   execution order first) until the resident set + the slot fit, then streamed parts return to resident, largest
   first (ties: earlier first), while it still fits. The vision encoder streams first, before any decoder part,
   whenever everything resident does not fit: it runs once per image, a decoder part once per token (its slot is
   shared with the parts': they never run at the same time). Below the all-streamed minimum:
   QvlError naming it. Streaming one part alone saves nothing (its slot is its size): at least two stream.
   Overlap (`Plan.overlap`; CPU streaming only: a per-use CUDA session would need a second VRAM slot too): the
   streamed set that leaves room for two slots (the two largest streamed parts at once; possibly streaming more
   parts) is tried too, the runner then making streamed parts in pairs (the second on a background thread while
   the first is made and computes: two loads at once), the share `load_pair` of the second's load predicted hidden,
   at most the first's load and compute; it is taken when its decode step is predicted shorter. `load_pair` is
   stated 0 (no gain measured inside the runner on the 2-core VM: benchmarks/overlap_streaming.py), so plans from
   measured or stated speeds do not overlap; the runner's `overlap=True` is there for hosts where it pays.
4. Times: a part's decode step = (weights + KV read at prompt_tokens) / its device's rate (+ session creation and
   its bytes at min(load, disk) when streamed), plus once per session the device's step cost (`cpu_step` /
   `gpu_step`): consecutive parts with one kept placement run as one session (`part_merge.part_groups`), so a
   group pays it once, carried by its first part; prefill = weights x positions /
   prefill rate (the head runs one position); a device boundary costs its tensors / h2d + crossing latency; the
   KV read and attention's quadratic term are not modelled beyond that. TTFT = prefill of a prompt_tokens text
   prompt (no image; `phases["vision"]["seconds"]` is the per-image cost). Every number's source is "measured"
   or "stated" (`HostSpeeds`, `Speed.how` says which part was timed or what constant it is).

`Plan.to_json()` keys (stable): artifact, device, context, prompt_tokens, image (false), ram_budget, vram_budget,
gpu_memory, ram_bytes, vram_bytes, fixed {process, tokenizer, embedding_rows, kv, vision, stream_slot, cuda_runtime},
parts [{name, kind, layers, weight_bytes, kv_bytes, placement {device, residency, prefill_device, vram_limit, exclusive},
decode_s, prefill_s, reason}], vision (the same keys), phases {vision, prefill, decode}, predicted {ttft_s,
decode_tok_s, prompt_tokens, image, vision_s}, speeds {name: {value, unit, source, how}}, notes [str].
`placements_from_json` reads the placements back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

from qvl.errors import QvlError
from qvl.runtime.backends.partitioned import PartPlacement
from qvl.runtime.part_merge import joining_enabled, part_groups
from qvl.runtime.host_speeds import (  # noqa: F401  (re-exported: the planner's inputs)
    HostSpeeds, Speed, _kv_itemsize, _params_per_byte, gpu_total_memory, measure_host, stated_speeds)

MB, MIB = 10**6, 2**20
PAGE = 4096
DEFAULT_CONTEXT = 4096  # serve's default slot size; --context overrides
REFERENCE_PATCHES = 1024  # a 512x512 image: 256 image tokens
WORKSPACE_BYTES = 64 * MIB  # stated per CUDA decoder session: activations of a prefill step, cuBLAS workspace
VISION_WORKSPACE_BYTES = 256 * MIB  # stated: the vision encoder's activations for a reference image
CUDA_CONTEXT_BYTES = 300 * MIB  # stated: the CUDA context + ORT's kernels on the card
CUDA_HOST_BYTES = 300 * MIB  # stated: host RSS the CUDA runtime adds to the process
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*", re.I)


def parse_size(text: str, flag: str) -> int:
    """Bytes from "2GiB", "512MiB", "8GB" (decimal), "1.5G" (a bare K/M/G/T is binary), "1000000"; QvlError naming
    `flag` for anything else or a size <= 0."""
    m = _SIZE.fullmatch(str(text))
    if m is None or (m.group(3).lower() == "i") or (m.group(3).lower() == "ib" and not m.group(2)):
        raise QvlError(f"{flag} {text!r} is not a size", hint="e.g. 2GiB, 512MiB, 8GB, 1.5G or a byte count")
    unit = "kmgt".index(m.group(2).lower()) + 1 if m.group(2) else 0
    base = 1000 if m.group(3).lower() == "b" else 1024
    value = int(float(m.group(1)) * base ** unit)
    if value <= 0:
        raise QvlError(f"{flag} {text!r} must be larger than 0 bytes", hint="e.g. 2GiB")
    return value


@dataclass(frozen=True)
class PartDecision:
    name: str
    kind: str  # "layers" | "head" | "vision"
    layers: tuple
    weight_bytes: int
    kv_bytes: int
    placement: PartPlacement
    reason: str
    decode_s: float = 0.0  # per token (the vision encoder: 0)
    prefill_s: float = 0.0  # for prompt_tokens positions (the vision encoder: per reference image)

    def to_json(self) -> dict:
        p = self.placement
        placement = {"device": p.device, "residency": p.residency, "prefill_device": p.prefill_device,
                     "vram_limit": p.vram_limit, "exclusive": p.exclusive}
        return {"name": self.name, "kind": self.kind, "layers": list(self.layers), "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "placement": placement, "decode_s": self.decode_s,
                "prefill_s": self.prefill_s, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    artifact: str
    device: str
    parts: tuple
    vision: PartDecision
    phases: dict
    ram_budget: int | None
    vram_budget: int | None
    gpu_memory: int | None
    context: int
    prompt_tokens: int
    ram_bytes: int
    vram_bytes: int
    fixed: dict
    predicted: dict
    speeds: HostSpeeds
    notes: tuple
    overlap: bool = False  # the runner makes the next streamed part's session while the current one computes

    def placement(self) -> dict:
        """What `PartitionedEngine(placement=...)` takes."""
        return {d.name: d.placement for d in self.parts}

    def vision_placement(self) -> PartPlacement:
        return self.vision.placement

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "device": self.device, "context": self.context,
                "prompt_tokens": self.prompt_tokens, "image": False, "ram_budget": self.ram_budget,
                "vram_budget": self.vram_budget, "gpu_memory": self.gpu_memory, "ram_bytes": self.ram_bytes,
                "vram_bytes": self.vram_bytes, "fixed": dict(self.fixed), "parts": [d.to_json() for d in self.parts],
                "vision": self.vision.to_json(), "phases": self.phases, "predicted": self.predicted,
                "speeds": self.speeds.to_json(), "notes": list(self.notes), "overlap": self.overlap}


def placements_from_json(data: dict) -> tuple[dict, PartPlacement]:
    """(part name -> PartPlacement, the vision encoder's) from `Plan.to_json()` output."""
    parts = {p["name"]: PartPlacement(**p["placement"]) for p in data["parts"]}
    return parts, PartPlacement(**data["vision"]["placement"])


def cpu_runs_scatter() -> bool:
    """Whether this onnxruntime's CPU provider runs ONNX TensorScatter (opset 24), the in-place KV write of a
    `scatter` artifact: a one-node session, made once per process."""
    global _CPU_SCATTER
    if _CPU_SCATTER is None:
        import base64

        import onnxruntime as ort

        try:
            ort.InferenceSession(base64.b64decode(_SCATTER_PROBE), providers=["CPUExecutionProvider"])
            _CPU_SCATTER = True
        except Exception:  # NOT_IMPLEMENTED / INVALID_GRAPH: no CPU kernel for it in this onnxruntime
            _CPU_SCATTER = False
    return _CPU_SCATTER


# One TensorScatter node (past [1,1,2,1], new [1,1,1,1], write index [1] -> out; axis 2; opset 24, IR 10), serialized
# with onnx.helper: the runtime does not depend on the onnx package. tests/test_plan.py rebuilds it with onnx.
_SCATTER_PROBE = ("CAo6lwEKMAoEcGFzdAoDbmV3CgJhdBIDb3V0Ig1UZW5zb3JTY2F0dGVyKgsKBGF4aXMYAqABAhIFcHJvYmVaHgoEcGFzdBIWChQIARIQ"
                  "CgIIAQoCCAEKAggCCgIIAVodCgNuZXcSFgoUCAESEAoCCAEKAggBCgIIAQoCCAFaEAoCYXQSCgoICAcSBAoCCAFiCwoDb3V0EgQKAggBQgQKABAY")
_CPU_SCATTER: bool | None = None


def require_partition(manifest):
    if manifest.partition is None:
        art = manifest.artifact_dir or "ART"
        raise QvlError(f"{art} is not partitioned: there are no parts to place",
                       hint=f"make a partitioned copy with `qvl-compile partition {art} --out DIR --every 1`")
    return manifest.partition


def require_cuda() -> None:
    from qvl.runtime.backends.select import cuda_provider_missing

    if cuda_provider_missing():
        raise QvlError("device 'cuda' needs onnxruntime-gpu: this onnxruntime has no CUDA provider",
                       hint="pip install onnxruntime-gpu (and check the driver with nvidia-smi), or --device cpu")


def resolve_device(manifest, device: str) -> tuple[str, list[str]]:
    """("cpu" | "cuda", notes) for `--device auto|cpu|cuda` on this machine (rule 1)."""
    from qvl.runtime.backends.select import cuda_blocker, cuda_provider_missing

    if device not in ("auto", "cpu", "cuda"):
        raise QvlError(f"unknown device {device!r} for a plan", hint="use auto, cpu or cuda")
    if device == "cuda":
        require_cuda()
    if device == "auto":
        why = cuda_provider_missing() or cuda_blocker(manifest)
        return ("cpu", [f"planning for the CPU: {why}"]) if why else ("cuda", [])
    return device, []


# -- the plan ------------------------------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def choose_streamed(weights: list, room: int, extra_slot: int = 0, slots: int = 1) -> list | None:
    """Indexes into `weights` to stream so that resident bytes + the slot (the `slots` largest streamed together,
    or `extra_slot`) fit in `room` (rule 3), or None when even streaming every one does not."""
    total = sum(weights)

    def fits(streamed) -> bool:
        slot = sum(sorted(weights[i] for i in streamed)[-slots:]) if streamed else 0
        return total - sum(weights[i] for i in streamed) + max(slot, extra_slot) <= room

    streamed: list = []
    for i in sorted(range(len(weights)), key=lambda i: (weights[i], -i)):
        if fits(streamed):
            break
        streamed.append(i)
    if not fits(streamed):
        return None
    for i in sorted(streamed, key=lambda i: (-weights[i], i)):
        if fits([j for j in streamed if j != i]):
            streamed.remove(i)
    return sorted(streamed)


class _Costs:
    """The time model of rule 4 for one artifact, `HostSpeeds` and prompt length."""

    def __init__(self, manifest, sp: HostSpeeds, positions: int):
        self.parts, self.sp, self.positions, self.mi = list(manifest.partition.parts), sp, positions, manifest.model
        self.kv_pos = 2 * self.mi.num_kv_heads * self.mi.head_dim * _kv_itemsize(manifest)  # per position and layer
        # A streamed part's bytes come from the page cache (the prefetcher reads them ahead; a RAM budget bounds
        # the process, not the page cache), so a use costs the session's fixed cost + its bytes at the load rate.
        # `disk` matters for a cold start only (benchmarks/cold_start.py).
        self.read = sp.load.value
        self.params_per_byte = _params_per_byte(manifest)

    def scratch(self, i: int) -> int:
        """The fp32 copy of a quantized layer part's largest matrix that MatMulNBits dequantizes into at M > 1
        (prefill; measured on ORT 1.31 CUDA: 96 MiB for the 2B's fused gate/up), about half a Qwen3 layer's
        parameters; 0 for unquantized parts and the head."""
        p = self.parts[i]
        quantized = self.params_per_byte > 0.26  # fp32 weights: 0.25 parameters per byte
        return int(0.5 * p.weight_bytes * self.params_per_byte * 4) if quantized and p.kind == "layers" else 0

    def session_vram(self, i: int) -> int:
        """VRAM a part's own CUDA session takes beyond its weights: the stated workspace + its `scratch`."""
        return WORKSPACE_BYTES + self.scratch(i)

    def prefix_vram(self, k: int, kv: list) -> int:
        """VRAM of the first `k` parts resident on CUDA: weights + KV, and the sessions' workspace and scratch --
        once for the group when parts are joined into one session (one arena: a layer's scratch is freed before
        the next layer's), per part otherwise."""
        if k == 0:
            return 0
        held = sum(self.parts[i].weight_bytes + kv[i] for i in range(k))
        if joining_enabled():
            return held + WORKSPACE_BYTES + max(self.scratch(i) for i in range(k))
        return held + sum(self.session_vram(i) for i in range(k))

    def load_s(self, nbytes: int, dev: str) -> float:
        if dev == "cpu":
            return self.sp.cpu_session.value + nbytes / self.read
        return self.sp.gpu_session.value + nbytes / self.read + nbytes / self.sp.h2d.value

    def step_s(self, dev: str) -> float:
        """What one session's step costs beyond its parts' work, paid once per session (parts with one placement
        run joined, `part_merge.part_groups`)."""
        if dev == "cpu":
            return self.sp.cpu_step.value if self.sp.cpu_step is not None else 0.0
        return self.sp.gpu_step.value

    def session_steps(self, place: list, phase: str) -> list:
        """Per part, the session step cost it carries in `phase` ("decode" | "prefill"): the first part of each
        group of joined parts carries its group's, the rest nothing."""
        out = [0.0] * len(place)
        for g in part_groups(place):
            p = place[g[0]]
            out[g[0]] = self.step_s(p.device if phase == "decode" else (p.prefill_device or p.device))
        return out

    def decode_s(self, i: int, dev: str, stream: bool = False) -> float:
        """A part's share of a decode step (its bytes at the device's rate; streamed: + its load), without the
        session step cost (`session_steps`)."""
        p, sp = self.parts[i], self.sp
        nbytes = p.weight_bytes + p.layer_count * self.kv_pos * self.positions  # weights + the prompt's KV, once a step
        load = self.load_s(p.weight_bytes, dev) if stream else 0.0
        if dev == "cpu":
            return nbytes / (sp.cpu_head if p.kind == "head" else sp.cpu_decode).value + load
        return nbytes / sp.gpu_decode.value + load

    def prefill_s(self, i: int, dev: str, stream: bool = False, borrowed: bool = False) -> float:
        """`borrowed`: a CPU part prefilling on CUDA (its session made for the step, its KV copied back after)."""
        p, sp, n = self.parts[i], self.sp, self.positions
        if p.kind == "head":  # one position: the logit gather ran before it
            compute = self.decode_s(i, dev)
        elif dev == "cpu":
            compute = p.weight_bytes * n / sp.cpu_prefill.value
        else:
            compute = p.weight_bytes * n / sp.gpu_prefill.value
        back = p.layer_count * self.kv_pos * n / sp.h2d.value if borrowed else 0.0
        return compute + (self.load_s(p.weight_bytes, dev) if stream or borrowed else 0.0) + back

    def crossings_s(self, devices: list, positions: int) -> float:
        """A step's moves between devices: the embeddings into the first part, each boundary's tensors, the logits
        out of the head; each costs its bytes at h2d plus the stated latency."""
        seconds, prev, hidden = 0.0, "cpu", self.mi.hidden_size * 4
        for i, (p, dev) in enumerate(zip(self.parts, devices)):
            tensors = 1 if i == 0 else len([o for o in self.parts[i - 1].outputs if not o.startswith("present_")])
            nbytes = tensors * (1 if p.kind == "head" else positions) * hidden
            if dev != prev:
                seconds += nbytes / self.sp.h2d.value + self.sp.crossing.value
            prev = dev
        if prev != "cpu":
            seconds += self.mi.vocab_size * 4 / self.sp.h2d.value + self.sp.crossing.value
        return seconds


@dataclass
class _Draft:
    """The decisions while they are made: per part its placement and reason, the VRAM taken."""

    place: list
    reasons: list
    usable: int = 0  # VRAM for sessions and caches (the budget less the CUDA context)
    used: int = 0  # resident parts, their KV, the resident vision encoder
    transient: int = 0  # the largest session made for one step (a borrowed prefill, a streamed vision encoder)


def _gpu_prefix(costs: _Costs, kv: list, d: _Draft) -> None:
    """Rule 2: the GPU takes the prefix of the parts that fits VRAM and decodes a token fastest: every prefix
    length that fits is timed whole (its parts' work on each device, one session step per device, the crossings)."""
    parts, n = costs.parts, len(costs.parts)
    fit = 0
    while fit < n and d.used + costs.prefix_vram(fit + 1, kv) <= d.usable:
        fit += 1

    def per_token(k: int) -> float:
        devices = ["cuda"] * k + ["cpu"] * (n - k)
        work = sum(costs.decode_s(i, dev) for i, dev in enumerate(devices))
        return work + costs.step_s("cuda") * (k > 0) + costs.step_s("cpu") * (k < n) + costs.crossings_s(devices, 1)

    times = [per_token(k) for k in range(fit + 1)]
    best = min(range(fit + 1), key=lambda k: (times[k], k))  # a tie: the shorter prefix (less VRAM)
    joined = joining_enabled()
    for i in range(best):
        p = parts[i]
        # the session's cap: its weights, and (joined: on the group's first part, the group's) workspace + scratch
        work = costs.session_vram(i) if not joined else \
            (WORKSPACE_BYTES + max(costs.scratch(j) for j in range(best)) if i == 0 else 0)
        d.place[i] = PartPlacement("cuda", "vram", vram_limit=p.weight_bytes + work)
        d.reasons[i] = (f"fits VRAM ({_mb(p.weight_bytes)} weights + {_mb(kv[i])} KV" +
                        (f" + {_mb(work)} workspace" if work else "") + f"); the GPU prefix of {best} parts decodes "
                        f"a token in {times[best] * 1e3:.3f} ms (all on the CPU: {times[0] * 1e3:.3f} ms)")
    d.used += costs.prefix_vram(best, kv)
    for i in range(best, n):
        if i < fit:
            d.reasons[i] = (f"fits VRAM, but the GPU prefix of {best} parts is the fastest: {times[best] * 1e3:.3f} ms "
                            f"a token, {times[i + 1] * 1e3:.3f} ms with the GPU up to {parts[i].name}")
        elif i == fit:
            more = costs.prefix_vram(fit + 1, kv) - costs.prefix_vram(best, kv)
            d.reasons[i] = (f"VRAM full: the GPU prefix up to {parts[i].name} needs {_mb(more)} more (weights + KV + "
                            f"workspace), {_mb(d.usable - d.used)} left")
        else:
            d.reasons[i] = f"after {parts[fit].name}: the GPU holds a prefix of the parts (one crossing per step)"


def _borrow_prefill(costs: _Costs, kv: list, d: _Draft) -> None:
    """Rule 2: a CPU part prefills on CUDA when that is faster, its weights copied over included."""
    for i, p in enumerate(costs.parts):
        if d.place[i].device != "cpu":
            continue
        work = costs.session_vram(i)
        need = p.weight_bytes + kv[i] + work
        gpu_t = costs.prefill_s(i, "cuda", borrowed=True) + costs.step_s("cuda")  # a session of its own
        cpu_t = costs.prefill_s(i, "cpu")
        if d.used + need <= d.usable and gpu_t < cpu_t:
            d.place[i] = replace(d.place[i], prefill_device="cuda", vram_limit=p.weight_bytes + work)
            d.transient = max(d.transient, need)
            d.reasons[i] += (f"{'; ' if d.reasons[i] else ''}prefill on cuda: {gpu_t:.3f} s incl. copying "
                             f"{_mb(p.weight_bytes)} host->device < {cpu_t:.3f} s on the CPU")


def _place_vision(costs: _Costs, vw: int, d: _Draft, gpu: bool) -> tuple[PartPlacement, str, float]:
    """Rule 2 for the vision encoder: (placement, reason, seconds per REFERENCE_PATCHES image)."""
    sp = costs.sp
    cpu_t = vw * REFERENCE_PATCHES / sp.cpu_prefill.value
    if not gpu:
        return PartPlacement("cpu", "ram"), "on the CPU", cpu_t
    gpu_t = vw * REFERENCE_PATCHES / sp.gpu_prefill.value + sp.gpu_step.value
    need = vw + VISION_WORKSPACE_BYTES
    if d.used + need + d.transient <= d.usable and gpu_t < cpu_t:
        d.used += need
        return (PartPlacement("cuda", "vram", vram_limit=need), f"fits VRAM beside the parts; {gpu_t:.3f} s < "
                f"{cpu_t:.3f} s on the CPU per image", gpu_t)
    streamed_t = gpu_t + costs.load_s(vw, "cuda")
    if d.used + need <= d.usable and streamed_t < cpu_t:
        d.transient = max(d.transient, need)
        return (PartPlacement("cuda", "stream", vram_limit=need), f"streamed to the GPU per image batch: "
                f"{streamed_t:.3f} s < {cpu_t:.3f} s on the CPU", streamed_t)
    return PartPlacement("cpu", "ram"), f"on the CPU ({cpu_t:.3f} s an image): no room on the GPU or not faster", cpu_t


def make_plan(manifest, *, ram_budget: int | None, vram_budget: int | None, device: str = "auto",
              context: int | None = None, prompt_tokens: int = 256, speeds: HostSpeeds | None = None,
              gpu_memory: int | None = None, ram_flag: str = "--ram", vram_flag: str = "--vram",
              vision: bool = True) -> Plan:
    """The placement of every part and the vision encoder, and its predictions (module docstring: the rules).
    `speeds` None: `stated_speeds`. `ram_flag` / `vram_flag`: how errors name the budgets. `vision` False: the
    requests have no image or video (`run` with a text prompt), so the encoder is planned as never loaded."""
    from qvl.runtime.backends.partitioned import PartitionedEngine
    from qvl.runtime.backends.select import cuda_blocker

    partition = require_partition(manifest)
    mi = manifest.model
    context = min(mi.context_length, DEFAULT_CONTEXT) if context is None else int(context)
    if not 1 <= context <= mi.context_length:
        raise QvlError(f"--context must be in [1, {mi.context_length}] (the model's context), got {context}")
    if not 1 <= prompt_tokens <= context:
        raise QvlError(f"--prompt-tokens must be in [1, {context}] (the context), got {prompt_tokens}")
    sp = speeds or stated_speeds(manifest)
    notes: list[str] = []
    if device == "auto":
        device, notes = resolve_device(manifest, "auto")
    elif device not in ("cpu", "cuda"):
        raise QvlError(f"unknown device {device!r} for a plan", hint="use auto, cpu or cuda")
    blocker = cuda_blocker(manifest) if device == "cuda" else None
    if blocker:
        notes.append(f"every part stays on the CPU: {blocker}")
        device = "cpu"
    cuda_only = manifest.kv_mode == "scatter" and not cpu_runs_scatter()
    if device == "cpu" and cuda_only:
        raise QvlError(f"this artifact's KV layout (TensorScatter, target {manifest.target}) does not run its parts on "
                       "the CPU", hint="plan it with --device cuda on a GPU, or partition a CPU-target artifact")
    costs = _Costs(manifest, sp, prompt_tokens)
    parts, n = costs.parts, len(costs.parts)
    w = [p.weight_bytes for p in parts]
    kv = [p.layer_count * costs.kv_pos * context for p in parts]
    d = _Draft([PartPlacement("cpu", "ram") for _ in parts], ["" for _ in parts])
    gpu_mem = None
    if device == "cuda":
        gpu_mem = gpu_memory or gpu_total_memory() or vram_budget
        if gpu_mem is None:
            raise QvlError(f"cannot read the GPU's memory (NVML is not available): give {vram_flag} SIZE",
                           hint=f"e.g. {vram_flag} 2GiB, or pip install nvidia-ml-py to read it")
        if vram_budget and vram_budget > gpu_mem:
            notes.append(f"{vram_flag} {_mb(vram_budget)} is more than the GPU's {_mb(gpu_mem)}: planned with that")
        vram = min(vram_budget or gpu_mem, gpu_mem)
        d.usable = max(0, vram - CUDA_CONTEXT_BYTES)
        if cuda_only:
            d.used = _scatter_on_gpu(w, kv, d, vram_flag, vram, costs)
        else:
            _gpu_prefix(costs, kv, d)
        if prompt_tokens >= getattr(PartitionedEngine, "prefill_min_tokens", 32):
            _borrow_prefill(costs, kv, d)
    if vision:
        v_place, v_reason, v_time = _place_vision(costs, partition.vision_weight_bytes, d, device == "cuda")
    else:  # streamed = made on first use, which never comes: no RAM or VRAM is planned for it
        v_place, v_reason, v_time = PartPlacement("cpu", "stream"), "not loaded: the request has no image or video", 0.0

    # RAM (rule 3): the CPU parts' residency
    cpu_idx = [i for i in range(n) if d.place[i].device == "cpu"]
    row = partition.embedding_bytes / max(1, mi.vocab_size)
    pages = math.ceil(row / PAGE) + (1 if manifest.embedding.quantized else 0)  # packed codes and scales: two runs
    uses_cuda = any(p.device == "cuda" or p.prefill_device == "cuda" for p in d.place) or v_place.device == "cuda"
    fixed = {"process": int(sp.process.value), "tokenizer": int(sp.tokenizer.value),
             "embedding_rows": int(min(partition.embedding_bytes, min(context, mi.vocab_size) * pages * PAGE)),
             "kv": sum(kv[i] for i in cpu_idx), "vision": 0, "stream_slot": 0,
             "cuda_runtime": CUDA_HOST_BYTES if uses_cuda else 0}
    base = sum(fixed.values())
    vision_ram = int(partition.vision_weight_bytes * (sp.heap.value if sp.heap is not None else 1.0)) \
        if v_place.device == "cpu" and vision else 0
    heap = sp.heap.value if sp.heap is not None else 1.0
    cpu_w = [int(w[i] * heap) for i in cpu_idx]  # what a kept (or the streamed) session holds in RAM
    streamed, vision_streams, exclusive, overlap = [], False, False, False
    if ram_budget is not None:
        # The vision encoder streams first: it runs once per image, a decoder part once per token. When it does not
        # fit beside the resident parts either, it runs exclusive: they are released while it encodes and load
        # again at the next decoder step (once per image request, not per token).
        vision_streams = bool(vision_ram) and base + vision_ram + sum(cpu_w) > ram_budget
        room = ram_budget - base - (0 if vision_streams else vision_ram)
        streamed = choose_streamed(cpu_w, room)
        if streamed is None or base + vision_ram > ram_budget:
            minimum = base + max(cpu_w + [vision_ram])
            raise QvlError(f"{ram_flag} {_mb(ram_budget)} is below the {_mb(minimum)} this artifact needs with every "
                           f"part streamed ({_mb(fixed['kv'])} of it the KV cache at {context} positions)",
                           hint=f"give {ram_flag} at least {math.ceil(minimum / MIB)}MiB" +
                           (", or a smaller --context" if fixed["kv"] * 10 > minimum else ""))
        # Overlap: with two slots the next streamed part's session is made while the current part computes. That
        # may mean streaming more parts to make room: taken when its predicted decode step is shorter.
        paired = choose_streamed(cpu_w, room, slots=2) if streamed and not uses_cuda else None
        if paired is not None and len(paired) >= 2:
            base_place = list(d.place)
            one = _decode_step(costs, base_place, cpu_idx, streamed, False)
            two = _decode_step(costs, base_place, cpu_idx, paired, True)
            if two < one:
                streamed, overlap = paired, True
                notes.append(f"streamed parts overlap: the next one's session is made while the current one computes "
                             f"(two slots; predicted {two * 1e3:.1f} ms a token against {one * 1e3:.1f} ms with one)")
        resident = sum(cpu_w[k] for k in range(len(cpu_w)) if k not in streamed)
        exclusive = vision_streams and base + resident + vision_ram > ram_budget
    slot = sum(sorted(cpu_w[k] for k in streamed)[-(2 if overlap else 1):]) if streamed else 0
    for k, i in enumerate(cpu_idx):
        if k in streamed:
            d.place[i] = replace(d.place[i], residency="stream")
            why = f"streamed: resident parts + the {_mb(slot)} slot must fit {ram_flag} (smallest parts stream first)"
        else:
            why = "resident in RAM (" + ("no RAM budget" if ram_budget is None else f"fits {ram_flag}") + ")"
        d.reasons[i] = why + (f"; {d.reasons[i]}" if d.reasons[i] else "")
    if vision_streams:
        v_place = replace(v_place, residency="stream", exclusive=exclusive)
        v_time += costs.load_s(partition.vision_weight_bytes, "cpu")
        v_reason = (f"streamed per image: the model does not fit {ram_flag} resident" +
                    ("; exclusive (resident parts released while it encodes)" if exclusive else ""))
        slot = max(slot, 0 if exclusive else vision_ram)
    fixed["vision"] = 0 if vision_streams else vision_ram
    fixed["stream_slot"] = slot
    ram_bytes = sum(fixed.values()) + sum(cpu_w[k] for k in range(len(cpu_idx)) if k not in streamed)
    if exclusive:  # the other phase: the vision encoder alone beside the fixed costs
        ram_bytes = max(ram_bytes, base + vision_ram)
    vram_bytes = CUDA_CONTEXT_BYTES + d.used + d.transient if uses_cuda else 0
    _give_slack(d, notes)
    if streamed:
        notes.append(f"{len(streamed)} of {len(cpu_idx)} CPU parts stream: each costs its session creation every token")

    # predictions (rule 4)
    place = d.place
    steps_decode, steps_prefill = costs.session_steps(place, "decode"), costs.session_steps(place, "prefill")
    decode = [costs.decode_s(i, place[i].device, place[i].residency == "stream") + steps_decode[i] for i in range(n)]
    if overlap:
        for b, hidden in _overlap_hidden(costs, place, steps_decode).items():
            decode[b] -= hidden
    prefill = [costs.prefill_s(i, p.prefill_device or p.device, p.residency == "stream",
                               borrowed=p.prefill_device == "cuda" and p.device == "cpu") + steps_prefill[i]
               for i, p in enumerate(place)]
    hops_decode = costs.crossings_s([p.device for p in place], 1)
    hops_prefill = costs.crossings_s([p.prefill_device or p.device for p in place], prompt_tokens)
    ttft, per_token = sum(prefill) + hops_prefill, sum(decode) + hops_decode
    decisions = tuple(PartDecision(p.name, p.kind, tuple(p.layers), w[i], kv[i], place[i], d.reasons[i], decode[i],
                                   prefill[i]) for i, p in enumerate(parts))
    vision = PartDecision("vision", "vision", (0, 0), partition.vision_weight_bytes, 0, v_place, v_reason, 0.0, v_time)
    phases = {"vision": {"device": v_place.device, "residency": v_place.residency, "seconds": v_time,
                         "patches": REFERENCE_PATCHES, "in_ttft": False},
              "prefill": {"positions": prompt_tokens, "seconds": ttft, "crossing_s": hops_prefill,
                          "devices": {p.name: place[i].prefill_device or place[i].device for i, p in enumerate(parts)}},
              "decode": {"seconds_per_token": per_token, "crossing_s": hops_decode, "kv_positions": prompt_tokens,
                         "devices": {p.name: f"{place[i].device}/{place[i].residency}" for i, p in enumerate(parts)}}}
    predicted = {"ttft_s": ttft, "decode_tok_s": 1.0 / per_token, "prompt_tokens": prompt_tokens, "image": False,
                 "vision_s": v_time}
    return Plan(str(manifest.artifact_dir or ""), "cuda" if uses_cuda else "cpu", decisions, vision, phases, ram_budget,
                vram_budget, gpu_mem, context, prompt_tokens, ram_bytes, vram_bytes, fixed, predicted, sp, tuple(notes),
                overlap)


def _give_slack(d: _Draft, notes: list) -> None:
    """The VRAM the plan leaves over goes to the one session of the resident CUDA prefix, as the cap of its arena:
    the plan's workspace is an estimate, and one arena running many layers also holds what its allocator could
    not reuse between them (on the lent H200 a joined 2B int4 prefix needed ~85 MB beyond weights + workspace +
    one layer's scratch). The caps of all sessions together still stay within the budget."""
    slack = d.usable - d.used - d.transient
    resident = [i for i, p in enumerate(d.place) if p.device == "cuda" and p.residency == "vram"]
    if not joining_enabled() or slack <= 0 or not resident or resident != list(range(resident[0], resident[-1] + 1)):
        return
    first = d.place[resident[0]]
    if first.vram_limit is None:
        return
    d.place[resident[0]] = replace(first, vram_limit=first.vram_limit + slack)
    notes.append(f"the CUDA parts' session may take the budget's remaining {_mb(slack)} beyond its estimate "
                 "(its arena cap)")


def _overlap_hidden(costs: _Costs, place: list, steps: list) -> dict:
    """Per streamed part made ahead: the load seconds hidden. The runner makes streamed parts in pairs (the second
    on a background thread while the first is made and runs), so the second's load runs beside the first's load
    and the parts computed from the first up to it."""
    per_use = [i for i, p in enumerate(place) if p.residency == "stream"]
    hidden = {}
    for a, b in zip(per_use[0::2], per_use[1::2]):
        beside = costs.load_s(costs.parts[a].weight_bytes, place[a].device) + \
            sum(costs.decode_s(k, place[k].device) + steps[k] for k in range(a, b))
        pair = costs.sp.load_pair.value if costs.sp.load_pair is not None else 0.0  # the share two builds at once hide
        hidden[b] = min(costs.load_s(costs.parts[b].weight_bytes, place[b].device) * pair, beside)
    return hidden


def _decode_step(costs: _Costs, base: list, cpu_idx: list, streamed: list, overlap: bool) -> float:
    """Predicted decode seconds a token of the parts with the CPU parts `streamed` (indexes into `cpu_idx`)
    streamed, with or without overlap (the crossings are the same either way and left out)."""
    place = list(base)
    for k in streamed:
        place[cpu_idx[k]] = replace(place[cpu_idx[k]], residency="stream")
    steps = costs.session_steps(place, "decode")
    total = sum(costs.decode_s(i, p.device, p.residency == "stream") + steps[i] for i, p in enumerate(place))
    return total - (sum(_overlap_hidden(costs, place, steps).values()) if overlap else 0.0)


def _scatter_on_gpu(w: list, kv: list, d: _Draft, vram_flag: str, vram: int, costs: "_Costs") -> int:
    """Every part of a `scatter` artifact on CUDA (rule 1): every KV cache in VRAM, and rule 3's streaming choice
    applied to VRAM (a part costs its weights + a workspace); returns the VRAM they hold."""
    cost = [b + costs.session_vram(i) for i, b in enumerate(w)]
    streamed = choose_streamed(cost, d.usable - sum(kv))
    if streamed is None:
        minimum = CUDA_CONTEXT_BYTES + sum(kv) + max(cost)
        raise QvlError(f"{vram_flag} {_mb(vram)} is below the {_mb(minimum)} this CUDA-only artifact needs with every "
                       "part streamed", hint="give more VRAM, a smaller --context, or use a CPU-target artifact")
    for i in range(len(w)):
        d.place[i] = PartPlacement("cuda", "stream" if i in streamed else "vram", vram_limit=cost[i])
        d.reasons[i] = ("streamed to the GPU each use: VRAM is full" if i in streamed else "fits VRAM") + \
            " (the TensorScatter KV layout runs on CUDA only)"
    return sum(kv) + sum(c for i, c in enumerate(cost) if i not in streamed) + max([cost[i] for i in streamed] + [0])


def _rates(plan: Plan, phase: str) -> str:
    """The `HostSpeeds` a phase's time comes from, each with its source: "cpu_decode measured, ..."."""
    names: list[str] = []
    for d in plan.parts:
        p = d.placement
        dev = p.device if phase == "decode" else (p.prefill_device or p.device)
        if dev == "cpu":
            names.append("cpu_head" if d.kind == "head" else "cpu_decode" if phase == "decode" else "cpu_prefill")
            names += ["cpu_step"] if plan.speeds.cpu_step is not None else []
        else:
            names += ["gpu_decode" if phase == "decode" or d.kind == "head" else "gpu_prefill", "gpu_step"]
        if p.residency == "stream" or dev != p.device:
            names += [f"{'cpu' if dev == 'cpu' else 'gpu'}_session", "load", "disk"] + (["h2d"] if dev != "cpu" else [])
    if plan.phases[phase]["crossing_s"]:
        names += ["h2d", "crossing"]
    return ", ".join(f"{n} {getattr(plan.speeds, n).source}" for n in dict.fromkeys(names))


def describe(plan: Plan) -> list[str]:
    """The human report: a table of the parts, the phases, the memory and the prediction, with sources."""
    sp, ph, pr, f = plan.speeds, plan.phases, plan.predicted, plan.fixed
    rows = [("part", "layers", "weight MB", "KV MB", "decode", "prefill", "reason")]
    for d in (*plan.parts, plan.vision):
        a, b = d.layers
        layers = "-" if d.kind == "vision" else (f"{a}..{b - 1}" if b > a else "head")
        p = d.placement
        rows.append((d.name, layers, f"{d.weight_bytes / MB:.2f}", f"{d.kv_bytes / MB:.2f}",
                     f"{p.device}/{p.residency}", p.prefill_device or p.device, d.reason))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(6)) + "  " + r[6] for r in rows]
    v = ph["vision"]
    vision_rate = sp.cpu_prefill if v["device"] == "cpu" else sp.gpu_prefill
    rate = f"{'cpu' if v['device'] == 'cpu' else 'gpu'}_prefill {vision_rate.source}"
    lines.append(f"vision:  {v['device']}/{v['residency']}, {v['seconds']:.3f} s per {REFERENCE_PATCHES}-patch image "
                 f"(from {rate}, scaled by weight bytes)")
    lines.append(f"prefill: {ph['prefill']['positions']} positions in {ph['prefill']['seconds']:.3f} s, crossings "
                 f"{ph['prefill']['crossing_s'] * 1e3:.2f} ms (from {_rates(plan, 'prefill')})")
    dec = ph["decode"]
    lines.append(f"decode:  {dec['seconds_per_token'] * 1e3:.3f} ms per token with {dec['kv_positions']} positions "
                 f"of KV, crossings {dec['crossing_s'] * 1e3:.2f} ms (from {_rates(plan, 'decode')})")
    budget = "no budget" if plan.ram_budget is None else f"budget {_mb(plan.ram_budget)}"
    cuda = f", CUDA runtime {_mb(f['cuda_runtime'])} (stated)" if f["cuda_runtime"] else ""
    lines.append(f"RAM:     {_mb(plan.ram_bytes)} ({budget}; KV for {plan.context} positions): process "
                 f"{_mb(f['process'])} ({sp.process.source}), tokenizer {_mb(f['tokenizer'])} ({sp.tokenizer.source}), "
                 f"embedding rows {_mb(f['embedding_rows'])}, KV {_mb(f['kv'])}, vision {_mb(f['vision'])}, "
                 f"stream slot {_mb(f['stream_slot'])}{cuda}")
    if plan.device == "cuda":
        vram = min(plan.vram_budget or plan.gpu_memory, plan.gpu_memory)
        lines.append(f"VRAM:    {_mb(plan.vram_bytes)} of {_mb(vram)} (CUDA context {_mb(CUDA_CONTEXT_BYTES)} and "
                     f"{_mb(WORKSPACE_BYTES)} per session: stated)")
    lines.append(f"predicted: time to first token {pr['ttft_s']:.3f} s for a {pr['prompt_tokens']}-token text prompt "
                 f"(no image; an image adds {pr['vision_s']:.3f} s), decode {pr['decode_tok_s']:.1f} tok/s")
    lines.append("speeds:")
    for name, speed in ((fl.name, getattr(sp, fl.name)) for fl in fields(sp)):
        lines.append(f"  {name}: {speed.value:.4g} {speed.unit} ({speed.source}: {speed.how})")
    lines += [f"note: {n}" for n in plan.notes]
    return lines
