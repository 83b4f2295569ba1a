"""Keep the dense conv where the factored layer is not faster *inside the network*.

``compress_model(..., keep_dense_where_faster=True)`` and a latency plan time each layer alone, on a random input of
its shape. Inside the network a layer runs after the layers before it, on the memory, cache and allocator state they
leave, and on HED's conv2_1 (R = 192 of 64 -> 128 channels, NCHW, 2-core AMD EPYC) that moved the winner: the CP
layer won alone and ran 66 against 58 ms dense in the network (README, channels_last on the CPU). With
``keep_dense_where_faster="network"`` the compressed model is timed as a whole, on the example inputs, with every
factored layer and then with every original conv in its place, the two taking turns; each layer stays factored
only where it was faster than its conv there by :data:`cpkernels.dispatch.measured.DENSE_MARGIN`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from cpkernels.compression.convs import eval_mode, replace_everywhere
from cpkernels.compression.families import family_of_layer
from cpkernels.core.conv_args import is_channels_last
from cpkernels.core.timing import seconds_in_forward
from cpkernels.dispatch.measured import fastest_keeping_dense

# Forward passes of each form: a whole network's pass is long (tenths of a second at 416x640 on the CPU), so a few
# rounds give a stable median, as in the benchmarks.
REPEATS = 5


def keep_dense_where_slower_in_network(model: nn.Module, originals: Mapping[str, tuple[nn.Module, Sequence[str]]],
                                       example_inputs: Sequence, repeats: int = REPEATS) -> dict[str, str]:
    """Put back, in ``model``, the original conv of each factored layer that was not faster than it inside
    ``model(*example_inputs)``: ``originals`` maps the layer's name to ``(its conv, every name the conv had)``
    (a shared conv is put back under each). Returns ``{name: why}`` for the convs put back. The model's own mode
    and every other module are left as they were."""
    factored = {name: model.get_submodule(name) for name in originals}
    inputs = tuple(example_inputs)

    def forward_with(which: str):
        def forward():
            for name, (conv, names) in originals.items():
                replace_everywhere(model, names, factored[name] if which == "factored" else conv)
            model(*inputs)
        return forward

    modules = {"factored": factored, "dense": {name: conv for name, (conv, _) in originals.items()}}
    try:
        with eval_mode(model), torch.no_grad():
            seconds = seconds_in_forward({"factored": forward_with("factored"), "dense": forward_with("dense")},
                                         modules, repeats)
    finally:
        for name, (_, names) in originals.items():
            replace_everywhere(model, names, factored[name])
    first = inputs[0]
    where = (f"{first.device.type}, network input {'x'.join(map(str, first.shape))}"
             f"{' channels_last' if is_channels_last(first) else ''}") if isinstance(first, torch.Tensor) else "here"
    kept = {}
    for name, (conv, names) in originals.items():
        dense_s, factored_s = seconds["dense"][name], seconds["factored"][name]
        if fastest_keeping_dense({"dense": dense_s, "factored": factored_s}, "dense") == "factored":
            continue
        replace_everywhere(model, names, conv)
        layer = factored[name]
        kept[name] = (f"dense: in the network, rank {family_of_layer(layer).rank_text(layer.rank)} ran "
                      f"{factored_s * 1e6:,.1f} µs against the dense conv's {dense_s * 1e6:,.1f} µs on {where}")
    return kept
