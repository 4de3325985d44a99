"""ONNX / INT8 / TensorRT export of a trained MSN (imports torch)."""
