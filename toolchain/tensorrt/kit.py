"""TensorRT engine kit: TensorRT-flavoured ONNX graphs + optimization profiles + build settings.

`make_engine_kit(source, target, out)` writes a directory that is at once

* a valid runtime artifact (manifest graphs / weights / embedding exactly as `compile_artifact` writes
  them), so ONNX Runtime on the CPU runs the very graphs TensorRT will parse, and the parity suite
  checks them against eager PyTorch; and
* an engine kit: the manifest's `kit` section records, per graph, the optimization profiles (min / opt /
  max shape of every input, one profile for prefill and one for decode), the build settings (precision
  flags, workspace, refit), the KV-cache I/O contract and a memory-fit report. `toolchain/tensorrt/build.py`
  builds engines from it on the machine with the GPU.

Pipeline: `compile_artifact(source, target)` (standard ONNX only: the fusion passes skip TensorRT
targets, which have no ORT contrib ops) -> `OpsetLoweringPass` (sm61: Gelu-20 expanded, graph converted
to opset 17, the ceiling of TensorRT 8.6's parser, the last TensorRT for SM 6.1) -> checks (opset,
domains) -> memory fit -> profiles -> manifest.

INT8 kits (`make_int8_engine_kit`, `compile --target sm61 --weights int8`): the fp32 kit above, then
activation calibration on it (`toolchain/quant/calibration.py`, ONNX Runtime CPU, per-input-channel max|x| of
every linear site), then `QdqInt8Pass` (`passes/qdq_int8.py`: SmoothQuant smoothing, per-tensor int8
activations, per-channel int8 weights, explicit QuantizeLinear/DequantizeLinear at opset 17, FP32
compute elsewhere, never FP16), with the per-layer accuracy-budget search of `toolchain/quant/accuracy_budget.py`
against the fp32 kit: layers over budget stay fp32. The manifest's `precision` section records the pass
report, the calibration summary, the budget, every measurement and the decisions; the build settings turn
INT8 on because the graphs contain Q/DQ, and the memory fit counts quantized weights as int8
(`deployed_bytes`). The tied lm_head is quantized too (per vocabulary row, never smoothed): its Q/DQ reads
the fp32 table itself, which stays the runtime's host-side embedding table.

Memory fit (`memory_fit_report`): for each SM 6.1 card (MX250 2 GB, GTX 1050 2 GB, GTX 1050 Ti 4 GB,
GTX 1060 3 GB / 6 GB) and each placement, from most to least on the GPU, whether it fits and the longest
context that does. All sizes come from the checkpoint config (`footprint_from_config`) or, for a kit,
from the kit graphs' own initializer bytes (`footprint_from_graphs`, dtype-aware). The model is an
estimate with stated assumptions (`ASSUMPTIONS`): weights are resident, the KV cache is the concat form
(past and present are separate engine tensors, so two capacity-sized buffers per layer and K/V,
ping-ponged), one decoder layer's activations are live at a time (TensorRT reuses activation memory
across layers), attention scores are materialised (Pascal has no fused attention kernels), plus a fixed
CUDA-context/runtime reserve and the builder workspace.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qvl.artifacts import manifest as mf
from qvl.errors import QvlError
from qvl.toolchain.fsutil import atomic_output_dir, check_output_target, output_lock
from qvl.toolchain.staging import scratch_dir
from qvl.toolchain.compile.targets import GiB, get_target

MiB = 1 << 20
KIT_FORMAT = "qvl-trt-kit"
KIT_VERSION = 1
TRT_TARGETS = ("sm61", "sm75+")
STANDARD_DOMAINS = ("", "ai.onnx")
OPSET17_IR_VERSION = 8  # ONNX 1.12: IR version 8 / opset 17

# SM 6.1 (Pascal GP10x) cards of 2019-class laptops / desktops: key -> (name, memory bytes).
SM61_CARDS: dict[str, tuple[str, int]] = {
    "mx250-2gb": ("GeForce MX250 2 GB", 2 * GiB),
    "gtx1050-2gb": ("GeForce GTX 1050 2 GB", 2 * GiB),
    "gtx1050ti-4gb": ("GeForce GTX 1050 Ti 4 GB", 4 * GiB),
    "gtx1060-3gb": ("GeForce GTX 1060 3 GB", 3 * GiB),
    "gtx1060-6gb": ("GeForce GTX 1060 6 GB", 6 * GiB),
}

RUNTIME_RESERVE_BYTES = 320 * MiB  # CUDA context + cuBLAS/cuDNN handles + TensorRT runtime, per process
MAX_WORKSPACE_BYTES = 256 * MiB  # builder tactic workspace; at most 1/16 of the card
PREFILL_CHUNK = 512  # the runtime's default prefill chunk (runtime/model.py)
MIN_CONTEXT = 2048  # a placement "fits" only if at least this many positions fit (image + prompt + answer)
CONTEXT_ROUNDING = 256
MAX_IMAGES_PER_PROMPT = 2  # vision profile max = this many max-size images (the parity suite has two)
VISION_OPT_PATCHES = 784  # a 448x448 image
VISION_BUDGET_FRACTION = 0.25  # vision activations may use at most this share of the card

ASSUMPTIONS = {
    "weights": "resident on the GPU at their stored dtype (fp32 unless the kit has explicit Q/DQ)",
    "kv_cache": "concat form: past and present are separate engine tensors -> 2 capacity-sized buffers per layer and K/V (ping-pong)",
    "activations": "one decoder layer live at a time; attention scores and probabilities materialised (no fused attention on Pascal); repeat_kv-expanded K/V; last-position logits only",
    "runtime_reserve_bytes": RUNTIME_RESERVE_BYTES,
    "workspace_bytes": f"min({MAX_WORKSPACE_BYTES}, memory / 16)",
    "prefill_chunk": PREFILL_CHUNK,
    "min_context": MIN_CONTEXT,
    "embedding_lookup": "always on the host (memory-mapped tied embedding); the same matrix is the lm_head",
}


# -- model dimensions and footprint -------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context_length: int
    attention_bias: bool
    num_deepstack: int
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    v_patch_dim: int  # in_channels * temporal_patch * patch^2
    v_merge: int  # spatial merge size
    v_positions: int
    v_out: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelDims":
        tc, vc = config["text_config"], config["vision_config"]
        return cls(
            num_layers=tc["num_hidden_layers"],
            hidden=tc["hidden_size"],
            intermediate=tc["intermediate_size"],
            heads=tc["num_attention_heads"],
            kv_heads=tc["num_key_value_heads"],
            head_dim=tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"],
            vocab=tc["vocab_size"],
            context_length=tc["max_position_embeddings"],
            attention_bias=bool(tc.get("attention_bias", False)),
            num_deepstack=len(vc["deepstack_visual_indexes"]),
            v_depth=vc["depth"],
            v_hidden=vc["hidden_size"],
            v_intermediate=vc["intermediate_size"],
            v_heads=vc["num_heads"],
            v_patch_dim=vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2,
            v_merge=vc["spatial_merge_size"],
            v_positions=vc["num_position_embeddings"],
            v_out=vc["out_hidden_size"],
        )


def parameter_counts(d: ModelDims) -> dict[str, int]:
    """Parameters per component of a Qwen3-VL checkpoint, from its config alone."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    attn = d.hidden * q + 2 * d.hidden * kv + q * d.hidden + 2 * d.head_dim  # q/k/v/o + q_norm/k_norm
    if d.attention_bias:
        attn += q + 2 * kv + d.hidden
    layer = attn + 3 * d.hidden * d.intermediate + 2 * d.hidden  # SwiGLU MLP + 2 RMSNorms
    h, i, m2 = d.v_hidden, d.v_intermediate, d.v_hidden * d.v_merge**2
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    merger = lambda norm: 2 * norm + (m2 * m2 + m2) + (m2 * d.v_out + d.v_out)  # noqa: E731
    vision = (d.v_patch_dim * h + h) + d.v_positions * h + d.v_depth * block + merger(h) + d.num_deepstack * merger(m2)
    return {
        "vision": vision,
        "decoder_layers": d.num_layers * layer + d.hidden,  # + final norm
        "embedding": d.vocab * d.hidden,  # tied: input embedding = lm_head
    }


@dataclass(frozen=True)
class Footprint:
    dims: ModelDims
    vision_weight_bytes: int
    decoder_layer_weight_bytes: int  # all transformer layers + final norm
    lm_head_bytes: int  # the tied embedding matrix as the lm_head
    weight_dtype: str  # what the byte counts assume ("float32", "int8", "graph" = the graphs' own)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one position, fp32, one buffer."""
        d = self.dims
        return d.num_layers * 2 * d.kv_heads * d.head_dim * 4

    def decoder_activation_bytes(self, chunk: int, total: int) -> int:
        d = self.dims
        per_row = 6 * d.hidden + (d.heads + 2 * d.kv_heads) * d.head_dim + 3 * d.intermediate + (1 + d.num_deepstack) * d.hidden
        return 4 * (chunk * per_row + 2 * d.heads * chunk * total + 2 * d.heads * total * d.head_dim + d.vocab)

    def vision_activation_bytes(self, patches: int) -> int:
        d = self.dims
        per_row = 9 * d.v_hidden + 2 * d.v_intermediate + d.v_patch_dim
        outputs = (1 + d.num_deepstack) * (patches // d.v_merge**2) * d.v_out
        return 4 * (patches * per_row + 2 * d.v_heads * patches * patches + outputs) + 5 * patches * patches  # + bool/fp32 mask

    def to_dict(self) -> dict:
        return {
            "weight_dtype": self.weight_dtype,
            "vision_weight_bytes": self.vision_weight_bytes,
            "decoder_layer_weight_bytes": self.decoder_layer_weight_bytes,
            "lm_head_bytes": self.lm_head_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "layers": self.dims.num_layers,
        }


def footprint_from_config(config: dict, weight_bytes: float = 4.0, weight_dtype: str = "float32") -> Footprint:
    d = ModelDims.from_config(config)
    n = parameter_counts(d)
    return Footprint(
        d,
        vision_weight_bytes=int(n["vision"] * weight_bytes),
        decoder_layer_weight_bytes=int(n["decoder_layers"] * weight_bytes),
        lm_head_bytes=int(n["embedding"] * weight_bytes),
        weight_dtype=weight_dtype,
    )


def deployed_bytes(value) -> int:
    """Bytes an initializer occupies in the engine: int8 weights (a DequantizeLinear's int8 input, or fp32
    weights read only by QuantizeLinear, which TensorRT quantizes at build time with that layer's scale)
    count one byte per element, everything else its stored size."""
    t = value.const_value
    uses = value.uses()
    if uses and all(node.op_type == "QuantizeLinear" and idx == 0 for node, idx in uses):
        return int(t.size)
    return int(t.nbytes)


def footprint_from_graphs(graphs: dict, config: dict, embedding_name: str = "embed_tokens.weight") -> Footprint:
    """Weight bytes as deployed from the kit's graphs (so Q/DQ int8 weights count as int8: `deployed_bytes`)."""

    def nbytes(model, skip=()):
        return sum(deployed_bytes(v) for k, v in model.graph.initializers.items() if v.const_value is not None and k not in skip)

    dec = graphs["decoder"]
    emb = dec.graph.initializers.get(embedding_name)
    lm_head = deployed_bytes(emb) if emb is not None and emb.const_value is not None else 0  # int8 when Q/DQ'd
    return Footprint(
        ModelDims.from_config(config),
        vision_weight_bytes=nbytes(graphs["vision"]),
        decoder_layer_weight_bytes=nbytes(dec, skip=(embedding_name,)),
        lm_head_bytes=lm_head,
        weight_dtype="graph",
    )


# -- memory fit ---------------------------------------------------------------------------------


def workspace_bytes(memory_bytes: int) -> int:
    return min(MAX_WORKSPACE_BYTES, memory_bytes // 16)


def vision_max_patches(fp: Footprint, memory_bytes: int, preprocessor_max_patches: int | None) -> int:
    """Largest patch count (multiple of merge^2) whose vision activations fit the vision budget."""
    unit = fp.dims.v_merge**2
    budget = int(memory_bytes * VISION_BUDGET_FRACTION)
    hi = (preprocessor_max_patches or 16384) * MAX_IMAGES_PER_PROMPT
    lo, best = unit, unit
    while lo <= hi:  # vision_activation_bytes is increasing in patches
        mid = (lo + hi) // 2
        if fp.vision_activation_bytes(mid) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return max(unit, best - best % unit)


PLACEMENTS = (
    # name, what is on the GPU, what stays on the CPU, note
    ("all_gpu", ("vision", "decoder_layers", "lm_head"), ("embedding lookup (host mmap)",), "the kit as built"),
    ("vision_on_cpu", ("decoder_layers", "lm_head"), ("vision (ONNX Runtime CPU, the kit's vision.onnx)", "embedding lookup (host mmap)"),
     "build only the decoder engine"),
    ("vision_and_lm_head_on_cpu", ("decoder_layers",), ("vision (ONNX Runtime CPU)", "lm_head + embedding (host, tied matrix)"),
     "needs the decoder split before the lm_head (not produced by this kit)"),
)


def _max_context(fixed: int, fp: Footprint, memory_bytes: int, chunk: int, layers_fraction: float = 1.0) -> int:
    """Largest total context T with fixed + KV(T) + activations(chunk, T) <= memory (0 if none)."""
    d = fp.dims
    chunk = min(chunk, d.context_length)
    kv = 2 * fp.kv_bytes_per_token * layers_fraction  # ping-pong buffers
    slope = kv + fp.decoder_activation_bytes(chunk, 1) - fp.decoder_activation_bytes(chunk, 0)
    const = fp.decoder_activation_bytes(chunk, 0)
    room = memory_bytes - fixed - const
    if room <= 0:
        return 0
    t = int(room // slope)
    t = min(t, d.context_length)
    if t < d.context_length:
        t -= t % CONTEXT_ROUNDING
    return max(t, 0)


def fit_card(fp: Footprint, memory_bytes: int, *, chunk: int = PREFILL_CHUNK, image_patches: int | None = None,
             min_context: int = MIN_CONTEXT) -> dict:
    """Every placement on one card: fits?, max context, bytes at the minimum context."""
    d = fp.dims
    min_ctx = min(min_context, d.context_length)
    ws = workspace_bytes(memory_bytes)
    patches = image_patches or vision_max_patches(fp, memory_bytes, None)
    sizes = {"vision": fp.vision_weight_bytes, "decoder_layers": fp.decoder_layer_weight_bytes, "lm_head": fp.lm_head_bytes}
    rows = []
    for name, gpu, cpu, note in PLACEMENTS:
        fixed = RUNTIME_RESERVE_BYTES + ws + sum(sizes[k] for k in gpu)
        if "vision" in gpu:
            fixed += fp.vision_activation_bytes(patches)
        ctx = _max_context(fixed, fp, memory_bytes, chunk)
        need = fixed + 2 * fp.kv_bytes_per_token * min_ctx + fp.decoder_activation_bytes(min(chunk, min_ctx), min_ctx)
        rows.append({"placement": name, "gpu": list(gpu), "cpu": list(cpu), "note": note,
                     "bytes_at_min_context": int(need), "fits": ctx >= min_ctx, "max_context": ctx})
    # Last resort: only some decoder layers on the GPU, the rest (and lm_head, vision) on the CPU.
    per_layer = (fp.decoder_layer_weight_bytes + 2 * fp.kv_bytes_per_token * min_ctx) / d.num_layers
    room = memory_bytes - RUNTIME_RESERVE_BYTES - ws - fp.decoder_activation_bytes(min(chunk, min_ctx), min_ctx)
    gpu_layers = max(0, min(d.num_layers, int(room // per_layer))) if room > 0 else 0
    rows.append({"placement": "partial_layers", "gpu": [f"{gpu_layers} of {d.num_layers} decoder layers"],
                 "cpu": [f"{d.num_layers - gpu_layers} decoder layers", "lm_head", "vision"],
                 "note": "layer split across GPU/CPU (not produced by this kit)",
                 "bytes_at_min_context": None, "fits": gpu_layers > 0, "max_context": min_ctx if gpu_layers else 0,
                 "gpu_layers": gpu_layers})
    best = next((r for r in rows if r["fits"]), None)
    return {
        "memory_bytes": memory_bytes,
        "workspace_bytes": ws,
        "image_patches": patches,
        "placements": rows,
        "recommended": best["placement"] if best else None,
        "max_context": best["max_context"] if best else 0,
        "on_cpu": best["cpu"] if best else ["everything"],
        "fits_as_built": rows[0]["fits"],
    }


def memory_fit_report(source: dict | Footprint, cards: dict[str, tuple[str, int]] = SM61_CARDS, *,
                      chunk: int = PREFILL_CHUNK, preprocessor_max_patches: int | None = None,
                      min_context: int = MIN_CONTEXT) -> dict:
    """Memory fit per card. `source`: a checkpoint config dict (fp32 weights) or a Footprint."""
    fp = source if isinstance(source, Footprint) else footprint_from_config(source)
    out = {"assumptions": ASSUMPTIONS, "footprint": fp.to_dict(), "cards": {}}
    for key, (label, mem) in cards.items():
        patches = vision_max_patches(fp, mem, preprocessor_max_patches)
        out["cards"][key] = {"name": label, **fit_card(fp, mem, chunk=chunk, image_patches=patches, min_context=min_context)}
    return out


def format_memory_fit(report: dict) -> str:
    """Plain-text table of a memory-fit report (one row per card)."""
    fp = report["footprint"]
    gb = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [
        f"weights ({fp['weight_dtype']}): vision {gb(fp['vision_weight_bytes'])} GiB, decoder layers "
        f"{gb(fp['decoder_layer_weight_bytes'])} GiB, lm_head (tied embedding) {gb(fp['lm_head_bytes'])} GiB; "
        f"KV {fp['kv_bytes_per_token'] / 1024:.0f} KiB/token (x2 ping-pong buffers)",
        f"{'card':<26}{'mem':>6}  {'all on GPU':>14}  {'vision on CPU':>14}  {'+lm_head on CPU':>16}  {'partial':>9}  recommended",
    ]
    for c in report["cards"].values():
        rows = {r["placement"]: r for r in c["placements"]}
        cell = lambda r: (f"{r['max_context']} tok" if r["fits"] else "no")  # noqa: E731
        part = rows["partial_layers"]
        lines.append(
            f"{c['name']:<26}{c['memory_bytes'] / GiB:>5.0f}G  {cell(rows['all_gpu']):>14}  {cell(rows['vision_on_cpu']):>14}  "
            f"{cell(rows['vision_and_lm_head_on_cpu']):>16}  {part['gpu'][0].split(' of ')[0] + '/' + str(report['footprint']['layers']):>9}  "
            f"{c['recommended'] or 'none'}"
        )
    return "\n".join(lines)


# -- optimization profiles ----------------------------------------------------------------------


def decoder_profiles(context: int, chunk: int) -> list[dict]:
    """Symbolic-dim ranges of the decoder's two profiles; every corner is a consistent shape set."""
    chunk = max(1, min(chunk, context))
    mid = max(0, context // 2)
    return [
        {"name": "prefill", "dims": {"batch": [1, 1, 1], "seq": [1, chunk, chunk], "past": [0, 0, context - chunk],
                                     "total": [1, chunk, context]}},
        {"name": "decode", "dims": {"batch": [1, 1, 1], "seq": [1, 1, 1], "past": [0, mid, context - 1],
                                    "total": [1, mid + 1, context]}},
    ]


def vision_profiles(max_patches: int, unit: int) -> list[dict]:
    opt = max(unit, min(VISION_OPT_PATCHES, max_patches))
    return [{"name": "prefill", "dims": {"patches": [unit, opt - opt % unit, max_patches]}}]


def profile_shapes(inputs: list[dict], dims: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    """Per input: {"min", "opt", "max"} concrete shapes from the graph's I/O signature."""
    shapes = {}
    for inp in inputs:
        rows = {"min": [], "opt": [], "max": []}
        for d in inp["shape"]:
            if isinstance(d, int):
                for k in rows:
                    rows[k].append(d)
            elif d in dims:
                for j, k in enumerate(("min", "opt", "max")):
                    rows[k].append(int(dims[d][j]))
            else:
                raise QvlError(f"input {inp['name']} has dimension {d!r} that no optimization profile sizes",
                               hint=f"known dims: {', '.join(dims)}")
        shapes[inp["name"]] = rows
    return shapes


# -- the kit ------------------------------------------------------------------------------------


@dataclass
class KitReport:
    out: Path
    target: str
    seconds: float
    lowering: list[dict]
    kit: dict = field(default_factory=dict)
    precision: dict | None = None  # INT8 kits: the manifest's precision record (pass, calibration, budget)


def _preprocessor_max_patches(folder: Path, patch: int) -> int | None:
    import json

    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    size = cfg.get("size") or {}
    max_pixels = size.get("longest_edge") or cfg.get("max_pixels")
    return int(max_pixels // (patch * patch)) if max_pixels else None


def _graph_opset(model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def build_settings(target_name: str, has_qdq: bool, workspace: int) -> dict:
    target = get_target(target_name)
    fp16 = "float16" in target.fast_dtypes
    return {
        "precision": "fp32" + ("+int8(explicit Q/DQ)" if has_qdq else "") + ("+fp16" if fp16 else ""),
        "fp16": fp16,  # sm61: never (FP16 runs at 1/64 rate on GP10x)
        "int8": bool(has_qdq and 8 in target.int_weight_bits),  # only with explicit Q/DQ in the graphs
        "tf32": False,
        "refit": True,
        "workspace_bytes": int(workspace),
        "builder_optimization_level": 3,
        "max_onnx_opset": target.max_opset,
        "tensorrt": ">=8.6,<9" if target_name == "sm61" else ">=10",
        "fp16_guard": target_name == "sm61",
    }


def _check_standard(graphs: dict, caps, lowering: list[dict]) -> None:
    problems = []
    for name, model in graphs.items():
        opset = _graph_opset(model)
        if caps.max_opset is not None and (opset is None or opset > caps.max_opset):
            reasons = "; ".join(s["reason"] for r in lowering if r["graph"] == name for s in r["skipped"])
            problems.append(f"{name} is opset {opset} > {caps.max_opset} ({reasons or 'not lowered'})")
        foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph if n.domain not in STANDARD_DOMAINS})
        if foreign:
            problems.append(f"{name} has non-standard ops {', '.join(foreign)}")
    if problems:
        raise QvlError(f"cannot make a {caps.name} engine kit: {problems[0]}",
                       hint="TensorRT parses standard ONNX only, up to the target's opset")


def _save_kit_graphs(graphs: dict, caps, staging: Path, files: dict) -> dict:
    """Save each graph in place (initializers keep their weight-store references); manifest graph entries."""
    import onnx_ir as ir

    from qvl.toolchain.export.exporter import io_signature

    entries = {}
    for name, model in graphs.items():
        if caps.max_opset is not None and caps.max_opset <= 17:
            model.ir_version = min(model.ir_version, OPSET17_IR_VERSION)  # the ONNX 1.12 era of TensorRT 8.6's parser
        path = staging / files[name]
        ir.save(model, str(path))
        entries[name] = {"file": path.name, "sha256": mf.sha256_file(path), **io_signature(model)}
    return entries


def kit_section(graphs: dict, entries: dict, manifest: dict, caps, staging: Path, *, card: str | None,
                prefill_chunk: int) -> dict:
    """manifest["kit"]: memory fit (from the graphs' deployed weight bytes), profiles, build settings, KV contract."""
    config = manifest["source"]["config"]
    fp = footprint_from_graphs(graphs, config)
    d = fp.dims
    pre_max = _preprocessor_max_patches(staging, config["vision_config"]["patch_size"])
    chosen = card or _default_card(caps.memory_bytes)
    cards = SM61_CARDS if caps.name == "sm61" else {}
    fit = memory_fit_report(fp, cards, chunk=prefill_chunk, preprocessor_max_patches=pre_max)
    if chosen is not None:
        sel = fit["cards"][chosen] if chosen in fit["cards"] else {"name": SM61_CARDS[chosen][0], **fit_card(fp, SM61_CARDS[chosen][1], chunk=prefill_chunk)}
        memory = sel["memory_bytes"]
        context = sel["max_context"] if sel["recommended"] else min(MIN_CONTEXT, d.context_length)
        selected = {"card": chosen, "name": sel["name"], "recommended": sel["recommended"], "fits": sel["recommended"] is not None,
                    "fits_as_built": sel["fits_as_built"], "max_context": sel["max_context"], "on_cpu": sel["on_cpu"]}
    else:  # sm75+: no card table; size the profiles for the model's context up to 8192 positions
        memory = caps.memory_bytes or 8 * GiB
        context = min(8192, d.context_length)
        selected = {"card": None, "memory_bytes": memory, "fits": None}
    context = max(min(context, d.context_length), 2)
    chunk = min(prefill_chunk, context)
    patches = vision_max_patches(fp, memory, pre_max)
    unit = d.v_merge**2
    profiles = {"decoder": decoder_profiles(context, chunk), "vision": vision_profiles(patches, unit)}
    kit_graphs = {}
    for name, entry in entries.items():
        kit_graphs[name] = {
            "file": entry["file"],
            "opset": _graph_opset(graphs[name]),
            "profiles": [{"name": p["name"], "dims": p["dims"], "shapes": profile_shapes(entry["inputs"], p["dims"])}
                         for p in profiles[name]],
        }
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for m in graphs.values() for n in m.graph)
    n_layers = manifest["model"]["num_layers"]
    return {
        "format": KIT_FORMAT,
        "version": KIT_VERSION,
        "target": caps.name,
        "context_length": context,
        "prefill_chunk": chunk,
        "max_image_patches": patches,
        "graphs": kit_graphs,
        "build": build_settings(caps.name, has_qdq, workspace_bytes(memory)),
        "kv_cache": {
            "mode": "concat",
            "inputs": [f"past_{k}_{i}" for i in range(n_layers) for k in ("key", "value")],
            "outputs": [f"present_{k}_{i}" for i in range(n_layers) for k in ("key", "value")],
            "layout": "[batch, kv_heads, length, head_dim] float32, contiguous",
            "binding": "two preallocated device buffers of `context_length` positions per tensor; "
                       "present of step t is written into one and bound as past of step t+1 (ping-pong)",
        },
        "memory_fit": {"selected": selected, **fit},
    }


def make_engine_kit(
    artifact_or_checkpoint: Path,
    target: str = "sm61",
    out: Path | None = None,
    *,
    card: str | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    overwrite: bool = False,
    step: Callable[[str], None] | None = None,
) -> KitReport:
    import onnx_ir as ir

    from qvl.passes.opset_lowering import OpsetLoweringPass
    from qvl.passes.qdq_int8 import linear_sites
    from qvl.toolchain.compile.pipeline import compile_artifact

    step = step or (lambda m: None)
    caps = _kit_target(target, out, card)
    t0 = time.perf_counter()
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(Path(artifact_or_checkpoint),)) as staging:
        compiled = staging / "compiled"
        compile_artifact(Path(artifact_or_checkpoint), caps.name, compiled, step=step)
        for f in compiled.iterdir():
            shutil.move(str(f), str(staging / f.name))
        compiled.rmdir()
        manifest = mf.read_manifest(staging)

        step("lowering opsets")
        graphs = {name: ir.load(str(staging / g["file"])) for name, g in manifest["graphs"].items()}
        # The opset converter round-trips through protobuf and drops node metadata (the exporter's module
        # scopes), so the linear layers' layer keys are taken before and stamped back as `qvl.layer` after:
        # the INT8 budget search rolls back whole layers (decoder.layers.3), not single nodes.
        layer_of = {name: {n.name: layer for n, _, layer in linear_sites(model, name)} for name, model in graphs.items()}
        lowering = []
        lower = OpsetLoweringPass()
        for name, model in graphs.items():
            result = lower(model, caps, name)
            lowering.append({"graph": name, **result.report.to_dict()})
        for name, model in graphs.items():
            for node in model.graph:
                layer = layer_of[name].get(node.name)
                if layer is not None and "qvl.layer" not in node.metadata_props:
                    node.metadata_props["qvl.layer"] = layer
        _check_standard(graphs, caps, lowering)

        step("writing graphs")
        entries = _save_kit_graphs(graphs, caps, staging, {n: g["file"] for n, g in manifest["graphs"].items()})
        step("memory fit and profiles")
        kit = kit_section(graphs, entries, manifest, caps, staging, card=card, prefill_chunk=prefill_chunk)
        seconds = time.perf_counter() - t0
        mf.write_manifest(staging, {
            **{k: v for k, v in manifest.items() if k not in ("format", "format_version", "created")},
            "target": caps.name,
            "graphs": entries,
            "kit": kit,
            "steps": manifest.get("steps", []) + [
                {"name": "trt_kit", "target": caps.name, "passes": lowering, "seconds": round(seconds, 2)}],
        })
    return KitReport(Path(out), caps.name, seconds, lowering, kit)


def _kit_target(target: str, out: Path | None, card: str | None):
    caps = get_target(target)
    if caps.name not in TRT_TARGETS:
        raise QvlError(f"target {target!r} is not a TensorRT target", hint=f"engine kits are for: {', '.join(TRT_TARGETS)}")
    if out is None:
        raise QvlError("no output directory given for the engine kit", hint="pass --out DIR")
    if card is not None and card not in SM61_CARDS:
        raise QvlError(f"unknown card {card!r}", hint=f"choose one of: {', '.join(SM61_CARDS)}")
    return caps


# -- INT8 kits: explicit Q/DQ, calibrated, accuracy-budgeted ------------------------------------------


def qdq_weight_format(target: str) -> str:
    """sm61 (TensorRT 8.6): fp32 weights + Q/DQ, quantized by TensorRT at build time (8.x requires Q/DQ
    weights in FP32); sm75+ (TensorRT >= 10): pre-quantized int8 weights behind a DequantizeLinear."""
    return "float_qdq" if get_target(target).name == "sm61" else "int8"


def qdq_record(config, reports: dict, calibration: dict | None) -> dict:
    """manifest["precision"] of an INT8 kit: per-layer decisions, bytes, skips, counts, calibration."""
    layers, skipped, counts = {}, [], {}
    before = after = 0
    for name, r in reports.items():
        for layer, d in r.details.get("layers", {}).items():
            layers[layer] = {"decision": d["decision"], "nodes": len(d["nodes"]), "bytes_before": d["bytes_before"],
                             "bytes_after": d["bytes_after"]}
        before += r.details.get("bytes_before", 0)
        after += r.details.get("bytes_after", 0)
        skipped += [{"graph": name, "where": s.where, "reason": s.reason} for s in r.skipped]
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    return {
        "kind": "int8 explicit Q/DQ (TensorRT)",
        "pass": "qdq_int8",
        "config": config.to_dict(),
        "weights": "symmetric per output channel, int8, zero point 0",
        "activations": "symmetric per tensor, int8, zero point 0, max calibration after SmoothQuant smoothing",
        "compute": "fp32 everywhere else; never fp16",
        "calibration": calibration,
        "layers": layers,
        "counts": counts,
        "linear_weight_bytes_before": before,
        "linear_weight_bytes_after": after,
        "converted": counts.get("quantized", 0),
        "skipped": skipped,
    }


def write_qdq_kit(fp32_kit: Path, out: Path, config, *, calibration: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Write `out`: the fp32 engine kit `fp32_kit` with `QdqInt8Pass(config)` on its graphs, a new weight
    store, and a recomputed kit section (int8 build flag, int8 memory fit). Returns the precision record."""
    import onnx_ir as ir

    from qvl.passes.qdq_int8 import QdqInt8Pass
    from qvl.toolchain.quant.accuracy_budget import embedding_entry
    from qvl.toolchain.export.exporter import save_graphs

    t0 = time.perf_counter()
    fp32_kit = Path(fp32_kit)
    manifest = mf.read_manifest(fp32_kit)
    kit = manifest.get("kit") or {}
    if kit.get("format") != KIT_FORMAT:
        raise QvlError(f"{fp32_kit} is not a TensorRT engine kit")
    caps = get_target(kit["target"])
    graphs = {name: ir.load(str(fp32_kit / g["file"])) for name, g in manifest["graphs"].items()}
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for m in graphs.values() for n in m.graph):
        raise QvlError(f"{fp32_kit} already has Q/DQ: start from the fp32 kit")
    pass_ = QdqInt8Pass(config)
    reports = {name: pass_(model, caps, name).report for name, model in graphs.items()}
    _check_standard(graphs, caps, [])
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(fp32_kit,)) as staging:
        _, store = save_graphs(graphs, staging)  # new weight store: smoothed weights, scales, folded norm constants
        mf.copy_side_files(fp32_kit, staging)
        entries = _save_kit_graphs(graphs, caps, staging, {n: g["file"] for n, g in manifest["graphs"].items()})
        selected = kit["memory_fit"]["selected"].get("card")
        section = kit_section(graphs, entries, manifest, caps, staging, card=selected, prefill_chunk=kit["prefill_chunk"])
        record = qdq_record(config, reports, calibration)
        new = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created")}
        new.update(
            graphs=entries,
            weights={"file": mf.WEIGHTS, "bytes": (staging / mf.WEIGHTS).stat().st_size},
            embedding=embedding_entry(graphs["decoder"]),
            kit=section,
            precision=record,
            steps=list(manifest.get("steps", [])) + [{
                "name": "qdq_int8", "target": caps.name, "seconds": round(time.perf_counter() - t0, 2),
                "weight_bytes_written": store.bytes_written,
                "reports": {k: r.to_dict() for k, r in reports.items()},
            }],
        )
        mf.write_manifest(staging, new)
    return record


def make_int8_engine_kit(
    artifact_or_checkpoint: Path,
    target: str = "sm61",
    out: Path | None = None,
    *,
    budget=None,
    alpha: float | None = 0.5,
    card: str | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    overwrite: bool = False,
    threads: int | None = 1,
    cases: list | None = None,
    step: Callable[[str], None] | None = None,
) -> KitReport:
    """fp32 kit -> calibration -> explicit INT8 Q/DQ on every eligible layer -> with a `budget`
    (`accuracy_budget.AccuracyBudget`), the per-layer roll-back search against the fp32 kit, so layers
    over budget stay fp32. Budget, calibration summary and decisions land in the manifest's `precision`."""
    from dataclasses import replace

    from qvl.passes.qdq_int8 import QdqInt8Config
    from qvl.toolchain.quant.accuracy_budget import BudgetResult, calibration_cases, publish_candidate, rollback_search
    from qvl.toolchain.quant.calibration import calibrate_artifact

    say = step or (lambda m: None)
    caps = _kit_target(target, out, card)
    out = Path(out)
    t0 = time.perf_counter()
    # lock and check --out before the (long) fp32 kit + calibration + search, which write it only at the end
    with output_lock(out), scratch_dir("qvl-int8-kit-") as tmp:
        check_output_target(out, overwrite, sources=(Path(artifact_or_checkpoint),))
        tmp = Path(tmp)
        fp32 = tmp / "fp32-kit"
        base = make_engine_kit(artifact_or_checkpoint, caps.name, fp32, card=card, prefill_chunk=prefill_chunk, step=step)
        cases = cases if cases is not None else calibration_cases(tmp / "images")
        say("calibrating activations")
        stats = calibrate_artifact(fp32, cases=cases, threads=threads or 1, progress=say)
        calibration = {**stats.summary(), "alpha": alpha}
        # The lm_head in INT8 too (its fp32 table stays the host embedding table): on a 2 GB card it is the
        # largest single weight (1.16 GiB fp32 for the 2B model, 0.29 GiB int8 in the engine).
        config = QdqInt8Config(stats.channel_max, alpha=alpha, weight_format=qdq_weight_format(caps.name),
                               include_lm_head=True)
        if budget is None:
            say("inserting INT8 Q/DQ")
            record = write_qdq_kit(fp32, out, config, calibration=calibration, overwrite=overwrite)
        else:
            work = tmp / "search"
            work.mkdir()
            full, final, record, best, rolled_back, scores, evaluations = rollback_search(
                fp32,
                lambda path, restored: write_qdq_kit(fp32, path, replace(config, keep_fp32=config.keep_fp32 | restored),
                                                     calibration=calibration),
                lambda rec: [k for k, v in rec["layers"].items() if v["decision"] == "int8"],
                budget, ("all int8", "fp32"), work, cases, threads, say)
            decisions = {k: ("fp32" if k in rolled_back else v["decision"]) for k, v in record["layers"].items()}
            result = BudgetResult(decisions, final, full, scores, rolled_back, final.within(budget), evaluations)
            result.seconds = time.perf_counter() - t0
            updates = {"budget_search": result.to_manifest(budget), "decisions": decisions,
                       "reference": "the fp32 engine kit (same graphs without Q/DQ), parity-checked against eager"}
            publish_candidate(best, out, "precision", updates, overwrite)
            record = {**record, **updates}
    manifest = mf.read_manifest(out)
    return KitReport(out, caps.name, time.perf_counter() - t0, base.lowering, manifest["kit"], manifest["precision"])


def _default_card(memory_bytes: int | None) -> str | None:
    """The smallest SM61 card with the target's memory (sm61: 2 GiB -> MX250, the laptop's GPU)."""
    if memory_bytes is None:
        return None
    fitting = [k for k, (_, mem) in SM61_CARDS.items() if mem == memory_bytes]
    return fitting[0] if fitting else None


def kit_command(source: Path, target: str = "sm61", out: Path | None = None, *, overwrite: bool = False,
                card: str | None = None, echo: Callable[[str], None] | None = None,
                step: Callable[[str], None] | None = None, weights: str = "fp32", budget=None,
                threads: int | None = None) -> KitReport:
    """CLI body of `qvl-compile compile --target sm61|sm75+ [--weights int8]`: write the kit and print its summary."""
    import sys

    echo = echo or (lambda s: print(s, file=sys.stderr))
    if weights == "int8":
        report = make_int8_engine_kit(source, target, out, budget=budget, card=card, overwrite=overwrite,
                                      threads=threads, step=step)
    elif weights == "fp32":
        report = make_engine_kit(source, target, out, card=card, overwrite=overwrite, step=step)
    else:
        raise QvlError(f"TensorRT kits have no {weights} path", hint="use --weights fp32 or --weights int8 (explicit Q/DQ)")
    kit = report.kit
    for r in report.lowering:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if v) or "no change"
        echo(f"  {r['name']:<24} {r['graph']:<8} {counts}")
    for name, g in kit["graphs"].items():
        profs = "; ".join(f"{p['name']}: " + ", ".join(f"{k} {v[0]}..{v[2]}" for k, v in p["dims"].items() if v[0] != v[2])
                          for p in g["profiles"])
        echo(f"  {name:<8} opset {g['opset']}  profiles {profs}")
    if report.precision is not None:
        p = report.precision
        counts = p["counts"]
        kept = sum("keep_fp32" in s["reason"] for s in p["skipped"])
        other = len(p["skipped"]) - kept
        echo(f"  int8 Q/DQ: {counts.get('quantized', 0)} linear layers ({counts.get('smoothing_folded', 0)} smoothing vectors "
             f"folded into norms, {counts.get('smoothing_mul', 0)} as Mul); {kept} kept fp32 by the budget, {other} other "
             f"skips (the tied lm_head is INT8 in the engine; its fp32 table stays the host embedding table); calibration on "
             f"{len(p['calibration']['cases'])} prompts, SmoothQuant alpha {p['calibration']['alpha']}")
        search = p.get("budget_search")
        if search:
            meas = search["measured"]
            back = search.get("rolled_back") or []
            echo(f"  accuracy budget {'met' if search['within_budget'] else 'NOT met'} vs the fp32 kit: mean KL "
                 f"{meas['mean_kl']:.4g}, greedy agreement {meas['greedy_agreement']:.3f}, max |dlogit| "
                 f"{meas['max_abs_logit_diff']:.3g}; layers kept fp32: {', '.join(back) or 'none'}")
        else:
            echo("  no accuracy budget (--no-budget): every eligible layer is INT8, unmeasured")
    b = kit["build"]
    echo(f"  build: {b['precision']}, fp16={'on' if b['fp16'] else 'off'}, int8={'on' if b['int8'] else 'off'}, "
         f"refit, workspace {b['workspace_bytes'] // MiB} MiB, TensorRT {b['tensorrt']}")
    fit = kit["memory_fit"]
    if fit["cards"]:
        echo(format_memory_fit(fit))
    sel = fit["selected"]
    dtype = "int8" if report.precision is not None else "fp32"
    if sel.get("card") and not sel["fits"]:
        echo(f"warning: the model does not fit the {sel['name']} at {dtype} in any placement; "
             f"profiles sized for {kit['context_length']} positions (see the memory-fit table)")
    elif sel.get("card") and not sel["fits_as_built"]:
        echo(f"note: on the {sel['name']} keep on the CPU: {', '.join(sel['on_cpu'])}")
    echo(f"wrote engine kit {report.out} for {report.target} in {report.seconds:.1f} s "
         f"(context {kit['context_length']}, build with `qvl-compile build-engine {report.out}`)")
    return report


def kit_summary(kit: dict) -> dict:
    """Small JSON-able summary (for --json outputs)."""
    return {"target": kit["target"], "context_length": kit["context_length"], "prefill_chunk": kit["prefill_chunk"],
            "graphs": {k: {"opset": g["opset"], "profiles": [p["name"] for p in g["profiles"]]} for k, g in kit["graphs"].items()},
            "build": kit["build"], "selected": kit["memory_fit"]["selected"]}


__all__ = [
    "SM61_CARDS", "ModelDims", "Footprint", "parameter_counts", "footprint_from_config", "footprint_from_graphs",
    "fit_card", "memory_fit_report", "format_memory_fit", "decoder_profiles", "vision_profiles", "profile_shapes",
    "make_engine_kit", "kit_command", "kit_summary", "KitReport", "deployed_bytes", "kit_section",
    "make_int8_engine_kit", "write_qdq_kit", "qdq_weight_format", "qdq_record",
]
