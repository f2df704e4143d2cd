"""ORT's optimized graphs saved in CPU artifacts (toolchain/compile/ort_optimize.py) and used by the runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qvl.errors import QvlError
from qvl.runtime import load


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_cpu_artifact_carries_optimized_graphs_sharing_the_weight_store(tiny_cpu_artifact):
    manifest = json.loads((tiny_cpu_artifact / "manifest.json").read_text())
    section = manifest["ort_optimized"]
    assert section["onnxruntime"] == ort.__version__ and section["level"] == "extended"
    assert set(section["graphs"]) == set(manifest["graphs"]) and section["not_optimized"] == {}
    for name, entry in section["graphs"].items():
        model = onnx.load(str(tiny_cpu_artifact / entry["file"]), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}, locations  # no second copy of the weights
        assert entry["shared_initializers"] > 0
        plain = onnx.load(str(tiny_cpu_artifact / manifest["graphs"][name]["file"]), load_external_data=False)
        assert len(model.graph.node) < len(plain.graph.node)  # ORT's fusions are in the saved graph
    # nothing else was written beside the graphs (ORT's own side file is not kept)
    assert not list(tiny_cpu_artifact.glob("*.data"))


def test_runtime_uses_them_and_answers_like_the_plain_graphs(tiny_cpu_artifact, tmp_path):
    optimized = load(tiny_cpu_artifact)
    assert optimized.engine.optimized_graphs
    plain_dir = _copy(tiny_cpu_artifact, tmp_path / "plain")
    manifest = json.loads((plain_dir / "manifest.json").read_text())
    manifest["ort_optimized"]["onnxruntime"] = "0.0.0"  # another ORT wrote them: the runtime must not use them
    (plain_dir / "manifest.json").write_text(json.dumps(manifest))
    plain = load(plain_dir)
    assert not plain.engine.optimized_graphs
    messages = [{"role": "user", "content": [{"type": "text", "text": "Count to five."}]}]
    a = [t for t, _ in optimized.generate_ids(optimized.prepare(messages), 12, ignore_stop=True)]
    b = [t for t, _ in plain.generate_ids(plain.prepare(messages), 12, ignore_stop=True)]
    assert a == b
    cache_a, cache_b = optimized.engine.new_cache(8), plain.engine.new_cache(8)
    x = optimized.engine.embed(np.array([[1, 2, 3]]))
    pos = np.broadcast_to(np.arange(3), (3, 1, 3)).copy()
    np.testing.assert_allclose(optimized.engine.step(cache_a, x, pos), plain.engine.step(cache_b, x, pos),
                               rtol=0, atol=1e-5)


def test_modified_optimized_graph_is_refused(tiny_cpu_artifact, tmp_path):
    art = _copy(tiny_cpu_artifact, tmp_path / "art")
    path = art / "decoder.ort.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(QvlError, match="decoder.ort.onnx does not match its manifest hash"):
        load(art)
