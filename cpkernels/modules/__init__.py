"""Layer 7, the ``nn.Module`` layers: drop-in replacements for ``nn.Conv2d`` that hold factors.

- :mod:`cpkernels.modules.factored`: ``FactoredConv2d``, what every factored conv shares with ``nn.Conv2d``;
- :mod:`cpkernels.modules.cp`: ``CPConv2d``;
- :mod:`cpkernels.modules.tucker2`: ``TuckerConv2d``;
- :mod:`cpkernels.modules.svd`: ``SVDConv2d``, a low-rank 1x1 conv.
"""
