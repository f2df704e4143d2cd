"""Validation of a parsed `manifest.json` (before the typed sections of `schema.py` are built from it), and the
format's constants. Every problem is a one-line `QvlError`. Standard library only: on the runtime's import path.
"""

from __future__ import annotations

import re
from pathlib import Path

from qvl.artifacts import integrity
from qvl.errors import QvlError

FORMAT_NAME = "qvl-artifact"
FORMAT_VERSION = 1  # one `weights.bin` per artifact: what every writer produces, the self-contained deliverable
# Format 2: the weights are content-addressed objects `weights/<blake3>`, one per distinct tensor payload, hard
# links into the weight cache when written through it (`artifacts/content_store.py`). Readers take both.
FORMAT_VERSION_OBJECTS = 2
READ_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_OBJECTS)
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
# Files the runtime needs besides graphs and weights, copied from the checkpoint.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",  # its "chat_template" entry outranks the template files (chat_template_source.py)
    "video_preprocessor_config.json",  # the video processor's settings (runtime/video.py), before preprocessor_config
)
KIT_FORMAT = "qvl-trt-kit"
KIT_VERSION = 1
EMBEDDING_MATMULNBITS = "matmulnbits"
KV_MODES = ("concat", "shared", "scatter")


# -- validation (the checks `read_manifest` has always made, on the parsed JSON) -----------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
_MODEL_INTS = {"num_layers": (1, 4096), "hidden_size": (1, 1 << 20), "num_heads": (1, 4096), "num_kv_heads": (1, 4096),
               "head_dim": (1, 1 << 16), "vocab_size": (1, 1 << 24), "context_length": (1, 1 << 31),
               "num_deepstack": (0, 1024)}


class _Bad(Exception):
    pass


def _need(cond, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


def _is_int(v, lo: int = 0, hi: int = 1 << 62) -> bool:
    return type(v) is int and lo <= v <= hi


def _section(m: dict, key: str, optional: bool = False) -> dict | None:
    v = m.get(key)
    if v is None and optional and key not in m:
        return None
    _need(isinstance(v, dict), f"{key!r} is missing or not an object")
    return v


def _check_signature(name: str, g: dict) -> None:
    for side in ("inputs", "outputs"):
        vals = g.get(side)
        _need(isinstance(vals, list), f"graph {name!r} has no {side} list")
        for v in vals:
            _need(isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("shape"), list)
                  and all(isinstance(d, str) or _is_int(d) for d in v["shape"]), f"graph {name!r} has a malformed {side[:-1]}")


def _check_graph_entries(graphs, where: str, signature: bool) -> None:
    _need(isinstance(graphs, dict), f"{where} is not an object")
    for name, g in graphs.items():
        _need(isinstance(g, dict) and isinstance(g.get("file"), str), f"{where}[{name!r}] has no file")
        _need(isinstance(g.get("sha256"), str) and _HEX64.fullmatch(g["sha256"]), f"{where}[{name!r}] has no sha256")
        if signature:
            _check_signature(name, g)


def _weight_file_bytes(weights: dict, file) -> int | None:
    """Size of the weight file `file` names (the store, or a format-2 object), None if it is none of them."""
    if weights.get("layout") == integrity.OBJECTS_LAYOUT:
        prefix = weights["dir"] + "/"
        if isinstance(file, str) and file.startswith(prefix):
            return weights["objects"].get(file[len(prefix):])
        return None
    return weights["bytes"] if file == weights["file"] else None


def _check_tensor_ref(t, weights: dict, what: str, shape_len: int | None = None) -> None:
    _need(isinstance(t, dict), f"{what} is not an object")
    objects = weights.get("layout") == integrity.OBJECTS_LAYOUT
    file = t.get("file") if objects else t.get("file", weights["file"])
    size = _weight_file_bytes(weights, file)
    _need(size is not None, f"{what} reads {file!r}, not " + (
        "one of the artifact's weight objects" if objects else f"the weight store {weights['file']!r}"))
    shape = t.get("shape")
    _need(isinstance(shape, list) and all(_is_int(d, 0, 1 << 40) for d in shape) and (shape_len is None or len(shape) == shape_len),
          f"{what} has a malformed shape")
    _need(isinstance(t.get("dtype"), str) and t["dtype"] in _ITEMSIZE, f"{what} has an unsupported dtype {t.get('dtype')!r}")
    _need(_is_int(t.get("offset")), f"{what} has a malformed offset")
    n = _ITEMSIZE[t["dtype"]]
    for d in shape:
        n *= d
    _need(t["offset"] + n <= size, f"{what} reaches past the end of the weight " + ("object" if objects else "store"))


def _check_kit(kit: dict, graphs: dict) -> None:
    files = {g["file"] for g in graphs.values()}
    kg = kit.get("graphs")
    _need(isinstance(kg, dict) and all(isinstance(g, dict) and isinstance(g.get("file"), str) and g["file"] in files for g in kg.values()),
          "kit.graphs must name the artifact's graph files")
    _need(all(isinstance(g.get("profiles", []), list) and all(isinstance(p, dict) for p in g.get("profiles", []))
              for g in kg.values()), "kit.graphs profiles are not a list of objects")
    _need(isinstance(kit.get("build", {}), dict), "kit.build is not an object")
    _need(type(kit.get("build", {}).get("int8", False)) is bool, "kit.build.int8 is not a boolean")
    _need(isinstance(kit.get("target", ""), str) and isinstance(kit.get("format", ""), str), "kit.target/format is not a string")
    for key in ("context_length", "prefill_chunk", "max_image_patches"):
        _need(kit.get(key) is None or _is_int(kit[key]), f"kit.{key} is not an integer")
    fit = kit.get("memory_fit", {})
    _need(isinstance(fit, dict) and isinstance(fit.get("selected", {}), dict), "kit.memory_fit is not an object")


ADAPTER_KINDS = ("lora",)


def _check_adapter(a: dict) -> None:
    """`adapter` (optional): the LoRA adapter merged before export (toolchain/export/lora.py writes it)."""
    _need(a.get("kind") in ADAPTER_KINDS, f"adapter.kind {str(a.get('kind'))[:40]!r} is not one of {', '.join(ADAPTER_KINDS)}")
    _need(isinstance(a.get("digest"), str) and _HEX64.fullmatch(a["digest"]), "adapter.digest is not a blake3 hex digest")
    scale = a.get("scale")
    _need(isinstance(scale, (int, float)) and not isinstance(scale, bool) and abs(scale) < float("inf"),
          "adapter.scale is not a finite number")
    for key in ("name", "path"):
        _need(a.get(key) is None or isinstance(a[key], str), f"adapter.{key} is not a string")
    ranks = a.get("ranks", [])
    _need(isinstance(ranks, list) and all(_is_int(r, 1, 1 << 20) for r in ranks), "adapter.ranks is not a list of positive integers")
    targets = a.get("target_modules")
    _need(targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)),
          "adapter.target_modules is not a list of names or a pattern")
    modules = a.get("modules", {})
    _need(isinstance(modules, dict) and all(isinstance(k, str) and _is_int(v) for k, v in modules.items()),
          "adapter.modules is not a map of towers to module counts")
    files = a.get("files", {})
    _need(isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("blake3"), str)
                                          and _HEX64.fullmatch(f["blake3"]) and _is_int(f.get("bytes")) for f in files.values()),
          "adapter.files is malformed")


def _check_weights(w: dict, version: int) -> None:
    _need(w.get("algorithm") == integrity.ALGORITHM,
          f"weights are not digested with {integrity.ALGORITHM} (written by an older qvl-compile?)")
    if version == FORMAT_VERSION_OBJECTS:
        _need(w.get("layout") == integrity.OBJECTS_LAYOUT and w.get("dir") == integrity.OBJECTS_DIR,
              f"format {version} weights must be layout {integrity.OBJECTS_LAYOUT!r} in {integrity.OBJECTS_DIR!r}")
        objects = w.get("objects")
        _need(isinstance(objects, dict) and all(isinstance(k, str) and _HEX64.fullmatch(k) and _is_int(v) for k, v in objects.items()),
              "weights.objects is not a map of blake3 digests to sizes")
        _need(_is_int(w.get("bytes")) and w["bytes"] == sum(objects.values()), "weights.bytes is not the objects' total")
        _need(isinstance(w.get("digest"), str) and w["digest"] == integrity.objects_digest(objects),
              "weights.digest does not match weights.objects")
        return
    _need("layout" not in w, f"format {version} weights have no layout (format {FORMAT_VERSION_OBJECTS} has)")
    _need(isinstance(w.get("file"), str), "weights has no file")
    _need(_is_int(w.get("bytes")) and _is_int(w.get("chunk_bytes"), 4096, 1 << 40), "weights has a malformed size or chunk size")
    chunks = w.get("chunks")
    _need(isinstance(chunks, list) and len(chunks) == -(-w["bytes"] // w["chunk_bytes"])
          and all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks), "weights.chunks does not cover the store")
    _need(isinstance(w.get("digest"), str) and w["digest"] == integrity.root_digest(w["bytes"], w["chunk_bytes"], chunks),
          "weights.digest does not match weights.chunks")


def _check_partition(p: dict, graphs: dict, weights: dict, model: dict) -> None:
    """`partition`: version 1, parts naming graphs of the artifact, covering layers 0..L-1 once in order, the head
    last; byte counts non-negative integers; ranges inside the weight files."""
    _need(p.get("version") == 1, f"partition.version {p.get('version')!r} is not supported (this reader: 1)")
    for key in ("vision_weight_bytes", "embedding_bytes", "boundary_bytes_per_position"):
        _need(_is_int(p.get(key, 0)), f"partition.{key} is not a non-negative integer")
    parts = p.get("parts")
    _need(isinstance(parts, list) and len(parts) >= 2 and all(isinstance(q, dict) for q in parts),
          "partition.parts is not a list of at least two parts")
    layers = model.get("num_layers")
    expect = 0
    for i, q in enumerate(parts):
        where = f"partition.parts[{i}]"
        _need(isinstance(q.get("name"), str) and q["name"], f"{where}.name is missing")
        _need(q.get("graph") in graphs and q["graph"] not in ("decoder", "vision"),
              f"{where}.graph does not name a part graph of the artifact")
        head = i == len(parts) - 1
        _need(q.get("kind") == ("head" if head else "layers"), f"{where}.kind must be {'head' if head else 'layers'!r}")
        span = q.get("layers")
        _need(isinstance(span, list) and len(span) == 2 and all(_is_int(x) for x in span),
              f"{where}.layers is not [start, stop]")
        _need(span[0] == expect and (span[1] == span[0] if head else span[1] > span[0]),
              f"{where}.layers {span} does not continue the parts before it")
        expect = span[1]
        _need(_is_int(q.get("weight_bytes")), f"{where}.weight_bytes is not a non-negative integer")
        for key in ("inputs", "outputs"):
            _need(isinstance(q.get(key, []), list) and all(isinstance(n, str) for n in q.get(key, [])),
                  f"{where}.{key} is not a list of names")
        for r in q.get("ranges", []):
            ok = isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and _is_int(r[1]) and _is_int(r[2], 1)
            size = _weight_file_bytes(weights, r[0]) if ok else None
            _need(ok and size is not None and r[1] + r[2] <= size, f"{where}.ranges has a run outside the weight files")
    _need(expect == layers, f"partition.parts cover layers 0..{expect - 1}, the model has {layers}")


def check_schema(m) -> None:
    """Types of every manifest field the toolchain and runtime read (format and version checked before)."""
    graphs = _section(m, "graphs")
    _check_graph_entries(graphs, "graphs", signature=True)
    _need("decoder" in graphs and "vision" in graphs, "graphs must have 'decoder' and 'vision'")
    opt = _section(m, "ort_optimized", optional=True)
    if opt is not None:
        _check_graph_entries(opt.get("graphs", {}), "ort_optimized.graphs", signature=False)
        _need(set(opt.get("graphs", {})) <= set(graphs), "ort_optimized names a graph the artifact does not have")
    w = _section(m, "weights")
    _check_weights(w, m["format_version"])
    side = _section(m, "side_files")
    for name, s in side.items():
        _need(name in SIDE_FILES, f"side_files names {name!r}, not a side file")
        _need(isinstance(s, dict) and isinstance(s.get("blake3"), str) and _HEX64.fullmatch(s["blake3"])
              and _is_int(s.get("bytes")), f"side_files[{name!r}] is malformed")
    model = _section(m, "model")
    for key, (lo, hi) in _MODEL_INTS.items():
        _need(_is_int(model.get(key), lo, hi), f"model.{key} is missing or not an integer in [{lo}, {hi}]")
    _need(isinstance(model.get("vision"), dict) and _is_int(model["vision"].get("spatial_merge_size"), 1, 64),
          "model.vision.spatial_merge_size is missing")
    source = _section(m, "source")
    _need(isinstance(source.get("config"), dict) and isinstance(source["config"].get("vision_config"), dict),
          "source.config.vision_config is missing")
    _need(isinstance(source.get("sha256", ""), str), "source.sha256 is not a string")
    _need(source.get("chat_template") is None or (isinstance(source["chat_template"], str)
                                                   and source["chat_template"] in side),
          "source.chat_template does not name a recorded side file")
    emb = _section(m, "embedding")
    if emb.get("format") == EMBEDDING_MATMULNBITS:
        if w.get("layout") == integrity.OBJECTS_LAYOUT:  # format 2: every part names its own object
            _need(emb.get("file") is None or _weight_file_bytes(w, emb["file"]) is not None,
                  f"embedding reads {emb.get('file')!r}, not one of the artifact's weight objects")
        else:
            _need(emb.get("file", w["file"]) == w["file"], f"embedding reads {emb.get('file')!r}, not the weight store")
        _need(isinstance(emb.get("shape"), list) and len(emb["shape"]) == 2 and all(_is_int(d, 1, 1 << 40) for d in emb["shape"]),
              "embedding has a malformed shape")
        _need(_is_int(emb.get("bits"), 1, 8) and _is_int(emb.get("block_size"), 1, 1 << 20), "embedding has malformed bits/block_size")
        for part in ("packed", "scales", "zero_points"):
            if part != "zero_points" or emb.get(part) is not None:
                _check_tensor_ref(emb.get(part), w, f"embedding.{part}")
    else:
        _need(emb.get("format") is None, f"embedding format {emb.get('format')!r} is not supported")
        _check_tensor_ref(emb, w, "embedding", shape_len=2)
    dec = _section(m, "decoder", optional=True)
    if dec is not None:
        _need(dec.get("kv_mode", "concat") in KV_MODES, f"decoder.kv_mode {dec.get('kv_mode')!r} is not supported")
    kit = _section(m, "kit", optional=True)
    if kit is not None:
        _check_kit(kit, graphs)
    for key in ("precision", "sparsity", "activations", "packing"):
        _section(m, key, optional=True)
    adapter = _section(m, "adapter", optional=True)
    if adapter is not None:
        _check_adapter(adapter)
    partition = _section(m, "partition", optional=True)
    if partition is not None:
        _check_partition(partition, graphs, w, model)
    _need(isinstance(m.get("target", ""), str) and isinstance(m.get("created", ""), str), "target/created is not a string")
    _need(isinstance(m.get("steps", []), list) and all(isinstance(s, dict) for s in m.get("steps", [])),
          "steps is not a list of objects")
    _need(isinstance(m.get("tool_versions", {}), dict), "tool_versions is not an object")


def check_model(m: dict) -> None:
    """`model` against the decoder/vision I/O signatures the graph entries record (hash-checked files)."""
    model = m["model"]
    dec = {v["name"]: v["shape"] for v in m["graphs"]["decoder"]["inputs"]}
    dec_out = {v["name"]: v["shape"] for v in m["graphs"]["decoder"]["outputs"]}
    layers = model["num_layers"]
    for kind in ("key", "value"):
        got = sorted(int(n.rsplit("_", 1)[1]) for n in dec if re.fullmatch(rf"past_{kind}_\d+", n))
        _need(got == list(range(layers)), f"model.num_layers is {layers} but the decoder graph has {len(got)} past_{kind}_* inputs")

    def dim(shape, i, field):
        if shape is not None and -len(shape) <= i < len(shape) and _is_int(shape[i]):
            _need(shape[i] == model[field], f"model.{field} is {model[field]} but the graphs say {shape[i]}")

    for name in ("past_key_0", "past_value_0"):
        if len(dec.get(name) or []) == 4:
            dim(dec[name], 1, "num_kv_heads")
            dim(dec[name], 3, "head_dim")
    dim(dec.get("inputs_embeds"), -1, "hidden_size")
    dim(dec.get("deepstack_embeds"), 0, "num_deepstack")
    dim(dec_out.get("logits"), -1, "vocab_size")
    n_vis = sum(bool(re.fullmatch(r"deepstack_\d+", v["name"])) for v in m["graphs"]["vision"]["outputs"])
    _need(n_vis == model["num_deepstack"], f"model.num_deepstack is {model['num_deepstack']} but the vision graph has {n_vis}")
    _need(m["embedding"]["shape"] == [model["vocab_size"], model["hidden_size"]],
          f"embedding shape {m['embedding']['shape']} is not model [vocab_size, hidden_size]")


def check_paths(artifact: Path, m: dict) -> None:
    """Every path the manifest names stays inside the artifact directory; no unrecorded side file."""
    w = m["weights"]
    if w.get("layout") == integrity.OBJECTS_LAYOUT:  # each object is checked to be a regular file when read
        integrity.contained(artifact, w["dir"], "weight object directory")
    else:
        integrity.contained(artifact, w["file"], "weight store")
    for where, graphs in (("graph", m["graphs"]), ("optimized graph", (m.get("ort_optimized") or {}).get("graphs", {}))):
        for g in graphs.values():
            integrity.contained(artifact, g["file"], where)
    for name in (*m["side_files"], *SIDE_FILES):
        p = integrity.contained(artifact, name, "side file")
        if p.is_file() and name not in m["side_files"]:
            raise QvlError(f"artifact side file {name} is not recorded in the manifest (added or modified after export)",
                           hint="remove it, or re-export the artifact")


def check_manifest(raw, where: str = MANIFEST) -> None:
    """Format name, schema version, field types and model-vs-signature agreement of a parsed manifest."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise QvlError(f"{where} is not a qvl-compile manifest")
    version = raw.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise QvlError(
            f"artifact format version {str(version)[:40]} is not supported (this qvl-compile reads "
            f"{' and '.join(map(str, READ_VERSIONS))})",
            hint="re-export the checkpoint with this qvl-compile version",
        )
    try:
        check_schema(raw)
        check_model(raw)
    except _Bad as exc:
        raise QvlError(f"corrupt manifest {where}: {str(exc)[:300]}",
                       hint="the manifest was edited or is not from this qvl-compile; re-export the artifact") from None
