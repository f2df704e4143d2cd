"""Torch-free runtime: load an artifact and answer image+text prompts.

Imports only numpy, onnxruntime, tokenizers, Pillow and jinja2, so the laptop install stays small.
"""

from qvl.runtime.model import GenerationResult, GenerationStats, Model, Session, load
from qvl.runtime.prefix_cache import ImageCache, PrefixCache

__all__ = ["GenerationResult", "GenerationStats", "ImageCache", "Model", "PrefixCache", "Session", "load"]
