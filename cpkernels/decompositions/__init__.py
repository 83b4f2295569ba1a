"""Layer 3, the decompositions of a conv weight into factors (:mod:`cpkernels.factors`):

- :mod:`cpkernels.decompositions.als`: CP-ALS with GEMM MTTKRPs (TensorLy's initialisation and update rule);
- :mod:`cpkernels.decompositions.cp`: CP per group, rank policies, guards, input whitening -> ``CPFactors``;
- :mod:`cpkernels.decompositions.tucker2`: Tucker-2 by partial HOOI, rank policies -> ``Tucker2Factors``;
- :mod:`cpkernels.decompositions.svd`: the truncated SVD of a 1x1 conv, rank policies -> ``SVDFactors``.
"""
