"""The bench's llama.cpp peer, part 1: the same checkpoint as GGUF files, converted once and cached.

llama.cpp's own converter (`convert_hf_to_gguf.py` and its `conversion/` package, with the `gguf-py` beside it on
`sys.path`: no extra install) runs in a child process (`python -m qvl.toolchain.eval.peer_gguf convert SRC ARGS...`).
The synthetic checkpoints' tokenizer is unknown to the converter's pre-tokenizer hash table; its pre-tokenizer is
Qwen2's split regex, so the child maps it to `qwen2` -- only when `tokenizer.json` really carries that regex --
by wrapping `TextModel.get_vocab_base_pre` before calling the converter's `main()` (the vendored file is untouched).

What is made (`ensure_ggufs`), under `<cache>/gguf/<checkpoint digest>-llama.cpp-<version>/`:

* `text-Q4_0.gguf`: converter `--outtype f16`, then `llama-quantize ... Q4_0` (its default mix: the tied
  `token_embd`/output matrix becomes Q6_K, norms stay F32; the tensor types are reported);
* `text-Q8_0.gguf`: converter `--outtype q8_0`; `text-F32.gguf`: `--outtype f32`;
* `mmproj-F16.gguf`: converter `--mmproj --outtype f16` (the vision tower and merger).

The digest is blake3 over every (non-hidden) file of the checkpoint, name and content, so a changed checkpoint
converts again and an unchanged one never does.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from qvl.errors import QvlError

# llama.cpp's Qwen2 pre-tokenizer regex (what `tokenizer.ggml.pre = "qwen2"` selects in llama-vocab.cpp)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# quant label -> how the text GGUF is made: (converter --outtype, llama-quantize type or None)
TEXT_QUANTS = {"Q4_0": ("f16", "Q4_0"), "Q8_0": ("q8_0", None), "F32": ("f32", None)}
MMPROJ_TYPE = "f16"


def quant_for_bits(bits: int | None) -> str:
    """The GGUF type an artifact is compared with: int4 -> Q4_0, int8 -> Q8_0, unquantized (fp32) -> F32."""
    return {4: "Q4_0", 8: "Q8_0"}.get(bits or 0, "F32")


def checkpoint_digest(checkpoint: Path) -> str:
    """blake3 over the checkpoint's non-hidden files (relative name, size and content digest of each)."""
    import blake3

    top = blake3.blake3()
    for f in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        rel = f.relative_to(checkpoint).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if f.stat().st_size:
            h.update_mmap(str(f))
        top.update(f"{rel}\0{f.stat().st_size}\0{h.hexdigest()}\n".encode())
    return top.hexdigest()


def qwen2_pre_tokenizer(checkpoint: Path) -> bool:
    """Whether `tokenizer.json`'s pre-tokenizer is Qwen2's: a Split on QWEN2_SPLIT, then byte-level (no regex)."""
    try:
        pre = json.loads((Path(checkpoint) / "tokenizer.json").read_text())["pre_tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds != ["Split", "ByteLevel"]:
        return False
    return (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT and steps[1].get("use_regex") is False


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    t = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {rc}), log {log}:\n{tail}")
    return time.perf_counter() - t


def convert(source: Path, checkpoint: Path, out: Path, outtype: str, *, mmproj: bool, log: Path,
            threads: int = 2) -> float:
    """One converter run in a child process (written to `out.part`, renamed when complete); its seconds."""
    part = out.with_name(out.name + ".part")
    part.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "qvl.toolchain.eval.peer_gguf", "convert", str(source), str(checkpoint),
           "--outtype", outtype, "--outfile", str(part), *(["--mmproj"] if mmproj else [])]
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    seconds = _run(cmd, log, env)
    os.replace(part, out)
    return seconds


def ensure_ggufs(checkpoint: Path, source: Path, quant: str, cache: Path, quantize_bin: Path | None,
                 version: str, progress=lambda m: None) -> dict:
    """The text GGUF of `quant` and the F16 mmproj for `checkpoint`, converted now or found in the cache.

    Returns {"dir", "digest", "text", "mmproj", "seconds": {what: s}, "cached": {what: bool}}.
    """
    if quant not in TEXT_QUANTS:
        raise QvlError(f"unknown GGUF type {quant!r}", hint=", ".join(TEXT_QUANTS))
    checkpoint = Path(checkpoint)
    digest = checkpoint_digest(checkpoint)
    d = Path(cache) / "gguf" / f"{digest[:24]}-llama.cpp-{version}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "convert.log"
    text, mmproj = d / f"text-{quant}.gguf", d / f"mmproj-{MMPROJ_TYPE.upper()}.gguf"
    seconds: dict = {}
    cached = {"text": text.is_file(), "mmproj": mmproj.is_file()}
    if not (text.is_file() and mmproj.is_file()):
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it for every Qwen checkpoint
            raise QvlError("llama.cpp's GGUF converter needs the sentencepiece package",
                           hint="pip install 'qvl-compile[bench-peers]' (or: pip install sentencepiece)")
    with _locked(d / ".lock"):
        if not text.is_file():
            outtype, qtype = TEXT_QUANTS[quant]
            if qtype is None:
                progress(f"llama.cpp: converting the checkpoint to GGUF {quant}")
                seconds["convert_text"] = convert(source, checkpoint, text, outtype, mmproj=False, log=log)
            else:
                if quantize_bin is None:
                    raise QvlError(f"GGUF {quant} needs llama-quantize", hint="build llama.cpp first")
                mid = d / f"text-{outtype.upper()}.gguf"
                progress(f"llama.cpp: converting the checkpoint to GGUF {outtype.upper()}")
                seconds["convert_text"] = convert(source, checkpoint, mid, outtype, mmproj=False, log=log)
                progress(f"llama.cpp: llama-quantize {qtype}")
                part = text.with_name(text.name + ".part")
                seconds["quantize"] = _run([str(quantize_bin), str(mid), str(part), qtype], log)
                os.replace(part, text)
                mid.unlink()  # the 16-bit intermediate is only an input
        if not mmproj.is_file():
            progress("llama.cpp: converting the vision tower to an F16 mmproj")
            seconds["convert_mmproj"] = convert(source, checkpoint, mmproj, MMPROJ_TYPE, mmproj=True, log=log)
    (d / "checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint), "digest": digest}) + "\n")
    return {"dir": str(d), "digest": digest, "text": str(text), "mmproj": str(mmproj), "seconds": seconds,
            "cached": cached}


def gguf_summary(path: Path, source: Path) -> dict:
    """What a GGUF holds (read with the vendored gguf-py): arch, tensor count and types, bytes, vocab, pre-tokenizer.

    `tensor_bytes` is the sum of every tensor's data; for a text model that is also what one decode step reads
    (the tied token_embd doubles as the output matrix and is counted once; the one embedding row is not).
    """
    _vendored(source)
    from gguf import GGUFReader  # the vendored copy (sys.path), not an installed one

    r = GGUFReader(str(path))

    def field(name):
        f = r.fields.get(name)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = field("general.architecture")
    types: dict[str, int] = {}
    total = 0
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        total += int(t.n_bytes)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "architecture": arch,
        "file_type": field("general.file_type"),
        "tensors": len(r.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tensor_bytes": total,
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "tokenizer_pre": field("tokenizer.ggml.pre"),
        "projector_type": field("clip.projector_type"),
    }


def _vendored(source: Path) -> None:
    for p in (Path(source) / "gguf-py", Path(source)):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def _convert_main(argv: list[str]) -> int:
    """Child: llama.cpp's converter on `checkpoint`, with the Qwen2 pre-tokenizer mapping when it applies."""
    source, checkpoint, rest = Path(argv[0]), Path(argv[1]), argv[2:]
    _vendored(source)
    import convert_hf_to_gguf  # the vendored converter (imports torch, gguf-py and its conversion package)
    from conversion.base import TextModel, logger

    original = TextModel.get_vocab_base_pre
    qwen2 = qwen2_pre_tokenizer(checkpoint)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not qwen2:
                raise
            logger.warning("qvl: pre-tokenizer hash unknown, but tokenizer.json is Qwen2's split regex: using 'qwen2'")
            return "qwen2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *rest, str(checkpoint)]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "convert":
        sys.exit(_convert_main(sys.argv[2:]))
    sys.stderr.write("usage: python -m qvl.toolchain.eval.peer_gguf convert LLAMA_CPP_SRC CHECKPOINT ARGS... (internal)\n")
    sys.exit(2)
