"""Layer 8, model passes: what works on a whole network rather than one layer.

- :mod:`cpkernels.compression.convs`: the walk over a model's convs (names, input sizes, filters, replacing);
- :mod:`cpkernels.compression.families`: one object per decomposition family, which the passes ask;
- :mod:`cpkernels.compression.batchnorm`: BatchNorm folding into the convs it follows, before decomposition;
- :mod:`cpkernels.compression.calibration`: statistics of calibration batches (input second moments, sensitivities);
- :mod:`cpkernels.compression.compress`: ``compress_model``, ``CompressionReport``, ``apply_structure``;
- :mod:`cpkernels.compression.network_timing`: the convs put back where the factored layer is slower inside the
  network (``compress_model(..., keep_dense_where_faster="network")``);
- :mod:`cpkernels.compression.vbmf`: EVBMF rank estimates;
- :mod:`cpkernels.compression.ranks`: ``plan_ranks`` and ``RankPlan``: ranks for a budget on the whole network.
"""
