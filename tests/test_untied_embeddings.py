"""Untied embeddings and small vocabularies (issue #18 item 1).

An untied checkpoint (`tie_word_embeddings: false`, its own `lm_head.weight`, as the 8B has) goes through every
stage: validation, export (the lm_head Gemm reads `lm_head.weight`; the embedding table is the decoder's host
embedding, in no graph), the cpu fusion passes, int8 / int4 weights (the two matrices quantized separately), the
sm61 engine kits (built with TensorRT-RTX), the runtime and parity against eager transformers. The checkpoint is
the tiny preset with a 96-entry vocabulary, so it is also the small-vocabulary case: with vocab x ceil(hidden /
block) < 256 the quantized embedding's scales are under the weight store's inline-tensor threshold, which crashed
`compile --weights int8|int4` (`embed_tokens.weight.scales is not in the weight store`) for tied checkpoints; the
tied small-vocabulary checkpoint is tested at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli

VOCAB = 96
EMBED = "model.language_model.embed_tokens.weight"


def _checkpoint(out: Path, untied: bool) -> Path:
    """`make-checkpoint --preset tiny --vocab-size 96 [--untied]` (the CLI itself: tests/test_presets.py)."""
    from qvl.toolchain.checkpoints.synthetic import make_checkpoint

    make_checkpoint("tiny", out, untied=untied, vocab_size=VOCAB)
    return out


def _tensors(ckpt: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _decoder_initializers(artifact: Path) -> set[str]:
    model = onnx.load(str(artifact / "decoder.onnx"), load_external_data=False)
    return {t.name for t in model.graph.initializer}


def _lm_head_node(model):
    return next(n for n in model.graph if n.metadata_props.get("qvl.layer") == "decoder.lm_head")


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> dict:
    """The untied small-vocabulary checkpoint, its export and its cpu compile."""
    from qvl.toolchain.compile.pipeline import compile_artifact
    from qvl.toolchain.export.exporter import export_artifact

    root = tmp_path_factory.mktemp("untied")
    ckpt = _checkpoint(root / "ckpt", untied=True)
    export_artifact(ckpt, root / "export")
    compile_artifact(root / "export", "cpu", root / "cpu")
    return {"ckpt": ckpt, "export": root / "export", "cpu": root / "cpu", "root": root}


def test_untied_checkpoint_exports_two_matrices(untied):
    from qvl.artifacts import manifest as mf
    from qvl.artifacts.weight_store import map_embedding
    from qvl.artifacts.writer import load_graphs

    ck = _tensors(untied["ckpt"])
    assert not np.array_equal(ck["lm_head.weight"], ck[EMBED])
    for art in (untied["export"], untied["cpu"]):
        names = _decoder_initializers(art)
        assert "lm_head.weight" in names and "embed_tokens.weight" not in names  # the table is in no graph
        m = mf.read_manifest(art)
        assert m.embedding.initializer == "embed_tokens.weight" and not m.embedding.quantized
        assert np.array_equal(map_embedding(m), ck[EMBED])  # the runtime's lookup table: the embedding, bit for bit
    decoder = load_graphs(mf.read_manifest(untied["cpu"]))["decoder"]
    head = _lm_head_node(decoder)
    assert head.op_type == "Gemm" and head.inputs[1].name == "lm_head.weight"
    assert np.array_equal(head.inputs[1].const_value.numpy(), ck["lm_head.weight"])


def test_untied_fp32_parity_cli(untied):
    proc = run_cli("parity", str(untied["cpu"]), "--checkpoint", str(untied["ckpt"]), "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and all(c["greedy_identical"] for c in report["cases"])


@pytest.mark.parametrize("bits", [8, 4])
def test_untied_int_weights_quantize_lm_head_and_table_separately(untied, bits):
    from qvl.artifacts import manifest as mf
    from qvl.artifacts.writer import load_graphs
    from qvl.passes.precision import dequantize, quantize_blockwise
    from qvl.runtime.quantized_embedding import QuantizedEmbedding
    from qvl.toolchain.compile.pipeline import compile_with_precision

    out = untied["root"] / f"int{bits}"
    compile_with_precision(untied["export"], "cpu", out, weights=f"int{bits}")  # no budget: every layer quantized
    m = mf.read_manifest(out)
    layers = m.precision["layers"]
    assert layers["decoder.lm_head"]["decision"] == layers["decoder.embed_tokens"]["decision"] == f"int{bits}"
    emb = m.embedding
    assert emb.quantized and emb.bits == bits and emb.initializer == "embed_tokens.weight.q"
    # the embedding parts are in the store even though the scales (96 x 2 floats) are under the inline threshold
    assert emb.scales.shape == (VOCAB * 64 // emb.block_size,) and emb.scales.offset > 0
    ck = _tensors(untied["ckpt"])
    table = dequantize(quantize_blockwise(ck[EMBED], bits, emb.block_size, True))
    ids = np.arange(VOCAB)
    assert np.array_equal(QuantizedEmbedding.from_manifest(out, emb)[ids], table)  # the table's own codes
    head = _lm_head_node(load_graphs(m)["decoder"])
    assert head.op_type == "MatMulNBits" and head.inputs[1].name == "lm_head.weight.q"
    own = quantize_blockwise(ck["lm_head.weight"], bits, emb.block_size, True)
    assert np.array_equal(head.inputs[1].const_value.numpy(), own.packed)  # the lm_head's own codes
    names = _decoder_initializers(out)
    assert not any(n.startswith("embed_tokens.weight") for n in names)  # the quantized table is in no graph either
    proc = run_cli("run", str(out), "--prompt", "what is this", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def test_budget_rollback_keeps_the_untied_table_fp32_alone(untied):
    """`keep_fp32` (what the accuracy budget rolls back) names the table and the lm_head separately."""
    from qvl.artifacts import manifest as mf
    from qvl.artifacts.weight_store import map_embedding
    from qvl.passes.precision import PrecisionConfig
    from qvl.toolchain.compile.targets import get_target
    from qvl.toolchain.quant.accuracy_budget import quantize_artifact

    ck = _tensors(untied["ckpt"])
    out = untied["root"] / "keep-table"
    record = quantize_artifact(untied["cpu"], out, PrecisionConfig(weight_bits=8, keep_fp32={"decoder.embed_tokens"}),
                               get_target("cpu"))
    assert record["layers"]["decoder.embed_tokens"]["decision"] == "fp32"
    assert record["layers"]["decoder.lm_head"]["decision"] == "int8"
    m = mf.read_manifest(out)
    assert not m.embedding.quantized
    assert np.array_equal(map_embedding(m), ck[EMBED])
    assert "lm_head.weight.q" in _decoder_initializers(out)


def test_untied_sm61_kits_build_with_tensorrt_rtx(untied):
    from qvl.artifacts import manifest as mf
    from qvl.artifacts.weight_store import map_embedding
    from qvl.errors import QvlError
    from qvl.toolchain.eval.parity import run_parity
    from qvl.toolchain.tensorrt.build import build_engine_command, load_tensorrt
    from qvl.toolchain.tensorrt.command import kit_command

    kit = untied["root"] / "kit"
    kit_command(untied["export"], "sm61", kit, echo=lambda m: None)
    m = mf.read_manifest(kit)
    footprint = json.loads((kit / "manifest.json").read_text())["kit"]["memory_fit"]["footprint"]
    assert footprint["lm_head_bytes"] == VOCAB * 64 * 4  # lm_head.weight on the GPU; the table stays on the host
    assert "lm_head.weight" in _decoder_initializers(kit) and not m.embedding.quantized
    report = run_parity(kit, untied["ckpt"], untied["root"] / "kit-parity", steps=2, threads=1)
    assert report.passed, [(c.name, c.max_abs_logit_diff) for c in report.cases]

    kit8 = untied["root"] / "kit8"
    kit_command(untied["export"], "sm61", kit8, echo=lambda m: None, weights="int8")
    m8 = mf.read_manifest(kit8)
    assert m8.precision["layers"]["decoder.lm_head"]["decision"] == "int8"
    assert np.array_equal(map_embedding(m8), _tensors(untied["ckpt"])[EMBED])  # the host table stays fp32
    # sm75+ stores pre-quantized int8 codes: a tied lm_head must stay fp32 there (the host table reads it), an untied
    # one is an ordinary linear layer and is quantized
    kit75 = untied["root"] / "kit75"
    kit_command(untied["export"], "sm75+", kit75, echo=lambda m: None, weights="int8")
    m75 = mf.read_manifest(kit75)
    assert m75.precision["layers"]["decoder.lm_head"]["decision"] == "int8"
    assert np.array_equal(map_embedding(m75), _tensors(untied["ckpt"])[EMBED])
    try:
        load_tensorrt("tensorrt-rtx")
    except QvlError as exc:
        pytest.skip(f"TensorRT-RTX wheels not importable ({exc})")
    built = build_engine_command(kit, untied["root"] / "engines", allow_target_mismatch=True, echo=lambda m: None)
    assert set(built.engines) == {"vision", "decoder"} and all(e["bytes"] > 0 for e in built.engines.values())


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_untied_quantized_parity_cli(untied, weights):
    """`compile --weights int8|int4` with the accuracy budget at full greedy agreement, then `parity` with
    tolerances for quantized weights exits 0 (~50 s per compile on 2 cores: the per-layer budget search)."""
    out = untied["root"] / f"budget-{weights}"
    proc = run_cli("compile", str(untied["export"]), "--target", "cpu", "--weights", weights, "--min-agreement", "1.0",
                   "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("parity", str(out), "--checkpoint", str(untied["ckpt"]), "--steps", "16", "--logit-tol", "10",
                   "--vision-tol", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# -- small vocabulary, tied: the inline-scales crash ------------------------------------------------------------


def test_weight_store_keeps_small_tensors_the_runtime_maps(tmp_path):
    """Tiny constants stay inline in the graph, except the ones named `always` (the embedding entry's parts)."""
    import onnx_ir as ir

    from qvl.artifacts.weight_store import SMALL_TENSOR_BYTES, WeightStoreWriter, externalize_initializers
    from qvl.passes.linear_sites import add_initializer

    graph = ir.Graph([], [], nodes=[], name="g")
    small = np.arange(SMALL_TENSOR_BYTES // 8, dtype=np.float32)
    for name in ("a.scales", "b.scales"):
        add_initializer(graph, name, small)
    model = ir.Model(graph, ir_version=10)
    with WeightStoreWriter(tmp_path / "weights.bin") as store:
        externalize_initializers(model, store, "weights.bin", always={"a.scales"})
    assert isinstance(graph.initializers["a.scales"].const_value, ir.ExternalTensor)
    assert not isinstance(graph.initializers["b.scales"].const_value, ir.ExternalTensor)


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_small_vocab_lm_head_scales_go_to_the_store(tmp_path, bits):
    """The writer's side of the crash, on a tied lm_head `Gemm(h, embed_tokens.weight, transB=1)` of vocab 96: the
    precision pass's scales (192 floats, 768 bytes) are under the inline threshold, yet the manifest's embedding
    entry must point into the store."""
    import onnx_ir as ir

    from qvl.artifacts.schema import Embedding
    from qvl.artifacts.weight_store import SMALL_TENSOR_BYTES
    from qvl.artifacts.writer import embedding_entry, save_graphs
    from qvl.passes.linear_sites import add_initializer
    from qvl.passes.precision import PrecisionConfig, PrecisionPass, dequantize, quantize_blockwise
    from qvl.runtime.quantized_embedding import QuantizedEmbedding
    from qvl.toolchain.compile.targets import get_target

    table = np.random.default_rng(0).standard_normal((VOCAB, 64)).astype(np.float32)
    h = ir.Value(name="h", shape=ir.Shape([1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([h], [], nodes=[], name="decoder", opset_imports={"": 20})
    emb = add_initializer(graph, "embed_tokens.weight", table)
    gemm = ir.Node("", "Gemm", [h, emb], attributes=[ir.AttrInt64("transB", 1)], name="lm_head",
                   metadata_props={"qvl.layer": "decoder.lm_head"})
    graph.append(gemm)
    gemm.outputs[0].name = "logits"
    gemm.outputs[0].shape, gemm.outputs[0].type = ir.Shape([1, VOCAB]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(gemm.outputs[0])
    decoder = ir.Model(graph, ir_version=10)
    PrecisionPass(PrecisionConfig(weight_bits=bits), target=get_target("cpu"), graph="decoder")(decoder)
    scales = next(n for n in graph if n.op_type == "MatMulNBits").inputs[2]
    assert scales.name == "embed_tokens.weight.scales" and scales.const_value.nbytes < SMALL_TENSOR_BYTES
    save_graphs({"decoder": decoder}, tmp_path)
    entry = embedding_entry(decoder)  # raised "... is not in the weight store" before
    assert entry["scales"]["shape"] == [VOCAB * 2]
    rows = QuantizedEmbedding.from_manifest(tmp_path, Embedding.from_json(entry))[np.arange(VOCAB)]
    assert np.array_equal(rows, dequantize(quantize_blockwise(table, bits, 32, True)))


@pytest.mark.slow
def test_small_vocab_tied_checkpoint_compiles_int8_and_int4(tmp_path):
    """The reproduction end to end (an export of its own: slow): vocab 96 x (64 / 32) = 192 scales < 256, the
    lm_head's scales are also the embedding's."""
    from qvl.artifacts import manifest as mf
    from qvl.runtime.model import Model
    from qvl.toolchain.compile.pipeline import compile_with_precision
    from qvl.toolchain.export.exporter import export_artifact

    ckpt = _checkpoint(tmp_path / "ckpt", untied=False)
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    art = tmp_path / "export"
    export_artifact(ckpt, art)
    out8 = tmp_path / "int8"
    proc = run_cli("compile", str(art), "--target", "cpu", "--weights", "int8", "--no-budget", "--out", str(out8))
    assert proc.returncode == 0, proc.stderr  # was: embed_tokens.weight.scales is not in the weight store
    proc = run_cli("run", str(out8), "--prompt", "what is this", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out4 = tmp_path / "int4"
    compile_with_precision(art, "cpu", out4, weights="int4")
    for out in (out8, out4):
        emb = mf.read_manifest(out).embedding
        assert emb.quantized and emb.initializer == "embed_tokens.weight.q"
        assert emb.scales.shape == (VOCAB * 64 // emb.block_size,) and emb.scales.shape[0] * 4 < 1024
    model = Model(out4, threads=1)
    prompt = model.prepare([{"role": "user", "content": [{"type": "text", "text": "what is this"}]}])
    assert 1 <= len(list(model.generate_ids(prompt, 4))) <= 4  # may stop early at <|im_end|>
