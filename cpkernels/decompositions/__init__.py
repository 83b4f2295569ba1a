"""Layer 3, the decompositions of a conv weight into factors (:mod:`cpkernels.factors`):

- :mod:`cpkernels.decompositions.als`: CP-ALS with GEMM MTTKRPs (TensorLy's initialisation and update rule);
- :mod:`cpkernels.decompositions.cp`: CP per group, rank policies, guards, input whitening -> ``CPFactors``;
- :mod:`cpkernels.decompositions.tucker2`: Tucker-2 by partial HOOI, rank policies -> ``Tucker2Factors``.
"""
