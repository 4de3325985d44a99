"""Versions that travel with artefacts; bump BUNDLE_FORMAT when the bundle layout changes."""

__version__ = "0.1.0"
BUNDLE_FORMAT = 2  # 2: adds model.int8-cpu.onnx
READABLE_FORMATS = (1, 2)  # format 1 is format 2 without the CPU int8 model
