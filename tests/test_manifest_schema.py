"""Issue #13: the typed, versioned manifest (`artifacts/schema.py`) reads back exactly what every writer wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


def _round_trip(art: Path):
    from qvl.artifacts.manifest import read_manifest
    from qvl.artifacts.schema import Manifest

    m = read_manifest(art)
    on_disk = json.loads((art / "manifest.json").read_text())
    assert isinstance(m, Manifest) and m.to_json() == on_disk
    assert Manifest.from_json(m.to_json(), art) == m
    return m


@pytest.fixture(scope="module")
def int8_artifact(tiny_cpu_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "q"
    proc = run_cli("compile", str(tiny_cpu_artifact), "--target", "cpu", "--weights", "int8", "--no-budget",
                   "--out", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def sm61_kit(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "kit"
    proc = run_cli("compile", str(tiny_checkpoint), "--target", "sm61", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_round_trips(tiny_artifact):
    m = _round_trip(tiny_artifact)
    assert m.format_version == 1 and m.kit is None and m.kv_mode == "concat" and not m.embedding.quantized
    assert m.graphs["decoder"].input_names[:2] == ["inputs_embeds", "position_ids"]
    assert m.model.spatial_merge_size == m.source.vision_config["spatial_merge_size"]


def test_cpu_compiled_round_trips(tiny_cpu_artifact):
    m = _round_trip(tiny_cpu_artifact)
    assert m.kv_mode == "shared" and m.ort_optimized is not None and set(m.ort_optimized.graphs) == set(m.graphs)


def test_int8_round_trips(int8_artifact):
    m = _round_trip(int8_artifact)
    assert m.embedding.quantized and m.embedding.packed is not None and m.precision["config"]["weight_bits"] == 8


def test_sm61_kit_round_trips(sm61_kit):
    from qvl.runtime.backends.tensorrt import DecoderLimits

    m = _round_trip(sm61_kit)
    assert m.kit is not None and m.kit.is_trt_kit and m.kit.target == "sm61" and m.int8_kit is False
    assert DecoderLimits.from_kit(m.kit) == DecoderLimits.from_kit(m.to_json()["kit"])
    assert [p["name"] for p in m.kit.graphs["decoder"].profiles] == ["prefill", "decode"]


def test_writer_refuses_a_manifest_readers_would_refuse(tmp_path, tiny_artifact):
    import shutil

    from qvl.artifacts.manifest import read_manifest, write_manifest
    from qvl.errors import QvlError

    art = tmp_path / "a"
    shutil.copytree(tiny_artifact, art)
    fields = read_manifest(art).derive()
    fields["model"] = {**fields["model"], "num_layers": "4"}
    with pytest.raises(QvlError, match="model.num_layers"):
        write_manifest(art, fields)
    assert read_manifest(art).model.num_layers == 4  # the good manifest was not replaced
