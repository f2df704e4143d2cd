"""PEFT LoRA adapters merged into a checkpoint's weights before export (`compile SRC --lora DIR [--lora-scale S]`).

An adapter directory as PEFT's `save_pretrained` writes it: `adapter_config.json` + `adapter_model.safetensors`
(pickles -- `adapter_model.bin` -- are refused, like pickle checkpoints). For every adapted linear layer
`W += S * (alpha / r) * (B @ A)` in fp32 on the loaded model (`alpha / sqrt(r)` with `use_rslora`; per-module `r`
and `alpha` from `rank_pattern` / `alpha_pattern`, matched as PEFT matches them), so the checkpoint on disk is never
touched and the export sees an ordinary fp32 model.

Everything that can be wrong with an adapter is a one-line `QvlError` before any export work:

* `LoraAdapter.load` (no torch): the directory and its files; the config (a JSON object, `peft_type` "LORA",
  `r` / `lora_alpha`, patterns that compile); the features it refuses (`REFUSED`: DoRA, `modules_to_save`,
  trainable tokens, LoRA biases, ... -- anything that is not a plain low-rank delta of a linear weight, or whose
  weights only make sense on a base PEFT changed at init: PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA); the safetensors
  header; every tensor a `lora_A` / `lora_B` pair of one module (nothing else: an embedding LoRA, a DoRA magnitude,
  a saved module are named and refused), its rank the config's;
* `check_against(checkpoint)`: every adapted module is a linear layer of the checkpoint's model (transformers'
  Qwen3-VL built on the meta device: names, `nn.Linear`, `[out, in]` against `B @ A`), every `target_modules` name
  matches some module, no LoRA on a tied lm_head (it is the embedding table too).

The manifest records the adapter (`manifest_section`: kind, digest of the two files, scale, ranks, target modules,
how many text and vision modules were merged) so `parity` can run the oracle with the same adapter through PEFT
itself (`peft_merged`: `PeftModel.from_pretrained` + `merge_and_unload`), refusing an adapter directory whose
digest is not the recorded one (`adapter_for_artifact`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from qvl.errors import QvlError
from qvl.toolchain.export.safetensors_header import TensorEntry, parse_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module>.lora_A.weight
VISION_PREFIX = "model.visual."
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_DIGEST_TAG = "qvl-lora-adapter-v1"
_SHOWN = 3

# Config keys whose truthy value this merge refuses, and why (PEFT's own names). Each either adds weights that are
# not `B @ A` of a linear layer, changes the forward pass beyond `W + delta`, or ties the adapter to PEFT runtime.
REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales every merged column)",
    "modules_to_save": "modules_to_save (whole trained copies of modules, not low-rank deltas)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "layer_replication": "layer_replication (repeats decoder layers: a different architecture)",
    "target_parameters": "target_parameters (LoRA on raw parameters, not linear modules)",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens: not a static merge)",
    "use_qalora": "QA-LoRA (a quantization-aware variant)",
    "megatron_config": "Megatron parallel linear layers",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow (routing between adapters)", "kasa_config": "KaSA",
}
# `init_lora_weights` values whose saved A/B are a plain delta of the *original* weights; PiSSA, OLoRA, CorDA, LoftQ
# and LoRA-GA subtract their initial delta from the base at init, so their adapters need that changed base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _listed(items) -> str:
    items = list(items)
    return ", ".join(items[:_SHOWN]) + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern key K with `re.match(rf"(.*\\.)?({K})$", module)`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _target_matches(target, module: str) -> bool:
    """PEFT's `check_target_module_exists` for one name of `target_modules` (a list entry: the module or a suffix)."""
    return module == target or module.endswith("." + target)


def tower_of(module: str) -> str:
    return "vision" if module.startswith(VISION_PREFIX) else "text"


@dataclass(frozen=True)
class LoraModule:
    name: str  # the module's path in the model, e.g. model.language_model.layers.0.self_attn.q_proj
    rank: int
    alpha: float
    a_key: str
    b_key: str
    a_shape: tuple[int, int]  # [r, in]
    b_shape: tuple[int, int]  # [out, r]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.b_shape[0], self.a_shape[1])


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict
    scale: float
    modules: dict[str, LoraModule]
    digest: str
    files: dict  # file name -> {"blake3", "bytes"}
    weights: bytes = field(repr=False, compare=False)  # the safetensors bytes that were digested: merged as read

    # -- reading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, scale: float = 1.0) -> "LoraAdapter":
        from qvl.artifacts.integrity import hash_bytes

        path = Path(path)
        if not math.isfinite(scale):
            raise QvlError(f"--lora-scale must be a finite number, got {scale}")
        if not path.is_dir():
            raise QvlError(f"LoRA adapter directory not found: {path}",
                           hint="pass the directory PEFT's save_pretrained wrote (adapter_config.json + "
                                "adapter_model.safetensors)")
        cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise QvlError(f"{path} has no {ADAPTER_CONFIG}: not a PEFT adapter directory",
                           hint="pass the directory PEFT's save_pretrained wrote")
        if not w_path.is_file():
            pickles = [p for p in PICKLE_WEIGHTS if (path / p).is_file()]
            if pickles:
                raise QvlError(f"{path} has only pickle adapter weights ({pickles[0]}); qvl-compile loads safetensors only",
                               hint="re-save the adapter with PEFT's save_pretrained(safe_serialization=True)")
            raise QvlError(f"{path} has no {ADAPTER_WEIGHTS}", hint="re-save the adapter with PEFT's save_pretrained")
        try:
            raw_config, weights = cfg_path.read_bytes(), w_path.read_bytes()
        except OSError as exc:
            raise QvlError(f"cannot read LoRA adapter {path}: {exc}") from None
        try:
            config = json.loads(raw_config.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise QvlError(f"cannot parse {cfg_path}: {str(exc)[:200]}") from None
        if not isinstance(config, dict):
            raise QvlError(f"{cfg_path} is a JSON {type(config).__name__}, not an object")
        _check_config(config, cfg_path)
        header = parse_header(weights, len(weights), str(w_path))
        modules = _pair_tensors(header.tensors, config, w_path)
        files = {ADAPTER_CONFIG: {"blake3": hash_bytes(raw_config), "bytes": len(raw_config)},
                 ADAPTER_WEIGHTS: {"blake3": hash_bytes(weights), "bytes": len(weights)}}
        return cls(path=path, config=config, scale=float(scale), modules=modules, digest=adapter_digest(files),
                   files=files, weights=weights)

    @property
    def name(self) -> str:
        return self.path.absolute().name

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def scaling(self, module: LoraModule) -> float:
        """The factor of `B @ A` for `module`, in PEFT's arithmetic: alpha / r (or / sqrt(r)), times the user's scale."""
        base = module.alpha / (math.sqrt(module.rank) if self.config.get("use_rslora") else module.rank)
        return base * self.scale

    def counts(self) -> dict[str, int]:
        out = {"text": 0, "vision": 0}
        for name in self.modules:
            out[tower_of(name)] += 1
        return out

    # -- against a checkpoint -------------------------------------------------------------------------------

    def check_against(self, info) -> None:
        """Every adapted module a linear layer of the checkpoint's model with the adapter's shapes (meta device)."""
        import torch
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        cfg = Qwen3VLConfig.from_dict(dict(info.config))
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(cfg)
        found = dict(model.named_modules())
        base = self.config.get("base_model_name_or_path") or "?"
        hint = (f"the adapter was trained for base model {str(base)[:120]!r}; pass the checkpoint it was "
                "trained on (or an adapter trained on this one)")
        missing = [n for n in self.modules if n not in found]
        if missing:
            raise QvlError(f"LoRA adapter {self.path} adapts {len(missing)} module(s) this checkpoint does not have: "
                           f"{_listed(missing)}"[:400], hint=hint)
        not_linear = [f"{n} ({type(found[n]).__name__})" for n in self.modules if not isinstance(found[n], torch.nn.Linear)]
        if not_linear:
            raise QvlError(f"LoRA adapter {self.path} adapts non-linear module(s) {_listed(not_linear)}; only linear "
                           "layers are merged"[:400], hint="train the adapter on linear layers only (no conv / embedding)")
        wrong = [f"{n} (B @ A is {list(m.weight_shape)}, the weight {list(found[n].weight.shape)})"
                 for n, m in self.modules.items() if tuple(found[n].weight.shape) != m.weight_shape]
        if wrong:
            raise QvlError(f"LoRA adapter {self.path} does not fit this checkpoint: {_listed(wrong)}"[:400], hint=hint)
        if "lm_head" in self.modules and model.lm_head.weight is model.model.language_model.embed_tokens.weight:
            raise QvlError("the LoRA adapter targets lm_head, which this checkpoint ties to the embedding table "
                           "(tie_word_embeddings): merging it would change the input embeddings too",
                           hint="train the adapter without lm_head in target_modules")
        targets = self.config.get("target_modules")
        if isinstance(targets, (list, tuple)):
            unmatched = [t for t in targets if not any(_target_matches(t, n) for n in found)]
        elif isinstance(targets, str):
            unmatched = [] if any(re.fullmatch(targets, n) for n in found) else [targets]
        else:
            unmatched = []
        if unmatched:
            raise QvlError(f"LoRA adapter target_modules {_listed(map(repr, unmatched))} match nothing in this "
                           "checkpoint"[:400], hint=hint)

    # -- merging ----------------------------------------------------------------------------------------------

    def merge_into(self, model) -> dict:
        """W += scaling * (B @ A) on every adapted linear of the loaded fp32 `model`, in place (PEFT's own
        operation order, so the merged weights are what `merge_and_unload` makes). Returns the step's record."""
        import time

        import torch
        from safetensors.torch import load as load_safetensors

        t0 = time.perf_counter()
        tensors = load_safetensors(self.weights)
        change = {"text": 0.0, "vision": 0.0}
        with torch.no_grad():
            for name, m in self.modules.items():
                weight = model.get_submodule(name).weight
                if weight.dtype != torch.float32:
                    raise RuntimeError(f"{name} is {weight.dtype}: the LoRA merge runs on the fp32 model")
                a = tensors[m.a_key].to(torch.float32)
                b = tensors[m.b_key].to(torch.float32)
                delta = (b @ a) * self.scaling(m)
                norm = float(torch.linalg.norm(weight))
                weight += delta
                if not bool(torch.isfinite(weight).all()):
                    raise QvlError(f"merging the LoRA adapter into {name} gives non-finite weights",
                                   hint="check the adapter's weights and --lora-scale")
                rel = float(torch.linalg.norm(delta)) / max(norm, 1e-30)
                change[tower_of(name)] = max(change[tower_of(name)], rel)
        return {"modules": self.counts(),
                "max_relative_change": {k: round(v, 6) for k, v in change.items() if self.counts()[k]},
                "seconds": round(time.perf_counter() - t0, 3)}

    def summary(self) -> str:
        c = self.counts()
        return (f"LoRA adapter {self.name}: {c['text']} text + {c['vision']} vision linear layers, rank "
                f"{'/'.join(map(str, self.ranks))}, scale {self.scale:g} (digest {self.digest[:16]})")

    # -- the manifest -----------------------------------------------------------------------------------------

    def manifest_section(self) -> dict:
        c = self.config
        return {
            "kind": "lora",
            "name": self.name,
            "path": str(self.path.absolute()),
            "digest": self.digest,
            "files": self.files,
            "scale": self.scale,
            "ranks": self.ranks,
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora")),
            "target_modules": sorted(c["target_modules"]) if isinstance(c.get("target_modules"), list) else c.get("target_modules"),
            "modules": self.counts(),
            "base_model_name_or_path": c.get("base_model_name_or_path"),
            "peft_version": c.get("peft_version"),
        }


def adapter_digest(files: Mapping) -> str:
    """One blake3 over the adapter's files (name and blake3 of each, in a fixed order)."""
    from qvl.artifacts.integrity import hash_bytes

    text = _DIGEST_TAG + "\n" + "".join(f"{n}:{files[n]['blake3']}\n" for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    return hash_bytes(text.encode())


def _check_config(c: dict, where: Path) -> None:
    if c.get("peft_type") != "LORA":
        raise QvlError(f"{where}: peft_type {str(c.get('peft_type'))[:40]!r} is not a LoRA adapter (only peft_type "
                       "\"LORA\" is merged)", hint="pass a LoRA adapter directory")
    refused = [why for key, why in REFUSED.items() if c.get(key)]
    if c.get("bias", "none") != "none":
        refused.append(f"bias {c.get('bias')!r} (trained base biases saved with the adapter)")
    init = c.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        refused.append(f"init_lora_weights {str(init)[:40]!r} (changes the base weights at init)")
    if refused:
        raise QvlError(f"{where}: the LoRA merge does not support {refused[0]}" + (
            f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""),
            hint="only plain LoRA / rsLoRA deltas of linear layers are merged; merge other variants with PEFT's "
                 "merge_and_unload and compile the saved checkpoint")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (type(c.get("r")) is int and c["r"] > 0) or not number(c.get("lora_alpha")):
        raise QvlError(f"{where}: r must be a positive integer and lora_alpha a number "
                       f"(got r={str(c.get('r'))[:20]}, lora_alpha={str(c.get('lora_alpha'))[:20]})")
    for key, ok in (("rank_pattern", lambda v: type(v) is int and v > 0), ("alpha_pattern", number)):
        pat = c.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
            raise QvlError(f"{where}: {key} must map module patterns to positive numbers")
        for k in pat:
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as exc:
                raise QvlError(f"{where}: {key} pattern {k[:60]!r} is not a regular expression ({exc})") from None
    targets = c.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise QvlError(f"{where}: target_modules {targets[:60]!r} is not a regular expression ({exc})") from None
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise QvlError(f"{where}: target_modules must be a list of module names or a regular expression")


def _pair_tensors(tensors: Mapping[str, TensorEntry], config: dict, where: Path) -> dict[str, LoraModule]:
    """{module: LoraModule} from the saved keys; anything but 2-D float lora_A / lora_B pairs is refused by name."""
    parts: dict[str, dict[str, tuple[str, TensorEntry]]] = {}
    for key, entry in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            kind = ("a DoRA magnitude vector" if "lora_magnitude_vector" in key
                    else "an embedding LoRA" if "lora_embedding_" in key
                    else "a saved whole module (modules_to_save)" if "modules_to_save" in key
                    else "a LoRA bias" if re.search(r"lora_B\.bias$", key)
                    else "not a lora_A / lora_B weight under base_model.model.")
            raise QvlError(f"{where.name} holds {key[:160]!r}: {kind}; only plain LoRA of linear layers is merged")
        if entry.dtype not in FLOAT_DTYPES:
            raise QvlError(f"{where.name}: {key[:160]!r} is {entry.dtype}, not floating point")
        if len(entry.shape) != 2:
            raise QvlError(f"{where.name}: {key[:160]!r} has shape {list(entry.shape)}: only linear-layer LoRA "
                           "(2-D lora_A / lora_B) is merged", hint="train the adapter on linear layers only")
        parts.setdefault(m.group(1), {})[m.group(2)] = (key, entry)
    if not parts:
        raise QvlError(f"{where.name} holds no lora_A / lora_B weights")
    modules = {}
    for name, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise QvlError(f"{where.name}: module {name[:160]!r} has {'/'.join(sorted(p))} but not both lora_A and lora_B")
        (a_key, a), (b_key, b) = p["lora_A"], p["lora_B"]
        rank = a.shape[0]
        if b.shape[1] != rank or rank == 0:
            raise QvlError(f"{where.name}: module {name[:160]!r} has lora_A {list(a.shape)} and lora_B "
                           f"{list(b.shape)}: not one rank")
        expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if rank != expected:
            raise QvlError(f"{where.name}: module {name[:160]!r} has rank {rank} but adapter_config.json says {expected} "
                           "(r / rank_pattern)", hint="the adapter's config and weights must come from one save_pretrained")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        modules[name] = LoraModule(name, rank, alpha, a_key, b_key, tuple(a.shape), tuple(b.shape))
    return modules


# -- the compile command -------------------------------------------------------------------------------------


def adapter_option(source: Path, lora: Path | None, scale: float | None) -> LoraAdapter:
    """`compile SRC --lora DIR [--lora-scale S]`: the adapter read and checked against the checkpoint SRC."""
    from qvl.artifacts.manifest_checks import MANIFEST
    from qvl.toolchain.export.checkpoint_io import validate_checkpoint

    if lora is None:
        raise QvlError("--lora-scale needs --lora", hint="add --lora ADAPTER_DIR (or drop --lora-scale)")
    if (Path(source) / MANIFEST).is_file():
        raise QvlError(f"--lora merges an adapter into a checkpoint's weights before export; {source} is an artifact",
                       hint="compile the checkpoint it came from with --lora")
    adapter = LoraAdapter.load(lora, scale=1.0 if scale is None else scale)
    adapter.check_against(validate_checkpoint(Path(source)))
    return adapter


@contextlib.contextmanager
def merged_source(source: Path, adapter: LoraAdapter | None, out: Path, overwrite: bool, step=None):
    """`source` itself without an adapter; with one, a scratch fp32 export of it with the adapter merged (for the
    paths that take an artifact: TensorRT engine kits). A wrong --out is refused before the export."""
    if adapter is None:
        yield Path(source)
        return
    from qvl.toolchain.export.exporter import export_artifact
    from qvl.toolchain.fsutil import check_output_target
    from qvl.toolchain.staging import scratch_dir

    check_output_target(Path(out), overwrite, (Path(source),))
    with scratch_dir("qvl-lora-") as tmp:
        exported = Path(tmp) / "export"
        export_artifact(Path(source), exported, lora=adapter, step=step)
        yield exported


# -- artifacts and the oracle ---------------------------------------------------------------------------------


def adapter_for_artifact(section, adapter_dir: Path | None) -> LoraAdapter:
    """The adapter an artifact's manifest records (`adapter` section), read from `adapter_dir` or the recorded
    path, with the recorded scale; its digest must be the recorded one."""
    recorded = Path(section.path) if section.path else None
    path = Path(adapter_dir) if adapter_dir is not None else recorded
    if path is None or not path.is_dir():
        raise QvlError(f"the artifact was compiled with LoRA adapter {section.name or '?'} from {section.path or '?'}, "
                       "which is not there", hint="pass the adapter directory with --lora DIR")
    adapter = LoraAdapter.load(path, scale=section.scale)
    if adapter.digest != section.digest:
        raise QvlError(f"LoRA adapter {path} (digest {adapter.digest[:16]}) is not the one merged into this artifact "
                       f"(digest {section.digest[:16]}, {section.name or '?'} from {section.path or '?'})",
                       hint="pass the adapter directory the artifact was compiled with: --lora DIR")
    return adapter


def peft_merged(model, adapter: LoraAdapter):
    """The oracle's path, independent of `merge_into`: PEFT itself reads the adapter directory (its own key mapping,
    rank / alpha patterns, rsLoRA scaling), each LoRA layer's scale is multiplied by the adapter's `scale`
    (`LoraLayer.scale_layer`), and `merge_and_unload` gives back the plain transformers model."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if len(layers) < len(adapter.modules):
        raise QvlError(f"PEFT applied the adapter {adapter.path} to {len(layers)} modules, the adapter has "
                       f"{len(adapter.modules)}")
    for layer in layers:
        layer.scale_layer(adapter.scale)
    return peft_model.merge_and_unload()
