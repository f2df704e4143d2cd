"""Torch-free runtime: load an artifact and answer image+text prompts.

Imports only numpy, onnxruntime, tokenizers, Pillow and jinja2, so the laptop install stays small.
"""

from qvl.runtime.model import GenerationResult, GenerationStats, Model, load

__all__ = ["GenerationResult", "GenerationStats", "Model", "load"]
