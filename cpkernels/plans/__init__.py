"""The choices this package makes from costs, built on the cost model of :mod:`cpkernels.cost`:

- :mod:`cpkernels.plans.cpu`: how the CPU path arranges a call, or whether it runs the dense conv of the
  reconstructed weight (measured once per call signature by default, or by a cost rule);
- :mod:`cpkernels.plans.gpu`: which strategy runs a call on a GPU (dense, four-stage, or one of the
  fused kernels), by a roofline model of a named GPU or by measuring;
- :mod:`cpkernels.plans.measured`: the timing both plans' measured modes share (every candidate checked
  against a reference first);
- :mod:`cpkernels.plans.ranks`: which rank each conv of a network gets for a budget (``plan_ranks``).
"""
