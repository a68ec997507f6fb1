"""Inference backends: the interface (base.py), in-process ONNX Runtime (onnx.py) and Triton (triton.py)."""
