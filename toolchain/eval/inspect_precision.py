"""`qvl-compile inspect-precision KIT [--against REF]`: where a quantized graph departs from its reference.

Every intermediate tensor of the decoder (and the vision graph, when both artifacts have one) is made a graph
output with Polygraphy (`OnnxFromPath(ignore_external_data=True)` -> `ModifyOutputs(outputs=MARK_ALL)` ->
`SaveOnnx` into a scratch directory next to a hard link of the artifact's `weights.bin`, on the artifact's
filesystem so the store is linked, not copied: the artifact itself is never written). Both graphs run on ONNX
Runtime CPU (one thread by default, basic graph optimizations only, so an fp32 graph against itself is exactly
0) through Polygraphy's `OnnxrtRunner` + `Comparator.run` on the same inputs: one deterministic image+text
prompt, prepared with the reference's tokenizer, chat template
and image preprocessing (the torch-free runtime's) -- the vision graph's feeds, then the decoder's prefill
with an empty KV cache and the *reference's* image features scattered in, so both decoders see the same
embeddings and the comparison measures each graph on its own.

Tensors are aligned by name. Only names present in both graphs are compared (Q/DQ and smoothing insert new
tensors: counted as `only_candidate`); of those, a tensor is skipped when its producer is the same op reading
constants the reference does not have (SmoothQuant folds 1/s into the norm weight: that output is rescaled on
purpose, not in error), when shapes differ, when it is not floating point, or when it is empty. A tensor
belongs to the deepest layer it depends on: a node's layer is its `qvl.layer` / torch name-scope metadata
(`passes/linear_sites.layer_key`) or a `present_{key,value}_N` output name, else the latest layer among its
inputs' (graph order); tensors that depend on no layer are `(inputs)`. Per layer: max |a - b| over its
tensors, mean |a - b| over all their elements, the worst tensor; the first layer whose max exceeds
`tolerance` is reported (information only: the command exits 0 either way).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qvl.artifacts.manifest import read_manifest
from qvl.artifacts.schema import Manifest
from qvl.errors import QvlError

DEFAULT_TOLERANCE = 0.05  # max |a - b| of a layer's tensors above which the layer is reported as over
PROMPT = "Describe the shapes and colours in the picture."
IMAGE_SIZE = (64, 64)  # small (the preprocessor's min_pixels may scale it up): every tensor of both runs is kept
INPUTS = "(inputs)"  # tensors that depend on no layer (embeddings, rotary tables, masks)
_KV_NAME = re.compile(r"^(?:present|past)_(?:key|value)_(\d+)$")
_LAYER_INDEX = re.compile(r"\.(?:layers|blocks)\.(\d+)$")


@dataclass
class LayerError:
    layer: str
    index: int | None  # N of `<graph>.layers.N` / `vision.blocks.N`
    tensors: int
    elements: int
    max_abs: float
    mean_abs: float
    max_scaled: float  # max over its tensors of max |a - b| / max |b|: the error against the tensor's own range
    worst: str  # the tensor with the largest max |a - b| ("" when every difference is 0)


@dataclass
class GraphComparison:
    graph: str
    in_both: int
    compared: int
    skipped: dict  # reason -> count
    only_candidate: int
    only_reference: int
    layers: list = field(default_factory=list)  # LayerError, in graph order
    first_over: str | None = None

    @property
    def max_abs(self) -> float:
        return max((lay.max_abs for lay in self.layers), default=0.0)


@dataclass
class PrecisionReport:
    artifact: str
    reference: str
    reference_from: str  # "--against" | "manifest"
    tolerance: float
    runner: str
    inputs: dict  # graph -> the input sets run ("prefill of 38 tokens ...", ...)
    graphs: dict  # name -> GraphComparison
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, g in self.graphs.items():
            d["graphs"][name]["max_abs"] = g.max_abs
        return d

    def format(self) -> str:
        lines = [f"inspect-precision: {self.artifact} vs {self.reference} ({self.runner}, reference from {self.reference_from})"]
        for name, g in self.graphs.items():
            skipped = ", ".join(f"{n} {why}" for why, n in g.skipped.items() if n) or "none"
            lines.append(f"{name}: inputs {'; '.join(self.inputs[name])}; {g.in_both} tensors in both graphs: "
                         f"{g.compared} compared, {g.in_both - g.compared} skipped ({skipped}); "
                         f"{g.only_candidate} only in the artifact (Q/DQ, smoothing), {g.only_reference} only in the reference")
            lines.append(f"  {'layer':<32} {'tensors':>7} {'max |Δ|':>10} {'mean |Δ|':>10} {'max |Δ|/range':>13}  worst tensor")
            for lay in g.layers:
                lines.append(f"  {lay.layer:<32} {lay.tensors:>7} {lay.max_abs:>10.3g} {lay.mean_abs:>10.3g} "
                             f"{lay.max_scaled:>13.3g}  {lay.worst or '-'}")
            if g.first_over is None:
                lines.append(f"  no layer over the tolerance {self.tolerance:g} (max |Δ| {g.max_abs:.3g})")
            else:
                lay = next(x for x in g.layers if x.layer == g.first_over)
                lines.append(f"  first layer over the tolerance {self.tolerance:g}: {lay.layer} "
                             f"(max |Δ| {lay.max_abs:.3g} at {lay.worst})")
        return "\n".join(lines)


# -- which artifacts ------------------------------------------------------------------------------------------


def recorded_reference(manifest: Manifest) -> Path | None:
    """The reference artifact the manifest names, if it names one that exists (`precision.reference`).

    INT8 kits record `precision.reference` as a description ("the fp32 engine kit ...") of a temporary kit
    that is not kept, so for them this is None and `--against` is needed."""
    ref = (manifest.precision or {}).get("reference")
    if isinstance(ref, str) and ref:
        path = Path(ref)
        if not path.is_absolute() and manifest.artifact_dir is not None:
            path = manifest.artifact_dir / path
        if (path / "manifest.json").is_file():
            return path
    return None


def resolve_reference(artifact: Path, manifest: Manifest, against: Path | None) -> tuple[Path, str]:
    if against is not None:
        return Path(against), "--against"
    ref = recorded_reference(manifest)
    if ref is not None:
        return ref, "manifest"
    said = (manifest.precision or {}).get("reference")
    why = f" (its precision.reference is {said!r}, not a kept directory)" if said else ""
    raise QvlError(f"{artifact} records no reference artifact to compare against{why}: pass --against REF",
                   hint="REF is the fp32 kit/artifact it was made from, e.g. `qvl-compile compile SOURCE --target sm61 --out FP32_KIT`")


def check_comparable(cand: Manifest, ref: Manifest, cand_dir: Path, ref_dir: Path) -> list[str]:
    """The graphs to compare; a QvlError when the two artifacts are not the same model with the same graph I/O."""
    hint = "pass --against the fp32 kit or artifact this one was made from (same checkpoint, same target)"
    a, b = cand.source.sha256, ref.source.sha256
    if a and b and a != b:
        raise QvlError(f"{cand_dir} and {ref_dir} come from different checkpoints ({a[:12]} vs {b[:12]})", hint=hint)
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        x, y = getattr(cand.model, key), getattr(ref.model, key)
        if x != y:
            raise QvlError(f"{cand_dir} and {ref_dir} are different models ({key} {x} vs {y})", hint=hint)
    if cand.kv_mode != ref.kv_mode:
        raise QvlError(f"{cand_dir} and {ref_dir} have different decoders (KV cache {cand.kv_mode!r} vs {ref.kv_mode!r}): "
                       "their tensors do not correspond", hint=hint)
    if ref.kv_mode != "concat":
        raise QvlError(f"inspect-precision runs concat-KV decoders (engine kits, exports); {ref_dir} uses the in-place "
                       f"{ref.kv_mode!r} KV cache", hint="compare the engine kit or the plain export instead")
    graphs = [g for g in ("decoder", "vision") if g in cand.graphs and g in ref.graphs]
    if "decoder" not in graphs:
        raise QvlError(f"{cand_dir} and {ref_dir} do not both have a decoder graph", hint=hint)
    for g in graphs:
        if cand.graphs[g].input_names != ref.graphs[g].input_names:
            raise QvlError(f"the {g} graphs of {cand_dir} and {ref_dir} take different inputs", hint=hint)
    return graphs


# -- inputs: one deterministic prompt, prepared as the runtime prepares it ------------------------------------


def picture(size: tuple[int, int] = IMAGE_SIZE):
    """A deterministic picture: colour gradients, a red disc, a blue square."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 37 % 256], -1)
    rgb[(xx - w * 0.3) ** 2 + (yy - h * 0.3) ** 2 < (min(w, h) * 0.18) ** 2] = (220, 30, 30)
    rgb[int(h * 0.55):int(h * 0.9), int(w * 0.55):int(w * 0.9)] = (30, 30, 220)
    return Image.fromarray(rgb.astype(np.uint8))


def inspection_prompt(reference: Path, with_image: bool):
    """The reference's chat template, tokenizer and image preprocessing on PROMPT (+ `picture()`)."""
    from qvl.runtime.prompt import PromptBuilder

    prompts = PromptBuilder.from_dir(reference)
    content = ([{"type": "image", "image": picture()}] if with_image else []) + [{"type": "text", "text": PROMPT}]
    return prompts, prompts.build([{"role": "user", "content": content}], add_generation_prompt=True)


def vision_feeds(ref: Manifest, prompt) -> dict:
    """The vision graph's inputs for the prompt's one image (one vision call), as the runners build them."""
    from qvl.runtime.vision_tables import segment_feeds, vision_segments

    (start, stop, h, w), = vision_segments(prompt.image_grid_thw)
    return segment_feeds(prompt.pixel_values, start, stop, h, w, ref.source.vision_config,
                         ref.graphs["vision"].input_names)


def decoder_feeds(ref: Manifest, prompts, prompt, vision_out: list | None) -> dict:
    """The prefill of the prompt with an empty KV cache: token embeddings with the reference's image
    features scattered into the image positions, DeepStack features, MRoPE position ids."""
    from qvl.artifacts.weight_store import map_embedding
    from qvl.runtime.mrope import rope_index

    m = ref.model
    if ref.embedding.quantized:
        from qvl.runtime.quantized_embedding import QuantizedEmbedding

        table = QuantizedEmbedding.from_manifest(ref.artifact_dir, ref.embedding)
    else:
        table = map_embedding(ref)
    ids = np.asarray(prompt.input_ids, dtype=np.int64)
    embeds = np.asarray(table[ids], dtype=np.float32)[None].copy()
    deepstack = np.zeros((m.num_deepstack, 1, len(ids), m.hidden_size), dtype=np.float32)
    if vision_out is not None:
        mask = ids == prompts.image_token_id
        embeds[0, mask] = vision_out[0]
        for k, feat in enumerate(vision_out[1:]):
            deepstack[k, 0, mask] = feat
    position_ids, _ = rope_index(ids, prompt.mm_token_type_ids, prompt.image_grid_thw, m.spatial_merge_size)
    feeds = {"inputs_embeds": embeds, "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
             "attention_mask": np.ones((1, len(ids)), dtype=np.int64), "deepstack_embeds": deepstack}
    if "logit_positions" in ref.graphs["decoder"].input_names:  # graphs exported since: the last position's logits
        feeds["logit_positions"] = np.array([len(ids) - 1], dtype=np.int64)
    empty = np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=np.float32)
    for i in range(m.num_layers):
        feeds[f"past_key_{i}"] = feeds[f"past_value_{i}"] = empty
    return feeds


def _check_feeds(ref: Manifest, graph: str, feeds: dict) -> None:
    if set(feeds) != set(ref.graphs[graph].input_names):
        raise QvlError(f"the {graph} graph of {ref.artifact_dir} takes inputs {ref.graphs[graph].input_names}, "
                       f"not the runtime's {sorted(feeds)}", hint="re-make the artifact with this qvl-compile version")


# -- graphs: every tensor an output, in a scratch directory --------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Polygraphy logs to stdout, which is this command's report: silence it (errors still raise)."""
    from polygraphy.logger import G_LOGGER

    with contextlib.redirect_stdout(sys.stderr), G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def _scratch_base(artifact: Path) -> Path | None:
    """Where a scratch directory can hard-link the artifact's weight store: the temp dir (None) when it is on the
    artifact's filesystem, else the artifact's parent when writable (else the temp dir, and the store is copied)."""
    import tempfile

    parent = Path(artifact).resolve().parent
    if os.stat(tempfile.gettempdir()).st_dev == os.stat(parent).st_dev or not os.access(parent, os.W_OK):
        return None
    return parent


def marked_graph(manifest: Manifest, graph: str, work: Path) -> Path:
    """`work/<graph>.onnx`: the artifact's graph with every node output marked as a graph output (Polygraphy),
    its weights still references into the artifact's store (hard-linked into `work`)."""
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx

    work.mkdir(parents=True, exist_ok=True)
    from qvl.artifacts.writer import link_weight_files

    link_weight_files(manifest, work)  # weights.bin, or each weight object of a format-2 artifact
    out = work / Path(manifest.graphs[graph].file).name
    with _quiet():
        SaveOnnx(ModifyOutputs(OnnxFromPath(str(manifest.graph_path(graph)), ignore_external_data=True),
                               outputs=constants.MARK_ALL), path=str(out))()
    return out


def run_pair(candidate: Path, reference: Path, feeds: list[dict], threads: int | None) -> tuple[list, list]:
    """Both marked graphs on ONNX Runtime CPU, through `OnnxrtRunner` + `Comparator.run`; per input set, a
    {tensor: array} for each."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from qvl.runtime.backends.ort import session_options

    def session(path: Path):
        def make():
            so = session_options(threads or 1)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no fusions: every tensor is the graph's own
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return make

    runners = [OnnxrtRunner(session(candidate), name="candidate"), OnnxrtRunner(session(reference), name="reference")]
    with _quiet():
        results = Comparator.run(runners, data_loader=feeds)
    by_name = dict(results)
    return ([dict(it.items()) for it in by_name["candidate"]], [dict(it.items()) for it in by_name["reference"]])


# -- which layer a tensor belongs to -----------------------------------------------------------------------


def tensor_layers(model, graph: str) -> tuple[dict, list]:
    """{tensor name: layer} for every node output of an onnx-ir model, and the layers in graph order."""
    from qvl.passes.linear_sites import layer_key, module_path

    rank: dict[str, int] = {}
    of: dict[str, str] = {}
    for node in model.graph:  # topological order
        layer = None
        if node.metadata_props.get("qvl.layer") or module_path(node, None) is not None:
            layer = layer_key(node, graph, None)
        else:
            for out in node.outputs:
                m = _KV_NAME.match(out.name or "")
                if m:
                    layer = f"{graph}.layers.{m.group(1)}"
        if layer is None:
            deps = [of[v.name] for v in node.inputs if v is not None and v.name in of and of[v.name] != INPUTS]
            layer = max(deps, key=rank.__getitem__) if deps else INPUTS
        rank.setdefault(layer, len(rank))
        for out in node.outputs:
            if out.name:
                of[out.name] = layer
    return of, sorted(rank, key=rank.__getitem__)


def rescaled_outputs(candidate, reference) -> set[str]:
    """Outputs of candidate nodes that are the reference's op reading constants the reference lacks
    (SmoothQuant's folded norm weights): rescaled on purpose, so not comparable by name."""
    ref_inits = set(reference.graph.initializers)
    ref_ops = {out.name: node.op_type for node in reference.graph for out in node.outputs if out.name}
    cand_inits = set(candidate.graph.initializers)
    out = set()
    for node in candidate.graph:
        new_consts = any(v is not None and v.name in cand_inits and v.name not in ref_inits for v in node.inputs)
        if new_consts:
            out.update(o.name for o in node.outputs if o.name and ref_ops.get(o.name) == node.op_type)
    return out


# -- the comparison ----------------------------------------------------------------------------------------


def _node_outputs(model) -> list[str]:
    """Every node output in graph order but Constant nodes' (what MARK_ALL marks)."""
    return [o.name for n in model.graph if n.op_type != "Constant" for o in n.outputs if o.name]


def compare_graph(graph: str, cand_model, ref_model, cand_runs: list, ref_runs: list, tolerance: float) -> GraphComparison:
    of, order = tensor_layers(ref_model, graph)
    cand_names = set(_node_outputs(cand_model))
    ref_names = _node_outputs(ref_model)
    rescaled = rescaled_outputs(cand_model, ref_model)
    skipped = {"rescaled by SmoothQuant folding": 0, "shape differs": 0, "not floating point": 0, "empty": 0,
               "not an output": 0}
    stats: dict[str, list] = {}  # layer -> [tensors, elements, sum |d|, max |d|, worst, max scaled]
    both = [n for n in ref_names if n in cand_names]
    compared = 0
    for name in both:
        if name in rescaled:
            skipped["rescaled by SmoothQuant folding"] += 1
            continue
        if any(name not in c for c in cand_runs) or any(name not in r for r in ref_runs):
            skipped["not an output"] += 1  # (MARK_ALL marks every non-Constant node output: not expected)
            continue
        pairs = [(np.asarray(c[name]), np.asarray(r[name])) for c, r in zip(cand_runs, ref_runs)]
        if any(a.shape != b.shape for a, b in pairs):
            skipped["shape differs"] += 1
            continue
        if not all(np.issubdtype(b.dtype, np.floating) for _, b in pairs):
            skipped["not floating point"] += 1
            continue
        if all(b.size == 0 for _, b in pairs):
            skipped["empty"] += 1
            continue
        compared += 1
        s = stats.setdefault(of.get(name, INPUTS), [0, 0, 0.0, 0.0, "", 0.0])
        s[0] += 1
        for a, b in pairs:
            if b.size == 0:
                continue
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            m = float(d.max())
            s[1] += d.size
            s[2] += float(d.sum())
            if m > s[3] or np.isnan(m):
                s[3], s[4] = m, name
            scale = float(np.abs(b).max())
            s[5] = max(s[5], m / scale if scale > 0 else (0.0 if m == 0 else float("inf")))
    layers = []
    for key in [k for k in order if k in stats]:
        t, n, total, mx, worst, scaled = stats[key]
        idx = _LAYER_INDEX.search(key)
        layers.append(LayerError(key, int(idx.group(1)) if idx else None, t, n, mx, total / max(n, 1), scaled, worst))
    first = next((lay.layer for lay in layers if not lay.max_abs <= tolerance), None)  # NaN counts as over
    return GraphComparison(graph, len(both), compared, skipped, len(cand_names - set(ref_names)),
                           len(set(ref_names) - cand_names), layers, first)


def inspect_precision(artifact: Path, against: Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
                      threads: int | None = None, progress=None) -> PrecisionReport:
    """Compare every tensor the artifact's graphs share with a reference artifact's, layer by layer."""
    try:
        import polygraphy
    except ImportError:
        raise QvlError("inspect-precision needs Polygraphy, which is not installed",
                       hint="pip install 'polygraphy>=0.49' (in the `test` and `trt` extras)") from None

    from qvl.artifacts.writer import load_graphs
    from qvl.toolchain.staging import scratch_dir

    say = progress or (lambda m: None)
    if not (tolerance >= 0 and np.isfinite(tolerance)):
        raise QvlError(f"--tolerance must be a finite number >= 0, got {tolerance}", hint="e.g. --tolerance 0.05")
    t0 = time.perf_counter()
    artifact = Path(artifact)
    cand = read_manifest(artifact)
    ref_dir, ref_from = resolve_reference(artifact, cand, against)
    ref = read_manifest(ref_dir)
    graphs = check_comparable(cand, ref, artifact, ref_dir)
    prompts, prompt = inspection_prompt(ref_dir, "vision" in graphs)
    cand_models, ref_models = load_graphs(cand), load_graphs(ref)
    report = PrecisionReport(str(artifact), str(ref_dir), ref_from, float(tolerance),
                             f"ONNX Runtime CPU through Polygraphy {polygraphy.__version__}", {}, {})
    vision_out = None
    with contextlib.ExitStack() as stack:
        work = {name: Path(stack.enter_context(scratch_dir(".qvl-inspect-", dir=_scratch_base(path))))
                for name, path in (("candidate", artifact), ("reference", ref_dir))}
        for g in ("vision", "decoder"):  # vision first: its reference outputs are the decoder's image features
            if g not in graphs:
                continue
            if g == "vision":
                feeds = vision_feeds(ref, prompt)
                report.inputs[g] = [f"{feeds['pixel_values'].shape[0]} patches of a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image"]
            else:
                feeds = decoder_feeds(ref, prompts, prompt, vision_out)
                report.inputs[g] = [f"prefill of {len(prompt)} tokens" + (" with the image's features" if vision_out else "")]
            _check_feeds(ref, g, feeds)
            say(f"marking every {g} tensor as an output")
            a = marked_graph(cand, g, work["candidate"])
            b = marked_graph(ref, g, work["reference"])
            say(f"running both {g} graphs")
            cand_runs, ref_runs = run_pair(a, b, [feeds], threads)
            if g == "vision":
                vision_out = [np.asarray(ref_runs[0][n]) for n in ref.graphs[g].output_names]
            report.graphs[g] = compare_graph(g, cand_models[g], ref_models[g], cand_runs, ref_runs, tolerance)
            del cand_runs, ref_runs
    report.graphs = {g: report.graphs[g] for g in graphs}  # decoder first
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


__all__ = ["inspect_precision", "PrecisionReport", "GraphComparison", "LayerError", "DEFAULT_TOLERANCE",
           "tensor_layers", "rescaled_outputs", "recorded_reference"]
