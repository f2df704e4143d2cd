"""`qvl-compile export`: Hugging Face Qwen3-VL checkpoint -> fp32 ONNX artifact (vision + decoder).

Export uses torch.onnx's dynamo exporter on the small adapters in `export_adapters.py`, then three
graph-level fix-ups on the onnx-ir models before writing:

1. the lm_head becomes `Gemm(transB=1)` over its `[vocab, hidden]` matrix (the exporter folds `W^T` into a
   transposed copy): tied, that matrix is the embedding table, named `embed_tokens.weight`, so the runtime's
   embedding lookup and the lm_head share one layout of the same 311 M numbers; untied, it is the checkpoint's
   `lm_head.weight`, and the embedding table travels with the decoder as its host embedding
   (`passes/linear_sites.host_embedding`: read by the runtime only, used by no node);
2. every initializer goes into the one shared, deduplicated weight store (`artifacts.weight_store`);
3. IR version pinned so older ONNX Runtime builds (the laptop's) load the graphs.

The result directory is written atomically: an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qvl.artifacts import manifest as mf
from qvl.artifacts.writer import EMBEDDING_NAME, IR_VERSION, embedding_entry, save_graphs, write_artifact
from qvl.passes.linear_sites import LM_HEAD_LAYER, LM_HEAD_NAME, host_value, set_host_embedding
from qvl.runtime.chat_template_source import resolve_chat_template
from qvl.runtime.generation_defaults import GenerationDefaults
from qvl.toolchain.export.checkpoint_io import CheckpointInfo, validate_checkpoint
from qvl.toolchain.fsutil import atomic_output_dir, check_free_space, check_output_target, fault_point

OPSET = 20

VISION_INPUTS = ("pixel_values", "pos_interp_indices", "pos_interp_weights", "rotary_cos", "rotary_sin")
# The previous vision form (all images in one call, block-diagonal mask from this extra input); the runtime
# still runs artifacts exported that way, and `export_artifact(..., packed_vision=True)` still writes one.
PACKED_VISION_INPUT = "segment_ids"


@dataclass
class ExportReport:
    out: Path
    seconds: float
    weight_bytes: int
    dedup_bytes: int
    graphs: dict


def vision_io_names(num_deepstack: int, packed: bool = False) -> tuple[list[str], list[str]]:
    ins = list(VISION_INPUTS) + ([PACKED_VISION_INPUT] if packed else [])
    return ins, ["image_embeds"] + [f"deepstack_{k}" for k in range(num_deepstack)]


# int64 [positions]: which of a step's positions get logits (`[S-1]` on an ordinary step, all of a speculative
# verify step's); the last decoder input, so every earlier input keeps its index. Graphs exported before it
# existed return the last position's logits only (the runtime reads the graph's inputs).
LOGIT_POSITIONS = "logit_positions"


def decoder_io_names(num_layers: int, logit_positions: bool = True) -> tuple[list[str], list[str]]:
    kv = [f"{p}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value") for p in ("past",)]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    tail = [LOGIT_POSITIONS] if logit_positions else []
    return ["inputs_embeds", "position_ids", "attention_mask", "deepstack_embeds", *kv, *tail], ["logits", *present]


def _export(module, args, input_names, output_names, dynamic_shapes):
    import torch

    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    graph_model = program.model
    release_detached_values(graph_model.graph)
    return graph_model


def release_detached_values(graph) -> None:
    """Forget the values that were once graph inputs or outputs and no longer are.

    onnx-ir's input/output lists count their members in a Counter and leave a zero-count key behind for every
    value taken out of them (`_GraphIO._ref_counter`, onnx-ir 1.1). torch.onnx lifts every parameter to a graph
    input, then moves it to the initializers, so each parameter's original Value -- and through its TorchTensor
    the fp32 torch storage -- stayed referenced as long as the graph lived, even once its (folded) tensor was in
    the weight store: the whole model stayed resident through writing and hashing. A missing key is what the
    Counter holds for a non-member anyway, so dropping them changes nothing else."""
    for io in (graph.inputs, graph.outputs):
        counts = getattr(io, "_ref_counter", None)
        if isinstance(counts, Counter):
            for value in [v for v, n in counts.items() if n <= 0]:
                del counts[value]


def load_fp32_model(info: CheckpointInfo):
    """The checkpoint as transformers' `Qwen3VLForConditionalGeneration` in fp32 (eager attention), read tensor by
    tensor.

    `from_pretrained(path)` memory-maps every shard and keeps each page it touched mapped until the whole model
    is loaded, so its peak is the fp32 model plus the whole (bf16) checkpoint: 1.5x the fp32 bytes. Handed the
    same lazy safetensors slices opened with the `pread` backend (the one transformers itself uses where mmap does
    not suit), `from_pretrained(None, config=..., state_dict=...)` converts and assigns them through the same
    code path -- identical parameters, buffers and ties -- each tensor read into a transient buffer: the peak is
    the fp32 model plus one tensor. A safetensors without that backend gets the ordinary load."""
    import contextlib

    import torch
    from safetensors import safe_open
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    options = {"dtype": torch.float32, "attn_implementation": "eager"}
    with contextlib.ExitStack() as stack:
        try:
            shards = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu", backend="pread"))
                      for f in info.weight_files]
        except TypeError:  # safetensors before the `backend` argument
            return Qwen3VLForConditionalGeneration.from_pretrained(str(info.path), **options).eval()
        state = {name: shard.get_slice(name) for shard in shards for name in shard.keys()}
        config = Qwen3VLConfig.from_pretrained(str(info.path))
        model = Qwen3VLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, **options)
        del state
    return model.eval()


def export_vision_graph(model, packed: bool = False):
    """The vision tower as an onnx-ir model with a dynamic patch count.

    Default: the graph of ONE attention segment (an image, or one frame of a video; no mask), which the
    runtime calls once per segment. `packed=True`: the previous form (any number of images in one call,
    block-diagonal mask from a `segment_ids` input), kept for compatibility tests."""
    import torch

    from qvl.toolchain.export.adapters import VisionEncoderAdapter

    vis_cfg = model.config.vision_config
    adapter = VisionEncoderAdapter(model.model.visual, packed=packed).eval()
    # packed: two images, so the traced graph must not assume one; per segment: one 4x6 image
    grid = [(1, 4, 6), (1, 6, 4)] if packed else [(1, 4, 6)]
    n = sum(t * h * w for t, h, w in grid)
    patch_dim = vis_cfg.in_channels * vis_cfg.temporal_patch_size * vis_cfg.patch_size**2
    head_dim = vis_cfg.hidden_size // vis_cfg.num_heads
    args = (
        torch.randn(n, patch_dim),
        torch.randint(0, vis_cfg.num_position_embeddings, (n, 4)),
        torch.rand(n, 4),
        torch.randn(n, head_dim),
        torch.randn(n, head_dim),
    )
    if packed:
        args += (torch.cat([torch.full((t * h * w,), i, dtype=torch.int64) for i, (t, h, w) in enumerate(grid)]),)
    patches = torch.export.Dim("patches", min=4, max=1 << 20)
    dyn = tuple({0: patches} for _ in args)
    ins, outs = vision_io_names(len(vis_cfg.deepstack_visual_indexes), packed=packed)
    return _export(adapter, args, ins, outs, dyn)


def export_decoder_graph(model, logit_positions: bool = True):
    """The KV-cached text decoder: one graph for prefill, chunked prefill and decode; logits for the positions
    the `logit_positions` input names (`logit_positions=False`: the previous form, last position only)."""
    import torch

    from qvl.toolchain.export.adapters import DecoderAdapter

    tc = model.config.text_config
    adapter = DecoderAdapter(model, logit_positions=logit_positions).eval()
    n_ds = len(model.config.vision_config.deepstack_visual_indexes)
    b, s, p = 2, 5, 3  # example sizes; batch 2 keeps the batch axis symbolic
    args = (
        torch.randn(b, s, tc.hidden_size),
        torch.arange(p, p + s)[None, None].expand(3, b, s).contiguous(),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.zeros(n_ds, b, s, tc.hidden_size),
        *(torch.randn(b, tc.num_key_value_heads, p, tc.head_dim) for _ in range(2 * tc.num_hidden_layers)),
    )
    if logit_positions:
        args += (torch.tensor([1, s - 1], dtype=torch.int64),)  # 2 of the 5 positions: the axis stays symbolic
    batch = torch.export.Dim("batch", min=1, max=256)
    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    past = torch.export.Dim("past", min=0, max=1 << 20)
    total = torch.export.Dim("total", min=1, max=1 << 21)
    positions = torch.export.Dim("positions", min=1, max=1 << 20)
    dyn = (
        {0: batch, 1: seq},
        {1: batch, 2: seq},
        {0: batch, 1: total},
        {1: batch, 2: seq},
        (*({0: batch, 2: past} for _ in range(2 * tc.num_hidden_layers)), *([{0: positions}] if logit_positions else [])),
    )
    ins, outs = decoder_io_names(tc.num_hidden_layers, logit_positions)
    graph = _export(adapter, args, ins, outs, dyn)
    embedding = model.model.language_model.embed_tokens.weight.detach().numpy()
    if model.lm_head.weight is model.model.language_model.embed_tokens.weight:
        lm_head_as_gemm(graph, embedding, EMBEDDING_NAME)
    else:
        lm_head_as_gemm(graph, model.lm_head.weight.detach().numpy(), LM_HEAD_NAME)
        set_host_embedding(graph.graph, {"table": host_value(EMBEDDING_NAME, np.ascontiguousarray(embedding))})
    return graph


def lm_head_as_gemm(graph_model, matrix: np.ndarray, name: str) -> None:
    """Replace `MatMul(h, W^T-copy)` feeding `logits` by `Gemm(h2d, W, transB=1)` on the `[vocab, hidden]` W itself,
    an initializer named `name` (`embed_tokens.weight` when tied, `lm_head.weight` when untied)."""
    import onnx_ir as ir

    g = graph_model.graph
    logits = next(o for o in g.outputs if o.name == "logits")
    matmul = logits.producer()
    if matmul is None or matmul.op_type != "MatMul":
        raise RuntimeError(f"unexpected lm_head producer {matmul and matmul.op_type}")
    hidden, weight_t = matmul.inputs
    if weight_t.const_value is None or tuple(weight_t.shape) != matrix.shape[::-1]:
        raise RuntimeError(f"lm_head weight is not the transposed {name}")
    if not np.array_equal(weight_t.const_value.numpy().T, matrix):
        raise RuntimeError(f"lm_head weight differs from {name}")

    head = ir.Value(name=name, shape=ir.Shape(matrix.shape), type=ir.TensorType(ir.DataType.FLOAT))
    head.const_value = ir.tensor(np.ascontiguousarray(matrix), name=name)
    g.register_initializer(head)

    hidden_size = matrix.shape[1]
    tape = ir.tape.Tape(g)
    shape2d = tape.initializer(ir.tensor(np.array([-1, hidden_size], dtype=np.int64), name="lm_head.shape2d"))
    h2d = tape.op("Reshape", [hidden, shape2d])
    logits2d = tape.op("Gemm", [h2d, head], attributes={"transB": 1})
    out_shape = tape.op("Concat", [tape.op("Shape", [hidden], attributes={"end": -1}),
                                    tape.initializer(ir.tensor(np.array([-1], dtype=np.int64), name="lm_head.vocab_dim"))],
                        attributes={"axis": 0})
    new_logits = tape.op("Reshape", [logits2d, out_shape])
    gemm = logits2d.producer()
    gemm.metadata_props["qvl.layer"] = LM_HEAD_LAYER  # passes find the lm_head by this, tied or not
    g.insert_before(matmul, tape.nodes)
    shape, dtype = logits.shape, logits.type
    logits.replace_all_uses_with(new_logits, replace_graph_outputs=True)
    g.remove(matmul, safe=True)
    new_logits.name = "logits"
    new_logits.shape = shape
    new_logits.type = dtype
    if not weight_t.uses():
        g.initializers.pop(weight_t.name)


def model_summary(info: CheckpointInfo) -> dict:
    tc, vc, cfg = info.text_config, info.vision_config, info.config
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    return {
        "model_type": cfg["model_type"],
        "num_layers": tc["num_hidden_layers"],
        "hidden_size": tc["hidden_size"],
        "num_heads": tc["num_attention_heads"],
        "num_kv_heads": tc["num_key_value_heads"],
        "head_dim": tc.get("head_dim", tc["hidden_size"] // tc["num_attention_heads"]),
        "vocab_size": tc["vocab_size"],
        "context_length": tc["max_position_embeddings"],
        "rope_theta": tc.get("rope_theta", rope.get("rope_theta")),
        "mrope_section": rope.get("mrope_section"),
        "num_deepstack": len(vc["deepstack_visual_indexes"]),
        "image_token_id": cfg["image_token_id"],
        "video_token_id": cfg["video_token_id"],
        "vision_start_token_id": cfg["vision_start_token_id"],
        "vision_end_token_id": cfg.get("vision_end_token_id"),
        "vision": {
            "hidden_size": vc["hidden_size"],
            "num_heads": vc["num_heads"],
            "depth": vc["depth"],
            "patch_size": vc["patch_size"],
            "temporal_patch_size": vc["temporal_patch_size"],
            "spatial_merge_size": vc["spatial_merge_size"],
            "num_position_embeddings": vc["num_position_embeddings"],
            "out_hidden_size": vc["out_hidden_size"],
        },
    }


def checkpoint_fingerprint(info: CheckpointInfo) -> str:
    """sha256 over config.json and every weight file (streamed; the 2B checkpoint is ~4.3 GB)."""
    import hashlib

    h = hashlib.sha256()
    for f in (info.path / "config.json", *info.weight_files):
        h.update(f.name.encode())
        h.update(mf.sha256_file(f).encode())
    return h.hexdigest()


def export_artifact(
    checkpoint: Path,
    out: Path,
    overwrite: bool = False,
    step: Callable[[str], None] | None = None,
    packed_vision: bool = False,
    logit_positions: bool = True,
    lora=None,
) -> ExportReport:
    """`packed_vision=True` writes the previous vision form (one call for all images, block-diagonal mask
    from `segment_ids`); `logit_positions=False` the previous decoder form (no `logit_positions` input, last
    position's logits only). Only the compatibility tests ask for them. `lora` (a `lora.LoraAdapter`): merged into
    the loaded weights before export (the checkpoint on disk is untouched) and recorded as the manifest's `adapter`."""
    step = step or (lambda msg: None)
    t0 = time.perf_counter()
    # Config, headers, tensor names/shapes/dtypes, tied lm_head and tokenizer are all checked here,
    # before the (slow) load: from_pretrained would fill missing weights with random numbers. Config,
    # header and tokenizer problems are found before torch/transformers are even imported.
    # A wrong --out (the source itself, nested with it, an existing non-qvl directory) is refused first: it
    # costs nothing, while validating the state dict imports torch. Checked again under the lock below.
    check_output_target(Path(out), overwrite, (Path(checkpoint),))
    info = validate_checkpoint(checkpoint)
    n_params = info.num_parameters
    # The template file transformers' processor would use (recorded as `source.chat_template`, the runtime reads
    # that file) and the decoding defaults `run` / `chat` follow: both checked now, before the slow load.
    template_source = resolve_chat_template(info.path)
    GenerationDefaults.from_dir(info.path)
    if lora is not None:
        lora.check_against(info)  # module names and shapes on the meta device, before the output dir exists

    # the checkpoint is a source: `export CK --out CK --overwrite` must never replace it
    with atomic_output_dir(Path(out), overwrite=overwrite, sources=(info.path,)) as tmp:
        check_free_space(tmp, n_params * 4 + (256 << 20))
        step("hashing checkpoint")
        fingerprint = checkpoint_fingerprint(info)
        step("loading checkpoint (fp32)")
        model = load_fp32_model(info)
        lora_step = None
        if lora is not None:
            step(f"merging LoRA adapter {lora.name}")
            lora_step = lora.merge_into(model)
        timings = {}
        t = time.perf_counter()
        step("exporting vision encoder")
        vision = export_vision_graph(model, packed=packed_vision)
        timings["vision"] = time.perf_counter() - t
        fault_point("export:traced")
        t = time.perf_counter()
        step("exporting decoder")
        decoder = export_decoder_graph(model, logit_positions=logit_positions)
        timings["decoder"] = time.perf_counter() - t
        # the graphs' initializers now hold the only references to the weights (views, folded transposes): each
        # is freed once it is in the store. gc: the traced programs' reference cycles still point at the model.
        del model
        gc.collect()
        step("writing graphs and weight store")
        graphs, store = save_graphs({"vision": vision, "decoder": decoder}, tmp)
        seconds = time.perf_counter() - t0
        write_artifact(
            tmp,
            {
                "target": "export-fp32",
                "source": {"checkpoint": str(info.path.absolute()), "sha256": fingerprint, "config": info.config,
                           "chat_template": template_source.file},
                "model": model_summary(info),
                "graphs": graphs,
                "embedding": embedding_entry(decoder),
                **({"adapter": lora.manifest_section()} if lora is not None else {}),
                "tool_versions": mf.tool_versions(),
                "steps": [
                    {
                        "name": "export",
                        "seconds": round(seconds, 2),
                        "graph_seconds": {k: round(v, 2) for k, v in timings.items()},
                        "opset": OPSET,
                        "ir_version": IR_VERSION,
                        "weight_bytes_written": store.bytes_written,
                        "weight_bytes_deduplicated": store.bytes_deduplicated,
                        **({"lora_merge": lora_step} if lora_step is not None else {}),
                    }
                ],
            },
            side_files_from=info.path,
        )
    return ExportReport(Path(out), seconds, store.bytes_written, store.bytes_deduplicated, graphs)

