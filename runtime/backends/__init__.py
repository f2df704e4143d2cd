"""Runtime backends behind one runner protocol (`base.Runner`): ONNX Runtime on CPU or CUDA (`ort`), TensorRT
engine kits (`tensorrt`); `select` picks one for a `device` ("auto" | "cpu" | "cuda" | "trt").

Backend modules import their libraries themselves (onnxruntime, tensorrt + cuda-python), so importing this
package loads none of them.
"""

from qvl.runtime.backends.base import Runner

__all__ = ["Runner"]
