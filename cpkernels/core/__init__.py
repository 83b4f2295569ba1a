"""Layer 1, the core: what every other layer reads and which imports nothing else of the package.

- :mod:`cpkernels.core.conv_args`: conv argument handling in PyTorch's terms (pairs, padding, output sizes, layouts);
- :mod:`cpkernels.core.switches`: the environment switches, read at call time;
- :mod:`cpkernels.core.cost`: the one MAC and byte model of a layer (dense, CP, Tucker-2);
- :mod:`cpkernels.core.timing`: the one timer (wall-clock medians on the CPU, CUDA events on a GPU).
"""
