"""Layer 9, export: a compressed model as standard ONNX.

- :mod:`cpkernels.export.forms`: how each factored layer is written, chosen by timing whole models in ONNX Runtime;
- :mod:`cpkernels.export.onnx`: ``export_onnx``, checked.
"""
