"""The bench's llama.cpp peer, part 2: find or build llama.cpp (`llama-bench`, `llama-mtmd-cli`, `llama-quantize`,
`llama-completion`).

Source: the llama-cpp-python sdist on PyPI vendors ggml-org/llama.cpp (`vendor/llama.cpp`: the C++ tree,
`convert_hf_to_gguf.py`, `gguf-py`). `fetch_source` gets it with pip (`pip download llama-cpp-python==VERSION
--no-deps --no-binary :all:`) and extracts it under `<cache>/src/`. `build` runs cmake (Release, static, Ninja if
present, only those four targets) into `<cache>/llama.cpp-VERSION-FLAVOUR/`, records the cmake arguments and build
seconds in `build.json`, and is skipped when a complete build with the same arguments is already there.

Flavours: `native` (`GGML_NATIVE=ON`: whatever this host's compiler sees, AVX-512 included where present) and,
only on a host with AVX-512, `avx2` (`GGML_NATIVE=OFF`, AVX/AVX2/FMA/F16C/BMI2/SSE4.2 on, every AVX-512 / VNNI /
AMX option off: the i5-10210U's ISA). `cuda` (native CPU kernels + ggml's CUDA backend for one architecture,
`QVL_CUDA_ARCH` or the first GPU's compute capability from nvidia-smi; needs nvcc; a Pascal card (61) needs a
CUDA 12 toolkit, CUDA 13 dropped it) builds `llama-bench`, `llama-quantize`, `llama-completion` and
`llama-fit-params` (its automatic `-ngl` choice for a memory margin): the GPU split anchor of benchmarks/gpu_plans.py. Which kernels a build really runs is read from the `system_info` line
llama.cpp prints (`peer_run.parse_system_info`), not assumed from the flags.

`QVL_LLAMACPP_DIR` (or `--llamacpp-dir`) points at an existing build instead: a directory holding the binaries,
or a llama.cpp tree with them in `build/bin/` (its `convert_hf_to_gguf.py` is used when it has one).
`QVL_PEER_CACHE` moves the cache (default `$XDG_CACHE_HOME/qvl/peers`, i.e. `~/.cache/qvl/peers`).
`QVL_LLAMACPP_SRC` names a llama.cpp source tree to build instead of downloading the sdist (a machine with no
package index: the lent GPU machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qvl.errors import QvlError
from qvl.toolchain.eval.peer_gguf import _locked

VERSION = "0.3.36"  # llama-cpp-python sdist whose vendor/llama.cpp is built
# llama-completion: the one of these that prints llama.cpp's `system_info` line (which SIMD kernels the build has)
TOOLS = ("llama-bench", "llama-mtmd-cli", "llama-quantize", "llama-completion")
COMMON_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
)
FLAVOURS = {
    "native": ("-DGGML_NATIVE=ON",),
    "cuda": ("-DGGML_NATIVE=ON", "-DGGML_CUDA=ON"),  # + -DCMAKE_CUDA_ARCHITECTURES (cuda_arch)
    "avx2": (
        "-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
        "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ),
}
LABELS = {"native": "llama.cpp", "avx2": "llama.cpp-avx2", "cuda": "llama.cpp-cuda"}
# the GPU build is for the text split (no vision tower on the GPU comparison): its own tool set
FLAVOUR_TOOLS = {"cuda": ("llama-bench", "llama-quantize", "llama-completion", "llama-fit-params")}


@dataclass(frozen=True)
class Build:
    """One usable llama.cpp build: its row label, binaries and the converter source that goes with it."""

    label: str
    flavour: str
    bin_dir: Path
    source: Path | None  # llama.cpp tree with convert_hf_to_gguf.py + gguf-py (None: fetch the sdist's)
    version: str
    record: dict = field(default_factory=dict)

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def cache_root() -> Path:
    env = os.environ.get("QVL_PEER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qvl" / "peers"


def flavours_for_host(cpu_flags: dict) -> list[str]:
    """native always; plus an AVX2-only build where the host has AVX-512 (else native already is AVX2)."""
    return ["native", "avx2"] if cpu_flags.get("avx512f") else ["native"]


def source_dir(cache: Path) -> Path:
    if os.environ.get("QVL_LLAMACPP_SRC"):
        return Path(os.environ["QVL_LLAMACPP_SRC"])
    return Path(cache) / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def cuda_arch() -> str:
    """The CUDA architecture a `cuda` build compiles for: QVL_CUDA_ARCH, else the first GPU's compute capability."""
    if os.environ.get("QVL_CUDA_ARCH"):
        return os.environ["QVL_CUDA_ARCH"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.split()[0]
        return out.replace(".", "")
    except (OSError, subprocess.CalledProcessError, IndexError):
        raise QvlError("cannot tell which CUDA architecture to build llama.cpp for (no nvidia-smi)",
                       hint="set QVL_CUDA_ARCH, e.g. 61 for a Pascal MX250 / GTX 10x0") from None


def fetch_source(cache: Path, progress=lambda m: None) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, downloaded with pip once."""
    src = source_dir(cache)
    if (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file():
        return src
    if os.environ.get("QVL_LLAMACPP_SRC"):
        raise QvlError(f"QVL_LLAMACPP_SRC={src} is not a llama.cpp source tree (no CMakeLists.txt / convert_hf_to_gguf.py)",
                       hint="point it at the llama.cpp directory, or unset it to download the sdist")
    base = Path(cache) / "src"
    with _locked(base / ".lock"):
        if (src / "CMakeLists.txt").is_file():
            return src
        progress(f"llama.cpp: pip download llama-cpp-python=={VERSION} (sdist)")
        dl = base / "download"
        dl.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                               "--no-binary", ":all:", "-d", str(dl)], capture_output=True, text=True)
        sdists = sorted(dl.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise QvlError(f"could not download llama-cpp-python {VERSION}: {tail[0]}",
                           hint="set QVL_LLAMACPP_DIR to an existing llama.cpp build (or check network access to PyPI)")
        staging = base / f".extract-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(staging, filter="data")
        top = staging / f"llama_cpp_python-{VERSION}"
        shutil.rmtree(base / top.name, ignore_errors=True)
        os.replace(top, base / top.name)
        shutil.rmtree(staging, ignore_errors=True)
    if not (src / "CMakeLists.txt").is_file():
        raise QvlError(f"llama-cpp-python {VERSION} sdist has no vendor/llama.cpp", hint="set QVL_LLAMACPP_DIR")
    return src


def _cmake_args(flavour: str) -> list[str]:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    arch = [f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch()}"] if flavour == "cuda" else []
    return [*gen, *COMMON_ARGS, *FLAVOURS[flavour], *arch]


def build(flavour: str, cache: Path | None = None, progress=lambda m: None, jobs: int | None = None) -> Build:
    """The `flavour` build, from the cache when complete with the same cmake arguments, else configured and built."""
    cache = Path(cache or cache_root())
    out = cache / f"llama.cpp-{VERSION}-{flavour}"
    stamp = out / "build.json"
    args = _cmake_args(flavour)
    bin_dir = out / "build" / "bin"
    tools = FLAVOUR_TOOLS.get(flavour, TOOLS)

    def cached() -> Build | None:
        try:
            rec = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("cmake_args") == args and all((bin_dir / t).is_file() for t in tools):
            return Build(LABELS[flavour], flavour, bin_dir, source_dir(cache), VERSION, {**rec, "cached": True})
        return None

    hit = cached()
    if hit:
        return hit
    for tool in ("cmake", "c++", *(("nvcc",) if flavour == "cuda" else ())):
        if not shutil.which(tool) and not (tool == "nvcc" and Path("/usr/local/cuda/bin/nvcc").is_file()):
            raise QvlError(f"building llama.cpp needs {tool} on PATH", hint="install cmake and a C++ compiler, or set QVL_LLAMACPP_DIR")
    src = fetch_source(cache, progress)
    with _locked(cache / f".build-{flavour}.lock"):
        hit = cached()
        if hit:
            return hit
        out.mkdir(parents=True, exist_ok=True)
        log = out / "build.log"
        log.write_text("")
        jobs = jobs or os.cpu_count() or 2
        t0 = time.perf_counter()
        progress(f"llama.cpp: configuring the {flavour} build")
        _run_logged(["cmake", "-S", str(src), "-B", str(out / "build"), *args], log)
        t1 = time.perf_counter()
        progress(f"llama.cpp: building the {flavour} build ({', '.join(tools)}; -j{jobs}, slow on few cores)")
        _run_logged(["cmake", "--build", str(out / "build"), "-j", str(jobs), "--target", *tools], log)
        rec = {"version": VERSION, "flavour": flavour, "cmake_args": args, "source": str(src),
               "configure_s": round(t1 - t0, 1), "build_s": round(time.perf_counter() - t1, 1), "jobs": jobs,
               "targets": list(tools), "compiler": _compiler(), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:  # an incremental rebuild (new target, changed flags): keep what the earlier builds took
            old = json.loads(stamp.read_text())
            rec["earlier_builds"] = [*old.pop("earlier_builds", []), old]
        except (OSError, ValueError):
            pass
        stamp.write_text(json.dumps(rec, indent=2) + "\n")
    return Build(LABELS[flavour], flavour, bin_dir, src, VERSION, {**rec, "cached": False})


def _compiler() -> str | None:
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return None


def _run_logged(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"llama.cpp build step failed (exit {rc}), log {log}:\n{tail}")


def existing_build(path: str | Path) -> Build:
    """A build the user points at (`--llamacpp-dir` / QVL_LLAMACPP_DIR): the binaries in PATH, PATH/bin or PATH/build/bin."""
    root = Path(path).expanduser()
    for cand in (root, root / "bin", root / "build" / "bin"):
        if all((cand / t).is_file() for t in TOOLS):
            src = next((p for p in (root, root.parent, root.parent.parent) if (p / "convert_hf_to_gguf.py").is_file()), None)
            return Build("llama.cpp", "external", cand, src, f"external-{_digest_of(cand / 'llama-bench')}",
                         {"path": str(cand), "cached": True})
    raise QvlError(f"no llama.cpp build in {root}: need {', '.join(TOOLS)} in it, in bin/ or in build/bin/",
                   hint="point --llamacpp-dir (QVL_LLAMACPP_DIR) at a llama.cpp build, or leave it unset to build one")


def _digest_of(path: Path) -> str:
    import blake3

    return blake3.blake3(path.read_bytes()).hexdigest()[:12]


def builds_for(cpu_flags: dict, llamacpp_dir: str | Path | None = None, cache: Path | None = None,
               progress=lambda m: None) -> list[Build]:
    """The builds a bench runs: the user's one, else native (+ avx2 on an AVX-512 host), built if not cached."""
    llamacpp_dir = llamacpp_dir or os.environ.get("QVL_LLAMACPP_DIR")
    if llamacpp_dir:
        return [existing_build(llamacpp_dir)]
    return [build(f, cache, progress) for f in flavours_for_host(cpu_flags)]


if __name__ == "__main__":  # `python -m qvl.toolchain.eval.peer_llamacpp [native|avx2 ...]`: build ahead of a bench
    for fl in sys.argv[1:] or ["native"]:
        b = build(fl, progress=lambda m: print(m, flush=True))
        print(json.dumps({"label": b.label, "bin_dir": str(b.bin_dir), **b.record}))
