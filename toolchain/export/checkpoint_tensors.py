"""Check a checkpoint's tensor names, shapes and dtypes against its config before any weight is loaded.

transformers' `from_pretrained` initialises every parameter the checkpoint lacks with random numbers
and only logs a warning, so an incomplete checkpoint (one `down_proj` short, no final norm) would
export with exit 0 and ship random weights. The expected state dict is derived exactly from the config:
transformers' own `Qwen3VLForConditionalGeneration` built on the meta device (no memory, ~50 ms at 2B
size), and checkpoint keys are renamed with transformers' own load-time key conversions, so what
passes here is what `from_pretrained` would load with no missing, unexpected or mismatched keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from qvl.errors import QvlError
from qvl.toolchain.export.safetensors_header import TensorEntry

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # transformers casts between these on load; nothing else is a weight
_SHOWN = 3  # names listed per problem kind; the rest are counted


@dataclass(frozen=True)
class ExpectedTensors:
    shapes: dict[str, tuple[int, ...]]  # parameter name (model.state_dict()) -> shape
    tied: bool  # lm_head.weight is the embedding (transformers' reading of tie_word_embeddings)
    rename: Callable[[str], str]  # checkpoint key -> parameter name, as from_pretrained renames it

    @property
    def optional(self) -> set[str]:
        # A tied checkpoint may still store lm_head.weight (transformers re-ties it); published ones omit it.
        return {"lm_head.weight"} if self.tied else set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _key_renamer(model) -> Callable[[str], str]:
    """transformers' checkpoint-key conversion for this model (legacy renames, base-model prefix)."""
    meta = model.state_dict()
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers 5.x without these internals: published names are the parameter names
        return lambda key: key if key in meta or f"{prefix}.{key}" not in meta else f"{prefix}.{key}"

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(key: str) -> str:
        # Mirrors convert_and_load_state_dict_in_model: rename, else keep the key and fix only the prefix.
        renamed, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, _ = rename_source_key(key, [], [], prefix, meta)
        return renamed

    return rename


def expected_tensors(config: dict, where: str = "config.json") -> ExpectedTensors:
    """Build the model on the meta device from a (schema-validated) config dict."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    try:
        cfg = Qwen3VLConfig.from_dict(dict(config))
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(cfg)
    except Exception as exc:  # transformers' own config/model validation: any failure is the config's fault
        raise QvlError(f"transformers cannot build a Qwen3-VL model from {where}: {_first_line(exc)}") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return ExpectedTensors(shapes=shapes, tied=bool(cfg.tie_word_embeddings), rename=_key_renamer(model))


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def check_tensors(actual: Mapping[str, TensorEntry], expected: ExpectedTensors, where: str) -> None:
    """One QvlError listing missing, unexpected, wrong-shape and wrong-dtype tensors (first few + counts)."""
    found: dict[str, str] = {}  # parameter name -> checkpoint key
    unexpected, duplicate, wrong_shape, wrong_dtype = [], [], [], []
    for key in sorted(actual):
        name = expected.rename(key)
        entry = actual[key]
        if name not in expected.shapes:
            unexpected.append(key)
            continue
        if name in found:
            duplicate.append(f"{key} (also {found[name]})")
            continue
        found[name] = key
        if entry.shape != expected.shapes[name]:
            wrong_shape.append(f"{key} {list(entry.shape)} (expected {list(expected.shapes[name])})")
        if entry.dtype not in FLOAT_DTYPES:
            wrong_dtype.append(f"{key} {entry.dtype}")
    missing = sorted(set(expected.shapes) - set(found) - expected.optional)

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
    if duplicate:
        problems.append(f"{len(duplicate)} duplicated: {_listed(duplicate)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape: {_listed(wrong_shape)}")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} not floating point ({'/'.join(FLOAT_DTYPES)}): {_listed(wrong_dtype)}")
    if problems:
        raise QvlError(
            f"checkpoint tensors do not match {where}: " + "; ".join(problems),
            hint="the weights and config.json must describe the same model; re-download or re-convert the checkpoint"
            " (transformers would fill missing weights with random numbers)",
        )
