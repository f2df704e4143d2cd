"""Training the sentinel (`train_sentinel`): batches, the training aids, the loss and the loop.

The model class, config and tokenizer are `qvl.toolchain.eval.sentinel`'s; this module only trains. Training
aids that make a ~10-minute CPU run reach >= 95% held-out exact match (none of them changes the model class
or what is saved):
  * conversations: each image's own question first (exactly the evaluation prompt), then up to three
    follow-up questions about the same image, then a "Describe the shapes." turn whose answer names each
    shape's count, colours and grid columns - dense supervision that teaches the language model to bind
    shape words to visual tokens (without it, colour/count/left questions stall at "prior" accuracy);
  * a curriculum: lone objects and single digits first, distractors ramped in;
  * a temporary linear probe classifying each merged visual token's shape/digit, colour, row and column;
  * the patch Conv3d computed as the equivalent matmul during training (CPU conv3d backward is slow).

Training is deterministic for a given seed, step count, thread count and torch build: fixed seeds, fresh
samples drawn from the train split in a fixed order, `torch.use_deterministic_algorithms(True)`,
`torch.set_num_threads(threads)`. Reproduce the committed checkpoint with

    nice -n 19 python -c "from qvl.toolchain.eval.sentinel_training import train_sentinel; \
        print(train_sentinel('toolchain/data/sentinel', overwrite=True).summary())"

Every function here needs torch, so torch and transformers ([export] extra) are imported at module level;
the rest of the sentinel (config, tokenizer, `copy_sentinel`) lives in `sentinel.py` and needs neither, and
`qvl-compile make-checkpoint --preset sentinel` imports this module only when it runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from qvl.toolchain.eval import synthetic_vqa as sv
from qvl.toolchain.eval.evaluate import eager_answer_fn, evaluate
from qvl.toolchain.eval.sentinel import SentinelArch, SentinelRecipe, write_sentinel_metadata
from qvl.toolchain.export.hf_compat import image_only_processor
from qvl.toolchain.fsutil import atomic_output_dir

DEFAULT_STEPS = 1500


@dataclass
class SentinelReport:
    out: Path
    seed: int
    steps: int
    threads: int
    num_parameters: int
    num_bytes: int
    train_seconds: float
    final_loss: float
    eval_accuracy: float | None
    eval_questions: int
    eval_by_kind: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    kind_losses: dict = field(default_factory=dict)  # per-sample training losses by question kind

    def summary(self) -> str:
        acc = "not evaluated" if self.eval_accuracy is None else (
            f"held-out accuracy {self.eval_accuracy:.4f} on {self.eval_questions} questions {self.eval_by_kind}"
        )
        return (
            f"sentinel -> {self.out}: {self.num_parameters:,} parameters, {self.num_bytes / 1e6:.1f} MB, "
            f"{self.steps} steps in {self.train_seconds:.0f}s on {self.threads} thread(s), "
            f"final loss {self.final_loss:.4f}, {acc}"
        )


class _Batcher:
    """Turns synthetic samples into model inputs with transformers' own processor and chat template.

    A training sequence is a conversation about one image: the sample's own question first (exactly
    the prompt evaluation uses), then up to `turns - 1` further questions about the same image as
    follow-up user turns. Labels cover every assistant answer and its `<|im_end|>`.
    """

    def __init__(self, processor, turns: int = 1, describe: float = 0.0):
        self.processor = processor
        self.tok = processor.tokenizer
        self.tok.padding_side = "right"
        self.turns = max(1, turns)
        self.describe = describe
        self.im_end_id = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.header = self.tok.encode("<|im_start|>assistant\n", add_special_tokens=False)

    def conversation(self, sample: dict, rng) -> list[dict]:
        """The sample's question, follow-ups, then (maybe) the description, as chat messages.

        Follow-ups never give away a later answer: the description, which names every object's
        colour and column, comes last.
        """
        qa = [(sample["question"], sample["answer"])]
        others = [(q, a) for _, q, a in sample.get("qa", [])[1:]]
        if self.turns > 1 and others:
            qa += [others[i] for i in rng.permutation(len(others))[: self.turns - 1]]
        if sample.get("description") and rng.random() < self.describe:
            qa.append((sv.DESCRIBE_QUESTION, sample["description"]))
        messages: list[dict] = []
        for i, (q, a) in enumerate(qa):
            if i == 0:
                messages += sv.messages_for(q, len(sample["images"]))
            else:
                messages.append({"role": "user", "content": [{"type": "text", "text": q}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        return messages

    def __call__(self, samples: list[dict], rng):
        convs = [self.conversation(s, rng) for s in samples]
        texts = [self.processor.apply_chat_template(c, tokenize=False) for c in convs]
        enc = self.processor(text=texts, images=[s["images"] for s in samples], padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        labels = torch.full_like(ids, -100)
        h = len(self.header)
        for i, conv in enumerate(convs):
            row = ids[i].tolist()
            answers = [m["content"][0]["text"] for m in conv if m["role"] == "assistant"]
            found = 0
            j = 0
            while j + h <= len(row):
                if row[j : j + h] == self.header:
                    start = j + h
                    end = row.index(self.im_end_id, start) + 1
                    labels[i, start:end] = ids[i, start:end]
                    if self.tok.decode(row[start : end - 1]) != answers[found]:
                        raise AssertionError(f"label span {row[start:end]} is not answer {answers[found]!r}")
                    found += 1
                    j = end
                else:
                    j += 1
            if found != len(answers):
                raise AssertionError(f"found {found} answers in a conversation of {len(answers)}")
        return dict(enc), labels


class _CellProbe:
    """Training aid: per-cell shape/colour classification from the merged visual tokens.

    A temporary linear head on `visual.merger`'s output (one token per 32x32 cell of a 128x128 scene)
    gives the vision tower dense supervision early on. The head is not part of the model or checkpoint.
    """

    def __init__(self, model, hidden: int, seed: int):
        gen = torch.Generator().manual_seed(seed + 2)
        self.n_shape = len(sv.CELL_SHAPE_CLASSES)
        self.n_colour = len(sv.CELL_COLOUR_CLASSES)
        n_out = self.n_shape + self.n_colour + 2 * sv.GRID  # + row, column of the cell
        self.head = torch.nn.Linear(hidden, n_out)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_out, hidden, generator=gen) * hidden**-0.5)
            self.head.bias.zero_()
        self.captured = None
        self.handle = model.model.visual.merger.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.captured = output

    def loss(self, samples: list[dict]):
        feats = self.captured
        cells = torch.tensor([c for s in samples for c in s["cells"]], dtype=torch.long, device=feats.device)
        if feats.shape[0] != cells.shape[0]:
            raise AssertionError("cell labels need 4x4 merged tokens per image")
        k = torch.arange(sv.GRID * sv.GRID, device=feats.device).repeat(len(samples))
        logits = self.head(feats)
        a, b, g = self.n_shape, self.n_shape + self.n_colour, sv.GRID
        return (
            F.cross_entropy(logits[:, :a], cells[:, 0])
            + F.cross_entropy(logits[:, a:b], cells[:, 1])
            + 0.5 * F.cross_entropy(logits[:, b : b + g], k // g)
            + 0.5 * F.cross_entropy(logits[:, b + g :], k % g)
        ) / 3

    def close(self):
        self.handle.remove()


def _kind_schedule(recipe: SentinelRecipe, seed: int, n: int) -> list[str]:
    kinds = [k for k, _ in recipe.kind_weights]
    w = np.array([w for _, w in recipe.kind_weights], dtype=np.float64)
    rng = np.random.default_rng(np.random.SeedSequence([0x5E47, seed]))
    return [kinds[i] for i in rng.choice(len(kinds), size=n, p=w / w.sum())]


def _lr_at(step: int, steps: int, recipe: SentinelRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
    lo = recipe.lr * recipe.min_lr_ratio
    return lo + (recipe.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class _LinearPatchEmbed:
    """Training-only speed-up: the patch Conv3d (kernel == stride) computed as the equivalent matmul.

    Same parameters, same math; CPU conv3d backward is ~10x slower than a linear layer's. The model
    class and the saved weights are untouched (the original forward is restored afterwards).
    """

    def __init__(self, model):
        self.embed = model.model.visual.patch_embed

    def __enter__(self):
        pe = self.embed

        def forward(hidden_states):
            w = pe.proj.weight
            x = hidden_states.to(w.dtype).reshape(-1, w[0].numel())
            return F.linear(x, w.reshape(w.shape[0], -1), pe.proj.bias)

        pe.forward = forward
        return self

    def __exit__(self, *exc):
        del self.embed.forward
        return False


def _difficulty(step: int, recipe: SentinelRecipe) -> float:
    if step < recipe.easy_steps:
        return 0.0
    if recipe.ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - recipe.easy_steps + 1) / recipe.ramp_steps)


def _reinit(model, gain: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and mod.weight is not model.get_input_embeddings().weight:
                std = gain / math.sqrt(mod.in_features)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)


def _loss(model, inputs: dict, labels):
    """Mean cross-entropy over answer tokens, and each sample's own mean (for per-kind monitoring)."""
    logits = model(**inputs).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    per = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    mask = (target != -100).to(per.dtype)
    loss = (per * mask).sum() / mask.sum()
    return loss, ((per * mask).sum(1) / mask.sum(1)).detach()


def train_sentinel(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    threads: int = 2,
    progress: Callable[[int, int, float], None] | None = None,
    overwrite: bool = False,
    eval_questions: int = 500,
    device: str = "cpu",
    arch: SentinelArch = SentinelArch(),
    recipe: SentinelRecipe = SentinelRecipe(),
) -> SentinelReport:
    """Train the sentinel on synthetic VQA and write it to `out_dir` as an HF checkpoint (float16 weights).

    `progress(step, steps, loss)` is called after each step. After writing, the checkpoint is evaluated
    with `evaluate.eager_answer_fn` on the first `eval_questions` held-out (test split) questions
    (0: skip), and the result is stored in sentinel_training.json and the report.
    `device` other than "cpu" (e.g. "cuda") is for quick experiments only: the committed checkpoint and
    its determinism guarantee are for CPU training.
    """
    out_dir = Path(out_dir)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    np.random.seed(seed)

    with atomic_output_dir(out_dir, overwrite=overwrite, kind="checkpoint") as tmp:
        write_sentinel_metadata(tmp, arch)
        cfg = json.loads((tmp / "config.json").read_text())
        processor = image_only_processor(tmp)
        batcher = _Batcher(processor, recipe.turns, recipe.describe)
        turn_rng = np.random.default_rng(np.random.SeedSequence([0x7A11, seed]))

        config = Qwen3VLConfig(**cfg)
        config.text_config.dtype = "float32"
        model = Qwen3VLForConditionalGeneration(config).float()
        if recipe.init_gain is not None:
            _reinit(model, recipe.init_gain, seed)
        model.train()
        model.to(device)
        num_params = sum(p.numel() for p in model.parameters())

        probe = _CellProbe(model, arch.text_hidden, seed) if recipe.aux_weight > 0 else None
        if probe is not None:
            probe.head.to(device)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
        if probe is not None:
            decay.append(probe.head.weight)
            no_decay.append(probe.head.bias)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
        )

        bs = recipe.batch_size
        kinds = _kind_schedule(recipe, seed, steps * bs)
        data_start = seed * 10_000_000
        seeds = sv.split_seeds("train", steps * bs, start=data_start)
        losses: list[float] = []
        kind_losses: dict[str, list[float]] = {k: [] for k in sv.KINDS}
        aux_losses: list[float] = []
        t0 = time.perf_counter()
        with _LinearPatchEmbed(model):
            for step in range(steps):
                diff = _difficulty(step, recipe)
                samples = [sv.make_sample(seeds[step * bs + j], kinds[step * bs + j], diff) for j in range(bs)]
                inputs, labels = batcher(samples, turn_rng)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, steps, recipe)
                loss, per_sample = _loss(model, inputs, labels.to(device))
                total = loss
                if probe is not None:
                    aux = probe.loss(samples)
                    total = loss + recipe.aux_weight * aux
                    aux_losses.append(float(aux.detach()))
                opt.zero_grad(set_to_none=True)
                total.backward()
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                for smp, l in zip(samples, per_sample.tolist()):
                    kind_losses[smp["kind"]].append(l)
                if progress:
                    progress(step + 1, steps, losses[-1])
        train_seconds = time.perf_counter() - t0
        if probe is not None:
            probe.close()
        model.to("cpu")

        state = {
            k: v.detach().to(torch.float16).contiguous()
            for k, v in model.state_dict().items()
            if k != "lm_head.weight"
        }
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        del model, opt

        eval_acc, by_kind = None, {}
        if eval_questions:
            report = evaluate(eager_answer_fn(tmp), sv.make_samples("test", eval_questions))
            eval_acc, by_kind = report.accuracy, report.by_kind

        final_loss = float(np.mean(losses[-20:])) if losses else float("nan")
        meta = {
            "command": "qvl.toolchain.eval.sentinel_training.train_sentinel",
            "seed": seed,
            "steps": steps,
            "threads": threads,
            "device": device,
            "arch": asdict(arch),
            "recipe": asdict(recipe),
            "num_parameters": num_params,
            "train_seconds": round(train_seconds, 1),
            "final_loss": final_loss,
            "loss_every_50_steps": [round(x, 4) for x in losses[::50]],
            "aux_loss_every_50_steps": [round(x, 4) for x in aux_losses[::50]],
            "loss_by_kind_last_10pct": {
                k: round(float(np.mean(v[-max(1, len(v) // 10) :])), 4) for k, v in kind_losses.items() if v
            },
            "eval": {"split": "test", "questions": eval_questions, "accuracy": eval_acc, "by_kind": by_kind},
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        (tmp / "sentinel_training.json").write_text(json.dumps(meta, indent=2))

    return SentinelReport(
        out=out_dir,
        seed=seed,
        steps=steps,
        threads=threads,
        num_parameters=num_params,
        num_bytes=num_bytes,
        train_seconds=train_seconds,
        final_loss=final_loss,
        eval_accuracy=eval_acc,
        eval_questions=eval_questions,
        eval_by_kind=by_kind,
        losses=losses,
        kind_losses=kind_losses,
    )
