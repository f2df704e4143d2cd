"""Parity of an artifact against eager PyTorch on a fixed suite (`qvl-compile parity`).

Cases: text-only; one image at three sizes/aspect ratios; two images in one prompt; a chunked prefill;
each decoding 32 greedy steps. For every case the report has the max |logit difference| of every step,
whether the greedy token sequences are identical, and (for image cases) the max difference of the
image embeddings and DeepStack features. `passed` holds only when every threshold holds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qvl.artifacts.manifest import read_manifest
from qvl.errors import QvlError
from qvl.runtime.model import Model
from qvl.toolchain.eval.reference import EagerReference
from qvl.toolchain.export.checkpoint_io import validate_checkpoint
from qvl.toolchain.export.exporter import checkpoint_fingerprint

LOGIT_TOL = 1e-4
VISION_TOL = 1e-4
DECODE_STEPS = 32


@dataclass
class CaseResult:
    name: str
    prompt_tokens: int
    eager_tokens: list[int]
    artifact_tokens: list[int]
    step_max_abs_diff: list[float]
    greedy_identical: bool
    max_abs_logit_diff: float
    vision_max_abs_diff: float | None = None
    passed: bool = False


@dataclass
class ParityReport:
    artifact: str
    checkpoint: str
    logit_tolerance: float
    vision_tolerance: float
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    # whether `checkpoint` is the one the artifact was compiled from (manifest source sha256); None: unknown
    source_matches: bool | None = None
    source_sha256: str | None = None
    checkpoint_sha256: str | None = None
    # the LoRA adapter the artifact merged and the oracle applied through PEFT (name, path, digest, scale); None: none
    adapter: dict | None = None

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def gradient_picture(w: int, h: int, phase: int = 0) -> Image.Image:
    """A deterministic w x h test picture: colour gradients (blue channel shifted by `phase`), a red disc
    and a blue square. The parity suite's images and the bench's image."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 37 + phase) % 256], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.1, h * 0.1, w * 0.45, h * 0.5], fill=(220, 30, 30))
    d.rectangle([w * 0.55, h * 0.5, w * 0.9, h * 0.9], fill=(30, 30, 220))
    return img


def suite_images(folder: Path) -> dict[str, Path]:
    """Deterministic test images: smooth gradients with shapes, at three sizes/aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {"square": (224, 224), "wide": (480, 120), "tall": (150, 330)}
    out = {}
    for i, (name, (w, h)) in enumerate(specs.items()):
        path = folder / f"{name}.png"
        gradient_picture(w, h, phase=i * 60).save(path)
        out[name] = path
    return out


def suite_cases(images: dict[str, Path]) -> list[tuple[str, list[dict], int]]:
    """(name, messages, prefill chunk) for every parity case."""

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def img(name):
        return {"type": "image", "image": str(images[name])}

    def text(t):
        return {"type": "text", "text": t}

    big = 1 << 30
    return [
        ("text-only", user(text("Describe a sunny day at the beach in two sentences.")), big),
        ("image-square", user(img("square"), text("What shapes are in the picture?")), big),
        ("image-wide", user(img("wide"), text("What colour is the circle?")), big),
        ("image-tall", user(img("tall"), text("Is the square below the circle?")), big),
        ("two-images", user(img("square"), img("wide"), text("Compare the two images.")), big),
        ("chunked-prefill", user(img("tall"), text("Describe this image.")), 16),
    ]


def vision_diff(eager, model, prompt) -> float:
    """Max |diff| of image embeddings and every DeepStack feature, eager vs the artifact's vision graph."""
    import torch  # [export] extra; this module also serves torch-free callers (suite_images, suite_cases)

    emb, ds = model.engine.encode_images(prompt.pixel_values, prompt.image_grid_thw)
    with torch.inference_mode():
        ref = eager.model.model.visual(
            torch.from_numpy(prompt.pixel_values), grid_thw=torch.from_numpy(prompt.image_grid_thw)
        )
    diffs = [np.abs(emb - ref.pooler_output.numpy()).max()]
    diffs += [np.abs(a - b.numpy()).max() for a, b in zip(ds, ref.deepstack_features)]
    return float(max(diffs))


def source_check(artifact: Path, checkpoint: Path, warn=None) -> tuple[bool | None, str | None, str]:
    """(matches, artifact's source sha256, checkpoint's sha256): the checkpoint's fingerprint against the
    manifest's `source.sha256`. A mismatch prints one `warning:` line (to stderr unless `warn` is given):
    parity against another checkpoint still runs, but its numbers say nothing about this artifact's export."""
    source = read_manifest(Path(artifact), verify_graphs=False).source
    expected = source.sha256 or None
    actual = checkpoint_fingerprint(validate_checkpoint(Path(checkpoint)))
    matches = None if expected is None else expected == actual
    if matches is False:
        msg = (f"warning: checkpoint {checkpoint} is not the one this artifact was compiled from (artifact source "
               f"sha256 {expected[:16]}... from {source.checkpoint or '?'}, this checkpoint {actual[:16]}...); "
               "parity compares two different models")
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    return matches, expected, actual


def lora_adapter_of(artifact: Path, lora: Path | None):
    """The LoRA adapter the oracle must apply for `artifact` (None when its manifest records none)."""
    section = read_manifest(Path(artifact), verify_graphs=False).adapter
    if section is None:
        if lora is not None:
            raise QvlError(f"{artifact} has no LoRA adapter merged (its manifest records none)",
                           hint="drop --lora, or check an artifact compiled with `compile --lora`")
        return None
    from qvl.toolchain.export.lora import adapter_for_artifact

    return adapter_for_artifact(section, lora)


def run_parity(
    artifact: Path,
    checkpoint: Path,
    work_dir: Path,
    steps: int = DECODE_STEPS,
    logit_tol: float = LOGIT_TOL,
    vision_tol: float = VISION_TOL,
    threads: int | None = None,
    progress=None,
    device: str = "cpu",
    lora: Path | None = None,
) -> ParityReport:
    """`lora`: the adapter directory of an artifact compiled with `--lora` (default: the path its manifest
    records); its digest must be the recorded one, and the oracle applies it through PEFT with the recorded scale."""
    t0 = time.perf_counter()
    adapter = lora_adapter_of(artifact, lora)
    matches, expected, actual = source_check(artifact, checkpoint)
    eager = EagerReference(checkpoint, threads=threads, lora=adapter)
    model = Model(Path(artifact), device=device, threads=threads)
    report = ParityReport(str(artifact), str(checkpoint), logit_tol, vision_tol, source_matches=matches,
                          source_sha256=expected, checkpoint_sha256=actual,
                          adapter=None if adapter is None else {"name": adapter.name, "path": str(adapter.path),
                                                                "digest": adapter.digest, "scale": adapter.scale})
    cases = suite_cases(suite_images(work_dir))
    for i, (name, messages, chunk) in enumerate(cases):
        if progress:
            progress(name, i, len(cases))
        ref = eager.answer(messages, max_new_tokens=steps)
        prompt = model.prepare(messages)
        if not np.array_equal(prompt.input_ids, ref.prompt_ids):
            raise AssertionError(f"{name}: runtime prompt ids differ from transformers' processor")
        out = list(model.generate_ids(prompt, steps, keep_logits=True, prefill_chunk=chunk))
        ids = [t for t, _ in out]
        diffs = [float(np.abs(l - r).max()) for (_, l), r in zip(out, ref.step_logits)]
        if len(out) != len(ref.step_logits):  # different stop points count as a failure of every extra step
            diffs.append(float("inf"))
        vdiff = vision_diff(eager, model, prompt) if prompt.num_images else None
        res = CaseResult(
            name=name,
            prompt_tokens=len(prompt),
            eager_tokens=ref.token_ids,
            artifact_tokens=ids,
            step_max_abs_diff=diffs,
            greedy_identical=ids == ref.token_ids,
            max_abs_logit_diff=max(diffs) if diffs else 0.0,
            vision_max_abs_diff=vdiff,
        )
        res.passed = res.greedy_identical and res.max_abs_logit_diff <= logit_tol and (vdiff is None or vdiff <= vision_tol)
        report.cases.append(res)
    report.seconds = time.perf_counter() - t0
    return report
