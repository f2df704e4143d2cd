"""The typed, versioned artifact manifest: the one description of `manifest.json` that writers and readers share.

`Manifest.from_json(raw, artifact_dir)` validates a parsed `manifest.json` (format name and schema version, the
types of every field a reader uses, the model against the graphs' I/O signatures, and -- with `artifact_dir` --
that every path stays inside the artifact) and returns frozen dataclasses; every problem is a one-line
`QvlError`, never a `KeyError` later. `to_json()` gives back exactly the JSON object it was read from (unknown
keys of every section are kept in `extra`), so the on-disk format does not depend on this module's version.

Sections (keys of the top-level object):

* `format` / `format_version` -- `"qvl-artifact"`, `FORMAT_VERSION` (1: one `weights.bin`) or
  `FORMAT_VERSION_OBJECTS` (2: content-addressed weight objects `weights/<blake3>`, see `artifacts/content_store.py`);
* `target`, `created`, `tool_versions`, `steps` -- strings / opaque reports;
* `source` (`Source`), `model` (`ModelInfo`), `graphs` (`GraphEntry` per name), `weights` (`Weights`),
  `embedding` (`Embedding`: dense, or `format: "matmulnbits"` with `TensorRef` parts), `side_files`
  (`SideFile` per name), `decoder` (`DecoderInfo`, optional), `ort_optimized` (`OrtOptimized`, optional),
  `kit` (`Kit`, TensorRT engine kits only), `precision` / `sparsity` (opaque reports of the approximate steps).
* `adapter` (`Adapter`, optional): the LoRA adapter merged into the weights before export (`compile --lora`).
* `partition` (`Partition`, optional): the decoder's layer-range part graphs (`qvl-compile partition`).

The file checks (hashes, the graphs' weight references, the weight store's digests) are `manifest.read_manifest`'s.
The JSON-level checks and the format's constants are in `manifest_checks.py`. Standard library only besides
`manifest_checks` and `errors`: this module is on the runtime's import path.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from qvl.errors import QvlError

from qvl.artifacts.manifest_checks import (  # noqa: F401 (the format's constants are re-exported here)
    FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_OBJECTS, READ_VERSIONS, MANIFEST, WEIGHTS, SIDE_FILES, KIT_FORMAT, KIT_VERSION, EMBEDDING_MATMULNBITS, check_paths, check_manifest, _need, _Bad, _check_kit,
)


# -- typed sections ----------------------------------------------------------------------------------------

_META = ("extra", "present")


def _dump(v):
    if isinstance(v, _Json):
        return v.to_json()
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    return copy.deepcopy(v)


@dataclass(frozen=True)
class _Json:
    """A JSON object with typed known keys. `extra`: the keys this version does not model (kept for the round
    trip); `present`: which known keys the JSON had (None: built in code -- then the keys that are not None)."""

    extra: Mapping = field(default_factory=dict, kw_only=True, repr=False, compare=False)
    present: frozenset | None = field(default=None, kw_only=True, repr=False, compare=False)

    @classmethod
    def _keys(cls) -> dict:
        return {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.name not in _META}

    def to_json(self) -> dict:
        out = {}
        for key, f in self._keys().items():
            v = getattr(self, f.name)
            if (key in self.present) if self.present is not None else (v is not None):
                out[key] = _dump(v)
        out.update(_dump(self.extra))
        return out

    @classmethod
    def _load(cls, d: Mapping, **convert):
        keys = cls._keys()
        kw = {}
        for key, f in keys.items():
            if key in d:
                v = d[key]
                c = convert.get(f.name)
                kw[f.name] = c(v) if c is not None and v is not None else v
        return cls(**kw, extra={k: v for k, v in d.items() if k not in keys},
                   present=frozenset(k for k in d if k in keys))

    @classmethod
    def from_json(cls, d: Mapping):
        return cls._load(d)


def _mapping_of(cls):
    return lambda d: {k: cls.from_json(v) for k, v in d.items()}


@dataclass(frozen=True)
class IOValue(_Json):
    name: str
    shape: tuple = ()  # ints and symbolic dimension names
    dtype: str | None = None

    @classmethod
    def from_json(cls, d):
        return cls._load(d, shape=tuple)


@dataclass(frozen=True)
class GraphEntry(_Json):
    """`graphs[name]`: the ONNX file, its sha256 and its I/O signature."""

    file: str
    sha256: str
    inputs: tuple = ()
    outputs: tuple = ()

    @classmethod
    def from_json(cls, d):
        sig = lambda vs: tuple(IOValue.from_json(v) for v in vs)  # noqa: E731
        return cls._load(d, inputs=sig, outputs=sig)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]


@dataclass(frozen=True)
class Weights(_Json):
    """`weights`. Format 1: the shared weight store `file` and its blake3 chunk digests (`integrity.weights_digests`).
    Format 2 (`layout: "objects"`): the content-addressed objects in `dir`, `objects` {blake3 hex: bytes}, each
    file named by the digest of its bytes; `digest` is the set's (`integrity.objects_digest`)."""

    bytes: int
    file: str | None = None
    algorithm: str | None = None
    chunk_bytes: int | None = None
    chunks: tuple = ()
    digest: str | None = None
    layout: str | None = None
    dir: str | None = None
    objects: Mapping = field(default_factory=dict)

    @classmethod
    def from_json(cls, d):
        return cls._load(d, chunks=tuple)

    @property
    def is_objects(self) -> bool:
        return self.layout == "objects"

    @property
    def files(self) -> dict[str, int]:
        """Every weight file of the artifact (relative path -> bytes): the store, or each object."""
        if self.is_objects:
            return {f"{self.dir}/{name}": size for name, size in self.objects.items()}
        return {self.file: self.bytes}

    @property
    def record(self) -> dict:
        """What `integrity.verify_weights` (format 1) / `verify_objects` (format 2) checks against."""
        if self.is_objects:
            return {"dir": self.dir, "objects": dict(self.objects), "bytes": self.bytes, "digest": self.digest}
        return {"bytes": self.bytes, "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks), "digest": self.digest}


@dataclass(frozen=True)
class SideFile(_Json):
    blake3: str
    bytes: int


@dataclass(frozen=True)
class TensorRef(_Json):
    """A tensor in the weight store (`file` absent: the weight store / the entry's file)."""

    offset: int
    shape: tuple
    dtype: str
    file: str | None = None
    initializer: str | None = None

    @classmethod
    def from_json(cls, d):
        return cls._load(d, shape=tuple)


@dataclass(frozen=True)
class Embedding(_Json):
    """`embedding`: the token embedding table. Dense: an fp32 `[vocab, hidden]` tensor in the store (`offset`,
    `dtype`). `format: "matmulnbits"`: the tied lm_head's MatMulNBits buffers (`packed`, `scales`,
    `zero_points`), read by `runtime/quantized_embedding.py`."""

    shape: tuple
    format: str | None = None
    file: str | None = None
    offset: int | None = None
    dtype: str | None = None
    initializer: str | None = None
    bits: int | None = None
    block_size: int | None = None
    packed: TensorRef | None = None
    scales: TensorRef | None = None
    zero_points: TensorRef | None = None

    @classmethod
    def from_json(cls, d):
        ref = TensorRef.from_json
        return cls._load(d, shape=tuple, packed=ref, scales=ref, zero_points=ref)

    @property
    def quantized(self) -> bool:
        return self.format == EMBEDDING_MATMULNBITS

    @property
    def dense(self) -> TensorRef:
        return TensorRef(offset=self.offset, shape=self.shape, dtype=self.dtype, file=self.file)


@dataclass(frozen=True)
class Source(_Json):
    """`source`: the checkpoint the artifact came from (path, sha256 fingerprint, its config.json, which of its
    files the chat template was taken from)."""

    config: Mapping
    checkpoint: str | None = None
    sha256: str | None = None
    # the side file the chat template comes from (`runtime/chat_template_source.py`: transformers' precedence,
    # resolved at export); None in artifacts exported before it was recorded
    chat_template: str | None = None

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]


@dataclass(frozen=True)
class ModelInfo(_Json):
    """`model`: the dimensions the runtime allocates by (checked against the graphs' signatures when read)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    num_deepstack: int
    vision: Mapping

    @property
    def spatial_merge_size(self) -> int:
        return self.vision["spatial_merge_size"]

    def get(self, key: str, default=None):
        """An unmodelled summary field (`model_type`, `image_token_id`, `rope_theta`, ...)."""
        return self.extra.get(key, default)


@dataclass(frozen=True)
class DecoderInfo(_Json):
    """`decoder`: `kv_mode` "concat" (plain export), "shared" (GroupQueryAttention, in-place KV buffers) or
    "scatter" (TensorScatter + Attention: in-place fixed-capacity buffers, `attention_mask` as wide as the cache)."""

    kv_mode: str | None = None


@dataclass(frozen=True)
class OptimizedGraph(_Json):
    file: str
    sha256: str
    nodes: int | None = None


@dataclass(frozen=True)
class OrtOptimized(_Json):
    """`ort_optimized`: ONNX Runtime's saved optimized graphs, usable only with the ORT version that wrote them."""

    onnxruntime: str | None = None
    graphs: Mapping = field(default_factory=dict)
    not_optimized: Mapping = field(default_factory=dict)
    level: str | None = None
    provider: str | None = None
    seconds: float | None = None

    @classmethod
    def from_json(cls, d):
        return cls._load(d, graphs=_mapping_of(OptimizedGraph))

    def usable(self, ort_version: str, graph_names) -> bool:
        return self.onnxruntime == ort_version and set(self.graphs) == set(graph_names)


@dataclass(frozen=True)
class KitGraph(_Json):
    file: str
    opset: int | None = None
    profiles: tuple = ()  # {"name", "dims", "shapes"} per optimization profile (TensorRT's)

    @classmethod
    def from_json(cls, d):
        return cls._load(d, profiles=tuple)


@dataclass(frozen=True)
class KitBuild(_Json):
    """`kit.build`: the TensorRT builder settings (`int8`: the graphs carry explicit Q/DQ to build in INT8)."""

    int8: bool = False
    fp16: bool | None = None
    precision: str | None = None


@dataclass(frozen=True)
class MemoryFit(_Json):
    selected: Mapping = field(default_factory=dict)
    footprint: Mapping | None = None
    cards: Mapping | None = None

    @property
    def on_cpu(self) -> list:
        return list(self.selected.get("on_cpu") or [])


@dataclass(frozen=True)
class Kit(_Json):
    """`kit`: a TensorRT engine kit's build settings, per-graph profiles, memory fit and KV contract."""

    target: str
    graphs: Mapping
    format: str = KIT_FORMAT
    version: int = KIT_VERSION
    context_length: int | None = None
    prefill_chunk: int | None = None
    max_image_patches: int | None = None
    build: KitBuild = field(default_factory=KitBuild)
    kv_cache: Mapping | None = None
    memory_fit: MemoryFit = field(default_factory=MemoryFit)

    @classmethod
    def from_json(cls, d):
        return cls._load(d, graphs=_mapping_of(KitGraph), build=KitBuild.from_json, memory_fit=MemoryFit.from_json)

    @classmethod
    def parse(cls, d) -> "Kit":
        """A kit section on its own (e.g. a test's or tool's copy of `manifest["kit"]`), validated."""
        try:
            _need(isinstance(d, dict), "'kit' is not an object")
            _check_kit(d, {g["file"]: {"file": g["file"]} for g in (d.get("graphs") or {}).values() if isinstance(g, dict)})
        except _Bad as exc:
            raise QvlError(f"corrupt kit section: {exc}") from None
        return cls.from_json(d)

    @property
    def int8(self) -> bool:
        return bool(self.build.int8)

    @property
    def is_trt_kit(self) -> bool:
        return self.format == KIT_FORMAT


@dataclass(frozen=True)
class Adapter(_Json):
    """`adapter`: a LoRA adapter merged into the weights before export (`compile --lora`, toolchain/export/lora.py):
    `digest` (blake3 over its adapter_config.json and adapter_model.safetensors, `files` each), the `scale` it was
    merged with, its `ranks`, `target_modules` and how many text / vision `modules` it changed; `path` is where it
    was read from (what `parity` reads it from again unless given `--lora`)."""

    kind: str
    digest: str
    scale: float
    name: str | None = None
    path: str | None = None
    ranks: tuple = ()
    target_modules: object = None  # a list of module names or PEFT's regular expression
    modules: Mapping = field(default_factory=dict)  # "text" / "vision" -> merged module count
    files: Mapping = field(default_factory=dict)

    @classmethod
    def from_json(cls, d):
        return cls._load(d, ranks=tuple)


@dataclass(frozen=True)
class DecoderPart(_Json):
    """One part of a partitioned decoder (`partition.parts[i]`): graph `graph` runs layers [start, stop) (`kind`
    "layers"), or the final norm and lm_head (`kind` "head", layers [L, L]). `inputs` / `outputs`: its graph's I/O
    names (the decoder's own inputs it needs, its layers' KV, and the values crossing from / to other parts);
    `weight_bytes`: the distinct external weight bytes it reads; `ranges`: those bytes as (file, offset, length)
    runs of the weight files, in the graph's order (what prefetching or evicting the part touches)."""

    name: str
    graph: str
    kind: str
    layers: tuple
    weight_bytes: int
    inputs: tuple = ()
    outputs: tuple = ()
    ranges: tuple = ()

    @classmethod
    def from_json(cls, d):
        return cls._load(d, layers=tuple, inputs=tuple, outputs=tuple,
                         ranges=lambda rs: tuple(tuple(r) for r in rs))

    @property
    def layer_count(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Partition(_Json):
    """`partition` (`qvl-compile partition`, toolchain/compile/partition.py): the decoder cut into layer-range parts
    sharing the artifact's weights, in execution order, the head last. The whole `decoder` graph stays too."""

    version: int
    parts: tuple
    vision_weight_bytes: int = 0
    embedding_bytes: int = 0
    boundary_bytes_per_position: int = 0

    @classmethod
    def from_json(cls, d):
        return cls._load(d, parts=lambda ps: tuple(DecoderPart.from_json(p) for p in ps))


@dataclass(frozen=True)
class Manifest(_Json):
    """`manifest.json`. Build one with `from_json` (validated) or in code; `to_json()` is what is written."""

    source: Source
    model: ModelInfo
    graphs: Mapping  # name -> GraphEntry ("vision", "decoder")
    weights: Weights
    embedding: Embedding
    side_files: Mapping = field(default_factory=dict)  # name -> SideFile
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    target: str | None = None
    created: str | None = None
    decoder: DecoderInfo | None = None
    ort_optimized: OrtOptimized | None = None
    kit: Kit | None = None
    precision: Mapping | None = None
    sparsity: Mapping | None = None
    activations: Mapping | None = None  # the fp16-activation step's report (`cuda` target)
    packing: Mapping | None = None  # the sibling-linear merge's report
    adapter: Adapter | None = None  # the merged LoRA adapter (`compile --lora`); absent: none
    partition: Partition | None = None  # decoder parts (`qvl-compile partition`); absent: one decoder graph
    tool_versions: Mapping | None = None
    steps: tuple | None = None
    artifact_dir: Path | None = field(default=None, compare=False, metadata={"key": None})

    @classmethod
    def _keys(cls) -> dict:
        return {k: f for k, f in super()._keys().items() if f.name != "artifact_dir"}

    @classmethod
    def from_json(cls, raw, artifact_dir: Path | None = None, where: str = MANIFEST) -> "Manifest":
        """Validate a parsed manifest (see the module docstring) and type it; one-line QvlErrors."""
        check_manifest(raw, where)
        if artifact_dir is not None:
            check_paths(Path(artifact_dir), raw)
        m = cls._load(raw, source=Source.from_json, model=ModelInfo.from_json, graphs=_mapping_of(GraphEntry),
                      weights=Weights.from_json, embedding=Embedding.from_json, side_files=_mapping_of(SideFile),
                      decoder=DecoderInfo.from_json, ort_optimized=OrtOptimized.from_json, kit=Kit.from_json,
                      adapter=Adapter.from_json, partition=Partition.from_json,
                      steps=tuple)
        return dataclasses.replace(m, artifact_dir=Path(artifact_dir) if artifact_dir is not None else None)

    # -- what readers ask ---------------------------------------------------------------------------------

    @property
    def kv_mode(self) -> str:
        return (self.decoder.kv_mode if self.decoder is not None else None) or "concat"

    @property
    def embedding_format(self) -> str:
        return self.embedding.format or "dense"

    @property
    def int8_kit(self) -> bool:
        """An INT8 TensorRT kit: explicit Q/DQ graphs for TensorRT to build in INT8."""
        return self.kit is not None and self.kit.int8

    def graph_files(self) -> dict[str, str]:
        return {name: g.file for name, g in self.graphs.items()}

    def path(self, rel: str) -> Path:
        """A file of the artifact (manifest paths are checked to stay inside it when read)."""
        if self.artifact_dir is None:
            raise ValueError("manifest was not read from an artifact directory")
        return self.artifact_dir / rel

    def graph_path(self, name: str) -> Path:
        return self.path(self.graphs[name].file)

    def derive(self, drop: tuple[str, ...] = ()) -> dict:
        """The JSON fields a derived artifact starts from: everything but format, version, created and `drop`."""
        return {k: v for k, v in self.to_json().items() if k not in ("format", "format_version", "created", *drop)}


def load_kit(kit) -> Kit:
    """A `Kit` from a typed kit or a raw kit section (validated)."""
    return kit if isinstance(kit, Kit) else Kit.parse(kit)


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "FORMAT_VERSION_OBJECTS", "READ_VERSIONS", "MANIFEST", "WEIGHTS", "SIDE_FILES", "KIT_FORMAT", "KIT_VERSION",
    "Manifest", "Source", "ModelInfo", "GraphEntry", "IOValue", "Weights", "SideFile", "TensorRef", "Embedding",
    "DecoderInfo", "OrtOptimized", "OptimizedGraph", "Kit", "KitGraph", "KitBuild", "MemoryFit", "Adapter", "Partition",
    "DecoderPart", "load_kit",
    "check_manifest", "check_paths",
]
