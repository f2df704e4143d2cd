"""Export's memory: the checkpoint read tensor by tensor into the same fp32 model, every weight freed once it is in
the store, and the store written from the tensors' own memory (issue #18: the 2B export peaked at ~1.85x its fp32
weights). No RSS is measured here; these check the properties that bound it."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest


def _bf16_sharded_copy(src, dst):
    """`src` (the tiny fp32 checkpoint) as a 2B-like one: bf16 weights in two shards with an index."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map, total = {}, 0
    for fname, part in shards.items():
        save_file({n: tensors[n].to(torch.bfloat16).contiguous() for n in part}, str(dst / fname),
                  metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * 2
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


def _state(model) -> dict:
    return {**{f"param:{k}": v for k, v in model.named_parameters(remove_duplicate=False)},
            **{f"buffer:{k}": v for k, v in model.named_buffers(remove_duplicate=False)}}


def test_load_fp32_model_is_from_pretrained(tiny_checkpoint, tmp_path):
    """The per-tensor (pread) load gives transformers' own fp32 model bit for bit -- parameters, non-persistent
    buffers (rotary tables), the tied lm_head -- on bf16 shards like the published checkpoints."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from qvl.toolchain.export.checkpoint_io import validate_checkpoint
    from qvl.toolchain.export.exporter import load_fp32_model

    ckpt = _bf16_sharded_copy(tiny_checkpoint, tmp_path / "bf16")
    ours = load_fp32_model(validate_checkpoint(ckpt))
    ref = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    a, b = _state(ours), _state(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    assert {v.dtype for k, v in a.items() if k.startswith("param:")} == {torch.float32}
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert not ours.training


def test_saved_graphs_hold_no_model_weights(tiny_checkpoint, tmp_path):
    """Once the traced graphs are written, nothing alive still points into the torch model's weights: each is freed
    as it goes into the store (onnx-ir's graph inputs used to keep every lifted parameter referenced)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    from qvl.artifacts.weight_store import SMALL_TENSOR_BYTES
    from qvl.artifacts.writer import save_graphs
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint
    from qvl.toolchain.export.exporter import export_decoder_graph, export_vision_graph, load_fp32_model

    model = load_fp32_model(validate_checkpoint(tiny_checkpoint))
    # constants under SMALL_TENSOR_BYTES stay inline in the graph (a tiny model's norm weights): still referenced
    weights = {p.untyped_storage().data_ptr() for p in model.parameters() if p.nbytes >= SMALL_TENSOR_BYTES}
    graphs = {"vision": export_vision_graph(model), "decoder": export_decoder_graph(model)}
    del model
    gc.collect()

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type == "cpu"
                   and o.untyped_storage().data_ptr() in weights)

    assert alive() > 0  # the graphs' initializers are views of the weights until they are written
    save_graphs(graphs, tmp_path)
    assert alive() == 0


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(4, 6),
    np.arange(6, dtype=np.int64),
    np.array(2.5, dtype=np.float32),
    np.array([True, False, True]),
], ids=["f32", "i64", "scalar", "bool"])
def test_tensor_bytes_is_tobytes_without_a_copy(array):
    import onnx_ir as ir

    from qvl.artifacts.weight_store import tensor_bytes

    tensor = ir.tensor(array)
    data = tensor_bytes(tensor)
    assert bytes(data) == tensor.tobytes()
    assert isinstance(data, memoryview) and np.shares_memory(np.frombuffer(data, dtype=np.uint8), array)


def test_tensor_bytes_copies_what_is_not_its_memory():
    """Strided views (the exporter's folded transposes), packed 4-bit types and torch-backed tensors serialize
    through `tobytes()`."""
    import onnx_ir as ir
    import torch
    from torch.onnx._internal.exporter._core import TorchTensor

    from qvl.artifacts.weight_store import tensor_bytes

    cases = [ir.tensor(np.arange(24, dtype=np.float32).reshape(4, 6).T),
             ir.tensor(np.array([1, -2, 3, 4, -8, 7], dtype=np.int8), dtype=ir.DataType.INT4),
             TorchTensor(torch.arange(6, dtype=torch.bfloat16))]
    for tensor in cases:
        data = tensor_bytes(tensor)
        assert isinstance(data, bytes) and data == tensor.tobytes()
