"""The runner protocol: the few calls `runtime.model.Model` makes on a backend.

Every backend (`ort.Engine` for ONNX Runtime on CPU or CUDA, `tensorrt.TrtEngine` for TensorRT engine kits)
implements exactly these, with the same parameters (tests/test_backends.py checks the signatures), so `Model`
drives any of them. A cache object has at least `length` (the positions it holds). `select.py` decides which one a
`device` gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qvl.artifacts.schema import Manifest, ModelInfo


@runtime_checkable
class Runner(Protocol):
    """One loaded artifact (or engine kit) on one device."""

    artifact: Path  # the artifact directory: Model reads its chat template, tokenizer and generation_config
    manifest: Manifest  # validated, digests checked
    model_info: ModelInfo  # Model reads spatial_merge_size; backends read the dimensions
    context_length: int  # most positions a cache can hold
    kv_mode: str  # "concat" | "shared" (ORT) | "trt-pingpong" (TensorRT)
    device: str  # "cpu" | "cuda" | "trt": where it runs
    # Most positions one `verify_step` takes (speculative decoding); 0 when the decoder returns the last position's
    # logits only (artifacts exported before the decoder's `logit_positions` input): then `verify_step` raises.
    max_verify_positions: int

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [..., H] (fp32) for integer ids."""
        ...

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The vision encoder: (image embeddings [N, H], DeepStack features, one [N, H] per DeepStack layer)."""
        ...

    def new_cache(self, capacity: int, batch: int = 1) -> Any:
        """An empty KV cache able to hold `capacity` positions (prompt + new tokens)."""
        ...

    def step(self, cache: Any, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             deepstack: np.ndarray | None = None) -> np.ndarray:
        """Run S new positions ([B, S, H], position ids [3, B, S], DeepStack [n_ds, B, S, H] or None) through
        the decoder, extend `cache`; return the last position's logits [B, V]."""
        ...

    def greedy_step(self, cache: Any, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step`, but return the last position's argmax ids [B] (int64; first index on ties) instead of the
        logits, so a device backend can keep the logits on the device (greedy decoding)."""
        ...

    def verify_step(self, cache: Any, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """`step`, but return the argmax ids [B, S] (int64; first index on ties) after EVERY one of the S positions:
        `ids[:, i]` is the greedy choice for the position after input position i (speculative decoding verifies
        S - 1 drafted tokens in one step with it, then `truncate`s the cache back to what it accepted). Raises a
        `QvlError` (before running anything) when `max_verify_positions` is 0."""
        ...

    def truncate(self, cache: Any, length: int, capacity: int) -> Any:
        """Keep the first `length` positions of `cache` (0 <= length <= cache.length) and return a cache that holds
        them with room for at least `capacity` positions: `cache` itself when it has the room, else a new cache
        (and `cache` is freed). The prefix cache (`runtime/prefix_cache.py`) uses it before prefilling only the
        rest of a prompt. On failure `cache` is left as it was."""
        ...

    def free(self, cache: Any) -> None:
        """Release `cache`'s buffers (host or device); it is not usable afterwards."""
        ...


PROTOCOL_METHODS = ("embed", "encode_images", "new_cache", "step", "greedy_step", "verify_step", "truncate", "free")
PROTOCOL_ATTRIBUTES = ("artifact", "manifest", "model_info", "context_length", "kv_mode", "device",
                       "max_verify_positions")
