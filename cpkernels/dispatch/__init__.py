"""Layer 5, per-call dispatch: which backend runs one call of a factored conv, chosen from costs or by timing.

- :mod:`cpkernels.dispatch.cpu`: how the CPU path arranges a call, or whether it runs the dense conv of the
  reconstructed weight (measured once per call signature by default, or by a cost rule);
- :mod:`cpkernels.dispatch.gpu`: which strategy runs a call on a GPU (dense, the stages, or a fused kernel), by a
  roofline model of a named GPU or by measuring;
- :mod:`cpkernels.dispatch.measured`: the measuring both plans share (every candidate checked against a
  reference before it is timed).
"""
