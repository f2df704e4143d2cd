"""`qvl-compile bench --peer llama.cpp`: GGUF conversion of the tiny checkpoint, the parsers of llama.cpp's output
(on output captured from real runs: tests/data/llamacpp/), the CLI contract, and (slow) the whole build + bench path.

The conversion test needs llama.cpp's converter: the vendored tree of the llama-cpp-python sdist, fetched with pip
into the user cache once (`peer_llamacpp.fetch_source`); it is skipped, saying so, only when that download fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from qvl.errors import QvlError

DATA = Path(__file__).parent / "data" / "llamacpp"


@pytest.fixture(scope="module")
def llama_source() -> Path:
    from qvl.toolchain.eval.peer_llamacpp import cache_root, fetch_source

    try:
        return fetch_source(cache_root())
    except QvlError as exc:  # no network to PyPI and nothing cached
        pytest.skip(f"llama.cpp converter source unavailable: {exc}")


def _expected_text_tensors(cfg: dict) -> int:
    # per decoder layer: attn_norm, q, k, v, o, q_norm, k_norm, ffn_norm, gate, up, down; + token_embd, output_norm
    # (tied embeddings: no separate output matrix)
    return 11 * cfg["text_config"]["num_hidden_layers"] + 2


def _expected_mmproj_tensors(cfg: dict) -> int:
    v = cfg["vision_config"]
    # per block: norm1/norm2/qkv/proj/fc1/fc2, weight + bias each; patch embed: 2 temporal halves + bias; the
    # position embedding; the merger and each deepstack merger: norm, fc1, fc2 (weight + bias)
    return 12 * v["depth"] + 3 + 1 + 6 * (1 + len(v["deepstack_visual_indexes"]))


def test_tiny_checkpoint_converts_to_gguf(tiny_checkpoint, llama_source, tmp_path):
    from qvl.toolchain.eval.peer_gguf import checkpoint_digest, ensure_ggufs, gguf_summary, qwen2_pre_tokenizer
    from qvl.toolchain.eval.peer_llamacpp import VERSION

    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert qwen2_pre_tokenizer(tiny_checkpoint)
    got = ensure_ggufs(tiny_checkpoint, llama_source, "Q8_0", tmp_path, None, VERSION)
    assert got["cached"] == {"text": False, "mmproj": False}
    assert set(got["seconds"]) == {"convert_text", "convert_mmproj"}
    assert got["digest"] == checkpoint_digest(tiny_checkpoint)

    text = gguf_summary(Path(got["text"]), llama_source)
    assert text["architecture"] == "qwen3vl"
    assert text["tensors"] == _expected_text_tensors(cfg) == 46
    assert text["vocab_size"] == cfg["text_config"]["vocab_size"]
    assert text["tokenizer_pre"] == "qwen2"
    assert set(text["tensor_types"]) == {"Q8_0", "F32"}  # matrices Q8_0, norms F32
    assert text["tensor_types"]["F32"] == 4 * cfg["text_config"]["num_hidden_layers"] + 1
    # the pre-tokenizer really was unknown to the converter's hash table: the wrapper's mapping ran
    assert "qvl: pre-tokenizer hash unknown" in (Path(got["dir"]) / "convert.log").read_text()

    mm = gguf_summary(Path(got["mmproj"]), llama_source)
    assert mm["architecture"] == "clip" and mm["projector_type"] == "qwen3vl_merger"
    assert mm["tensors"] == _expected_mmproj_tensors(cfg) == 100
    assert set(mm["tensor_types"]) == {"F16", "F32"}

    # a second call is served from the cache, keyed by the checkpoint's digest
    again = ensure_ggufs(tiny_checkpoint, llama_source, "Q8_0", tmp_path, None, VERSION)
    assert again["cached"] == {"text": True, "mmproj": True} and again["seconds"] == {}
    assert again["text"] == got["text"]


def test_checkpoint_digest_and_pre_tokenizer_check(tiny_checkpoint, tmp_path):
    from qvl.toolchain.eval.peer_gguf import checkpoint_digest, qwen2_pre_tokenizer

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    assert checkpoint_digest(copy) == checkpoint_digest(tiny_checkpoint)
    (copy / ".qvl-output.json").write_text("{}")  # hidden files are not part of the checkpoint
    assert checkpoint_digest(copy) == checkpoint_digest(tiny_checkpoint)
    cfg = copy / "generation_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert checkpoint_digest(copy) != checkpoint_digest(tiny_checkpoint)

    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    assert not qwen2_pre_tokenizer(copy)  # only Qwen2's exact regex is mapped to "qwen2"


def test_quant_for_artifact_bits():
    from qvl.toolchain.eval.peer_gguf import quant_for_bits

    assert [quant_for_bits(b) for b in (4, 8, None)] == ["Q4_0", "Q8_0", "F32"]


# ---------------------------------------------------------------------------------------------------
# Parsers, on output captured from the real runs


def test_parse_llama_bench_json():
    from qvl.toolchain.eval.peer_run import parse_llama_bench

    raw = (DATA / "llama-bench-tiny-q4_0.json").read_text()
    got = parse_llama_bench(raw)
    rows = json.loads(raw)
    pp = next(r for r in rows if r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_prompt"] == 0)
    assert got["pp"]["tokens"] == 128 and got["tg"]["tokens"] == 64
    assert got["pp"]["samples_tok_s"] == pp["samples_ts"] and got["tg"]["samples_tok_s"] == tg["samples_ts"]
    assert got["pp"]["tok_s"] == sorted(pp["samples_ts"])[len(pp["samples_ts"]) // 2]  # median of 3
    assert got["tg"]["avg_tok_s"] == tg["avg_ts"]
    assert got["meta"]["n_threads"] == 2 and got["meta"]["model_type"].startswith("qwen3vl")
    with pytest.raises(RuntimeError, match="no pp/tg rows"):
        parse_llama_bench(json.dumps([pp]))


def test_parse_mtmd_log():
    from qvl.toolchain.eval.peer_run import parse_mtmd_log

    log = (DATA / "mtmd-cli-tiny-q4_0-native.log").read_text(errors="replace")  # the random model's bytes
    got = parse_mtmd_log(log)
    # read off the log's lines by hand: encode 2321 ms, image decode 661 ms, prompt eval 5524.07 ms / 240 tokens,
    # eval 57878.68 ms / 63 runs, 'main: loading model' at 0.06.282.320, llama_perf load time 5057.32 ms
    exp = json.loads((DATA / "mtmd-cli-tiny-q4_0-native.expected.json").read_text())
    for k, v in exp.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert got["prompt_eval_includes_vision"] is True  # 5.524 s >= 2.321 + 0.661
    assert got["prefill_tok_s"] == pytest.approx(240 / (5.52407 - 2.321))
    assert got["decode_tok_s"] == pytest.approx(63 / 57.87868)
    with pytest.raises(RuntimeError, match="llama_perf"):
        parse_mtmd_log("image decoded (batch 1/1) in 3 ms\n")
    # a llama.cpp that books the encode outside the prompt-eval span: then ttft = encode + prompt eval
    short = log.replace("prompt eval time =    5524.07 ms", "prompt eval time =    1000.00 ms")
    alt = parse_mtmd_log(short)
    assert alt["prompt_eval_includes_vision"] is False
    assert alt["ttft_s"] == pytest.approx(2.321 + 1.0) and alt["prefill_s"] == pytest.approx(1.0)


def test_parse_system_info():
    from qvl.toolchain.eval.peer_run import parse_system_info, simd_summary

    native = parse_system_info((DATA / "completion-tiny-q4_0-native.log").read_text(errors="replace"))
    avx2 = parse_system_info((DATA / "completion-tiny-q4_0-avx2.log").read_text(errors="replace"))
    assert native["n_threads"] == 2 == avx2["n_threads"]
    assert native["features"]["CPU"]["AVX512"] == 1 and "AVX512" not in avx2["features"]["CPU"]
    n, a = simd_summary(native), simd_summary(avx2)
    assert n["AVX512"] == n["AVX512_VNNI"] == n["AVX2"] == 1 and n["isa"] == "AVX-512"
    assert a["AVX512"] == a["AVX512_VNNI"] == a["AVX512_BF16"] == 0  # not listed = not built in
    assert a["AVX2"] == a["FMA"] == a["F16C"] == 1 and a["isa"] == "AVX2"
    assert parse_system_info("no such line") is None


# ---------------------------------------------------------------------------------------------------
# CLI contract


def test_cli_unknown_peer(tmp_path):
    proc = run_cli("bench", str(tmp_path / "art"), "--checkpoint", str(tmp_path / "ckpt"), "--peer", "nonsense")
    assert_one_line_error(proc, "unknown --peer 'nonsense'", "llama.cpp")


def test_cli_peer_needs_cpu(tmp_path):
    proc = run_cli("bench", str(tmp_path / "art"), "--checkpoint", str(tmp_path / "ckpt"), "--peer", "llama.cpp",
                   "--device", "cuda")
    assert_one_line_error(proc, "--peer runs llama.cpp on the CPU", "--device cpu")


def test_cli_bad_llamacpp_dir(tmp_path):
    proc = run_cli("bench", str(tmp_path / "art"), "--checkpoint", str(tmp_path / "ckpt"), "--peer", "llama.cpp",
                   env={"QVL_LLAMACPP_DIR": str(tmp_path / "nowhere")})
    assert_one_line_error(proc, "no llama.cpp build in", "llama-bench")


# ---------------------------------------------------------------------------------------------------
# The whole path (slow: builds llama.cpp once -- tens of minutes on 2 cores -- then it is cached)


@pytest.fixture(scope="module")
def tiny_int4_artifact(tiny_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "tiny-int4"
    proc = run_cli("compile", str(tiny_artifact), "--weights", "int4", "--no-budget", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_bench_with_llamacpp_peer(tiny_int4_artifact, tiny_checkpoint, tmp_path):
    from qvl.toolchain.eval.bench import run_bench
    from qvl.toolchain.eval.hardware import cpu_info

    result = run_bench(tiny_int4_artifact, tiny_checkpoint, threads=2, repeats=2, peers=("llama.cpp",),
                       text_tokens=32, new_tokens=8, bandwidth_bytes=64 << 20, bandwidth_samples=2)
    result = json.loads(json.dumps(result))
    host_avx512 = cpu_info(2)["flags"]["avx512f"]
    assert set(result["peers"]) == ({"llama.cpp", "llama.cpp-avx2"} if host_avx512 else {"llama.cpp"})
    q = result["engines"]["qvl"]
    for label, p in result["peers"].items():
        assert p["quant"] == "Q4_0" and "Q4_0" in p["gguf"]["text"]["tensor_types"]
        assert p["gguf"]["text"]["tokenizer_pre"] == "qwen2"
        assert p["simd"]["AVX2"] == 1 and p["simd"]["AVX512"] == (int(host_avx512) if label == "llama.cpp" else 0)
        assert p["system_info_threads"] == 2 == p["cases"]["text"]["meta"]["n_threads"]
        for k in ("decode_tok_s", "prefill_tok_s", "decode_tok_s_image", "prefill_tok_s_image", "ttft_image_s",
                  "vision_s", "load_s", "peak_rss_bytes", "roofline_decode_tok_s"):
            assert p[k] > 0, (label, k)
        img = p["cases"]["image"]
        assert len(img["runs"]) == 2 and all(r["decode_steps"] == 7 for r in img["runs"])  # 8 tokens: 7 booked steps
        assert p["cases"]["text"]["pp"]["tokens"] == 32 and p["cases"]["text"]["tg"]["tokens"] == 8
        assert p["ttft_text_s"] == pytest.approx(32 / p["prefill_tok_s"])
        assert img["prompt_eval_s"] >= img["vision_s"] and p["prefill_tok_s_image"] > 0
        assert p["ttft_image_s"] == pytest.approx(img["ttft_s"])
        # the same image prompt as the qvl engine: 196 visual tokens + the 32-token question + the template
        assert p["prompt_tokens_image"] == p["prompt_tokens_image_qvl"] == q["cases"]["image"]["prompt_tokens"]
        assert p["peak_rss_bytes"] == max(p["peak_rss_text_bytes"], p["peak_rss_image_bytes"])
        r = result["ratios_peers"][label]
        assert r["decode"] == pytest.approx(q["decode_tok_s"] / p["decode_tok_s"])
        assert r["ttft_image"] == pytest.approx(q["ttft_image_s"] / p["ttft_image_s"])
        assert p["decode_efficiency"] == pytest.approx(p["decode_tok_s"] / p["roofline_decode_tok_s"])
    assert len(result["loadavg"]["before"]) == 3 and len(result["loadavg"]["after"]) == 3

    from qvl.toolchain.eval.bench_report import format_bench, plot_bench

    table = format_bench(result)
    assert "qvl/peer" in table and "llama.cpp" in table and "AVX512 = " in table
    png = plot_bench(result, tmp_path / "peers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --llamacpp-dir / QVL_LLAMACPP_DIR: an existing build is taken as it is (here: the native one just used)
    from qvl.toolchain.eval.peer_llamacpp import existing_build

    native = Path(result["peers"]["llama.cpp"]["build"]["bin_dir"])
    ext = existing_build(native.parent.parent)  # a tree with build/bin/ in it
    assert ext.label == "llama.cpp" and ext.flavour == "external" and ext.bin_dir == native

    # a second bench neither rebuilds nor converts again; the CLI prints the peer table
    proc = run_cli("bench", str(tiny_int4_artifact), "--checkpoint", str(tiny_checkpoint), "--peer", "llama.cpp",
                   "--threads", "2", "--repeats", "1", "--json", env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    for p in again["peers"].values():
        assert p["build"]["cached"] is True
        assert p["gguf"]["cached"] == {"text": True, "mmproj": True} and p["gguf"]["convert_seconds"] == {}
