"""ONNX / INT8 / TensorRT export of a trained MSN (its modules import torch; this file does not)."""

# What `msn-edge export --format` writes: the bundle, or the bundle and a TensorRT engine
# built here. Here, not in pack.py, so that the CLI's --help needs no torch.
FORMATS = ("onnx", "engine")
