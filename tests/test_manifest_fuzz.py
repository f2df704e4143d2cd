"""Property-based fuzzing of `read_manifest` (issue #12): whatever manifest.json holds, reading it either succeeds
or raises a one-line QvlError -- never another exception. Bounded: ~200 examples per property, a few seconds."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvl.errors import QvlError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=20)
hostile = st.sampled_from([
    "../outside/decoder.onnx", "/etc/passwd", "..", ".", "", "a/../../b", "C:\\x\\weights.bin", "\\\\server\\share",
    "weights.bin/", "./weights.bin", "manifest.json", "decoder.onnx", "\ud800", "x\x00y", 10**30, -1, 2**63, 1e308,
    float("nan"), float("inf"), True, [], {}, [1, 2], {"file": "weights.bin"}, "0" * 64, "f" * 64,
])


@pytest.fixture(scope="module")
def fuzz_dir(tiny_cpu_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(tiny_cpu_artifact, d)
    old = os.environ.get("QVL_CACHE")
    os.environ["QVL_CACHE"] = str(d.parent / "cache")
    yield d, json.loads((d / "manifest.json").read_text())
    if old is None:
        os.environ.pop("QVL_CACHE", None)
    else:
        os.environ["QVL_CACHE"] = old


def _read(d, text: str) -> None:
    from qvl.artifacts.manifest import read_manifest

    (d / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        read_manifest(d)
    except QvlError as exc:
        assert "\n" not in str(exc)


def _paths(node, prefix=()):
    """Every key path into a JSON tree (the root excluded)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _mutate(doc, path, op, value):
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "drop":
        del parent[key]
    elif op == "retype":
        old = parent[key]
        parent[key] = [old] if not isinstance(old, list) else {"0": old}
    else:
        parent[key] = value


@FUZZ
@given(doc=json_values)
def test_arbitrary_json(fuzz_dir, doc):
    d, _ = fuzz_dir
    _read(d, json.dumps(doc))


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["graphs", "weights", "model", "embedding", "source", "side_files",
                                            "ort_optimized", "kit", "decoder"]), json_values, max_size=9))
def test_right_header_arbitrary_sections(fuzz_dir, doc):
    d, _ = fuzz_dir
    _read(d, json.dumps({"format": "qvl-artifact", "format_version": 1, **doc}))


@FUZZ
@given(data=st.data())
def test_mutated_real_manifest(fuzz_dir, data):
    d, real = fuzz_dir
    doc = copy.deepcopy(real)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["drop", "retype", "hostile", "value"]))
        value = data.draw(hostile if op == "hostile" else json_values) if op in ("hostile", "value") else None
        _mutate(doc, path, op, value)
    _read(d, json.dumps(doc))


def test_real_manifest_still_reads(fuzz_dir):
    from qvl.artifacts.manifest import read_manifest

    d, real = fuzz_dir
    (d / "manifest.json").write_text(json.dumps(real))
    assert read_manifest(d).to_json()["model"] == real["model"]


@pytest.mark.parametrize("text", ["", "[" * 100000, "\xff\xfe", "1e999999", "9" * 5000, '{"format": "qvl-artifact"}'])
def test_pathological_text(fuzz_dir, text):
    _read(fuzz_dir[0], text)
