"""qvl-compile: ahead-of-time compile toolchain and runtime for Qwen3-VL on 2019-class laptops."""

__version__ = "0.1.0"
