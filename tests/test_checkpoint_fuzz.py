"""Property-based fuzzing of the checkpoint validators: any input is a `QvlError` or a success.

The validators are called directly (the CLI matrix is in test_checkpoint_validation.py). Example
counts are bounded so the whole file stays well under 30 s on a loaded 2-core machine.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvl.errors import QvlError
from qvl.toolchain.export.checkpoint_schema import validate_config
from qvl.toolchain.checkpoints.presets import PRESETS
from qvl.toolchain.export.safetensors_header import parse_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Values near the real ones are the interesting ones for a config: small ints, off-by-one, zero, negative.
config_values = json_values | st.integers(min_value=-3, max_value=300) | st.lists(st.integers(-2, 40), max_size=4)


def _accepts_or_qvl_error(fn, *args) -> bool:
    try:
        fn(*args)
    except QvlError as exc:
        assert str(exc) and "\n" not in str(exc)
        return False
    return True


def _paths(node, prefix=()):
    """Every (key path) of a nested config dict, including nested sections themselves."""
    for k, v in node.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


BASE_CONFIGS = [PRESETS["tiny"].config, PRESETS["2b"].config]
CONFIG_PATHS = sorted({p for c in BASE_CONFIGS for p in _paths(c)})


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(draw(st.sampled_from(BASE_CONFIGS)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CONFIG_PATHS))
        node = cfg
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # an earlier mutation replaced the section
        if draw(st.booleans()) and path[-1] in node:
            del node[path[-1]]
        else:
            node[path[-1]] = draw(config_values)
    return cfg


@FUZZ
@given(json_values)
def test_config_validator_on_arbitrary_json(value):
    _accepts_or_qvl_error(validate_config, value)


@FUZZ
@given(mutated_configs())
def test_config_validator_on_mutated_configs(cfg):
    _accepts_or_qvl_error(validate_config, cfg)


@settings(max_examples=40, deadline=None)
@given(mutated_configs())
def test_configs_that_validate_build_on_the_meta_device(cfg):
    """What the schema admits, transformers can build (or refuses as a QvlError): never a traceback."""
    from qvl.toolchain.export.checkpoint_tensors import expected_tensors

    if _accepts_or_qvl_error(validate_config, cfg):
        _accepts_or_qvl_error(expected_tensors, cfg)


# -- safetensors headers -------------------------------------------------------------------------------


def _valid_file() -> bytes:
    from safetensors.numpy import save

    return save(
        {"a.weight": np.ones((2, 3), np.float32), "b.bias": np.zeros(4, np.float16), "c": np.arange(3, dtype=np.int64)},
        metadata={"format": "pt"},
    )


VALID = _valid_file()
(_N,) = struct.unpack("<Q", VALID[:8])
VALID_HEADER = json.loads(VALID[8 : 8 + _N])
VALID_BODY = VALID[8 + _N :]
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
header_values = config_values | st.sampled_from(["F32", "F16", "BF16", "I64", "F17", ""]) | st.lists(
    st.integers(-1, 64), min_size=0, max_size=3
)


def _check_file(data: bytes) -> None:
    """Our verdict on a whole file; when we accept it, the safetensors library must load it too."""
    if _accepts_or_qvl_error(parse_header, data, len(data), "fuzz.safetensors"):
        import safetensors

        safetensors.deserialize(data)


@st.composite
def mutated_files(draw):
    header = copy.deepcopy(VALID_HEADER)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(header) + ["new.tensor"]))
        entry = header.get(name)
        if not isinstance(entry, dict) or draw(st.integers(0, 4)) == 0:
            header[name] = draw(header_values)  # whole entry / metadata replaced
        elif draw(st.booleans()):
            entry.pop(draw(st.sampled_from(TENSOR_FIELDS)), None)
        else:
            entry[draw(st.sampled_from(TENSOR_FIELDS))] = draw(header_values)
    raw = json.dumps(header).encode()
    # Mostly the true length (so the JSON is what gets fuzzed), sometimes a wrong or absurd one.
    exact = st.just(len(raw))
    length = draw(st.one_of(exact, exact, exact, st.integers(0, len(raw) + 64), st.integers(0, (1 << 64) - 1)))
    body = draw(st.sampled_from([VALID_BODY] * 4 + [VALID_BODY[:-1], VALID_BODY + b"\0", b""]))
    return struct.pack("<Q", length) + raw + body


@FUZZ
@given(st.binary(max_size=256))
def test_header_parser_on_arbitrary_bytes(data):
    _check_file(data)


@FUZZ
@given(st.binary(max_size=64))
def test_header_parser_on_arbitrary_json_bytes(payload):
    # A plausible length prefix, so the bytes reach the JSON decoder instead of failing the length check.
    _check_file(struct.pack("<Q", len(payload)) + payload)


@FUZZ
@given(mutated_files())
def test_header_parser_on_mutated_headers(data):
    _check_file(data)


def test_header_parser_accepts_the_valid_file():
    header = parse_header(VALID, len(VALID), "ok.safetensors")
    assert set(header.tensors) == {"a.weight", "b.bias", "c"} and header.metadata == {"format": "pt"}
    assert header.file_size == len(VALID)


@pytest.mark.parametrize("cut", [0, 7, 8, 8 + _N - 1, len(VALID) - 1])
def test_header_parser_on_every_truncation_point(cut):
    with pytest.raises(QvlError):
        parse_header(VALID[:cut], cut, "cut.safetensors")


@pytest.mark.parametrize("model_type", [[0], "qwen2_vl", None])
def test_the_schema_refuses_a_top_level_model_type_other_than_qwen3_vl(model_type):
    # found by test_configs_that_validate_build_on_the_meta_device: a list there passed the schema and crashed
    # transformers' conversion mapping (it hashes the model type)
    cfg = copy.deepcopy(PRESETS["tiny"].config)
    cfg["model_type"] = model_type
    with pytest.raises(QvlError, match="model_type must be 'qwen3_vl'"):
        validate_config(cfg)
