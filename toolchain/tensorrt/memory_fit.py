"""Memory fit (`memory_fit_report`): for each SM 6.1 card (MX250 2 GB, GTX 1050 2 GB, GTX 1050 Ti 4 GB,
GTX 1060 3 GB / 6 GB) and each placement, from most to least on the GPU, whether it fits and the longest
context that does. All sizes come from the checkpoint config (`footprint_from_config`) or, for a kit,
from the kit graphs' own initializer bytes (`footprint_from_graphs`, dtype-aware). The model is an
estimate with stated assumptions (`ASSUMPTIONS`): weights are resident, the KV cache is the concat form
(past and present are separate engine tensors, so two capacity-sized buffers per layer and K/V,
ping-ponged), one decoder layer's activations are live at a time (TensorRT reuses activation memory
across layers), attention scores are materialised (Pascal has no fused attention kernels), plus a fixed
CUDA-context/runtime reserve and the builder workspace.

Optimization profiles (`decoder_profiles`, `vision_profiles`, `profile_shapes`): the min / opt / max shapes
the kit records per graph, sized by the memory fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl.errors import QvlError
from qvl.toolchain.compile.targets import GiB

MiB = 1 << 20

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
# Most `logit_positions` one prefill-profile call takes: a speculative verify step of up to 15 drafts. Ordinary
# steps ask for 1 (the profile's opt); the bound keeps the full-vocabulary logits block small (16 rows).
VERIFY_POSITIONS = 16

ASSUMPTIONS = {
    "weights": "resident on the GPU at their stored dtype (fp32 unless the kit has explicit Q/DQ)",
    "kv_cache": "concat form: past and present are separate engine tensors -> 2 capacity-sized buffers per layer and K/V (ping-pong)",
    "activations": "one decoder layer live at a time; attention scores and probabilities materialised (no fused attention on Pascal); repeat_kv-expanded K/V; logits of at most VERIFY_POSITIONS positions (1 on ordinary steps)",
    "runtime_reserve_bytes": RUNTIME_RESERVE_BYTES,
    "workspace_bytes": f"min({MAX_WORKSPACE_BYTES}, memory / 16)",
    "prefill_chunk": PREFILL_CHUNK,
    "min_context": MIN_CONTEXT,
    "embedding_lookup": "always on the host (memory-mapped embedding table); tied: the same matrix is the lm_head, "
                        "untied: the lm_head is its own matrix of the same size",
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
        "embedding": d.vocab * d.hidden,  # the lm_head (tied: = the input embedding; untied: a second such matrix)
    }


@dataclass(frozen=True)
class Footprint:
    dims: ModelDims
    vision_weight_bytes: int
    decoder_layer_weight_bytes: int  # all transformer layers + final norm
    lm_head_bytes: int  # the lm_head matrix (tied: the embedding table; untied: lm_head.weight)
    weight_dtype: str  # what the byte counts assume ("float32", "int8", "graph" = the graphs' own)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one position, fp32, one buffer."""
        d = self.dims
        return d.num_layers * 2 * d.kv_heads * d.head_dim * 4

    def decoder_activation_bytes(self, chunk: int, total: int) -> int:
        d = self.dims
        per_row = 6 * d.hidden + (d.heads + 2 * d.kv_heads) * d.head_dim + 3 * d.intermediate + (1 + d.num_deepstack) * d.hidden
        logit_rows = min(chunk, VERIFY_POSITIONS)
        return 4 * (chunk * per_row + 2 * d.heads * chunk * total + 2 * d.heads * total * d.head_dim + logit_rows * d.vocab)

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


def footprint_from_graphs(graphs: dict, config: dict, lm_head_names: tuple[str, ...] = ("embed_tokens.weight",
                                                                                        "lm_head.weight")) -> Footprint:
    """Weight bytes as deployed from the kit's graphs (so Q/DQ int8 weights count as int8: `deployed_bytes`). The
    lm_head is the first of `lm_head_names` the decoder has: the tied embedding table, else the untied lm_head (an
    untied decoder's embedding table is in no graph: host lookup only)."""

    def nbytes(model, skip=()):
        return sum(deployed_bytes(v) for k, v in model.graph.initializers.items() if v.const_value is not None and k not in skip)

    dec = graphs["decoder"]
    head_name = next((n for n in lm_head_names if n in dec.graph.initializers), None)
    emb = dec.graph.initializers.get(head_name) if head_name else None
    lm_head = deployed_bytes(emb) if emb is not None and emb.const_value is not None else 0  # int8 when Q/DQ'd
    return Footprint(
        ModelDims.from_config(config),
        vision_weight_bytes=nbytes(graphs["vision"]),
        decoder_layer_weight_bytes=nbytes(dec, skip=(head_name,)),
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
    """Symbolic-dim ranges of the decoder's two profiles; every corner is a consistent shape set.

    `positions` (the `logit_positions` input; graphs exported before it have no such dim and ignore it): 1 on
    ordinary steps, up to `VERIFY_POSITIONS` (at most the chunk) in a speculative verify step's prefill-profile
    call; one-position decode calls ask for their one position."""
    chunk = max(1, min(chunk, context))
    mid = max(0, context // 2)
    verify = min(VERIFY_POSITIONS, chunk)
    return [
        {"name": "prefill", "dims": {"batch": [1, 1, 1], "seq": [1, chunk, chunk], "past": [0, 0, context - chunk],
                                     "total": [1, chunk, context], "positions": [1, 1, verify]}},
        {"name": "decode", "dims": {"batch": [1, 1, 1], "seq": [1, 1, 1], "past": [0, mid, context - 1],
                                    "total": [1, mid + 1, context], "positions": [1, 1, 1]}},
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


__all__ = [
    "SM61_CARDS", "ModelDims", "Footprint", "parameter_counts", "footprint_from_config", "footprint_from_graphs",
    "deployed_bytes", "fit_card", "memory_fit_report", "format_memory_fit", "decoder_profiles", "vision_profiles",
    "profile_shapes", "workspace_bytes", "vision_max_patches",
]
