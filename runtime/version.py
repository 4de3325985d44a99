"""Versions that travel with artefacts; bump BUNDLE_FORMAT when the bundle layout changes."""

__version__ = "0.1.0"
BUNDLE_FORMAT = 3  # 3: manifest digest, checked field types; 2: adds model.int8-cpu.onnx
READABLE_FORMATS = (3,)  # 1 and 2 have no manifest digest: re-export them
