"""Benchmarks of exported bundles (`msn_edge.benchmarks`; `msn-edge bench` runs them).

The library, torch-free so that `msn-edge bench` runs on an edge box:
- cases: settings, rows (backend x precision) and results, as plain dataclasses
- measure: timing statistics, synthetic input, memory high-water mark, machine facts
- worker: the per-backend process, both the parent's handle and what runs inside it
- peaks: the same-precision GEMM peak each row is compared with
- op_profile: ONNX Runtime's per-node profile, aggregated; FLOPs of a graph
- report: the report as markdown
- runner: one run over every backend (`run_benchmark`), and `msn-edge bench`'s call
- eager: the PyTorch eager baseline, imported only in its own worker process

Beside them, the scripts that regenerate the committed results (`python benchmarks/X.py`):
latency, capacity, accuracy (with autoencoder), first_shot, train_throughput.
"""
