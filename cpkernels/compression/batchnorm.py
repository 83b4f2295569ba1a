"""BatchNorm folding: each conv followed by a BatchNorm2d that only it feeds becomes one conv, before any
decomposition. In eval mode a BatchNorm2d is an affine map per output channel; decomposing the conv alone
minimises an error that the BatchNorm then rescales channel by channel, while the folded conv's decomposition
minimises the error that reaches the next layer (AIMET folds before it compresses for the same reason).

The pairs come from a ``torch.fx`` trace where the model traces, and otherwise from ``nn.Sequential``
adjacency. The arithmetic is torch's own ``fuse_conv_bn_eval``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cpkernels.compression.convs import names_by_module, replace_everywhere


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) names from a trace: the BatchNorm's input is the conv's output and nothing else reads
    that output. A BatchNorm that several convs (or calls) feed is refused: it can fold into none of them."""
    graph = torch.fx.symbolic_trace(model).graph
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for target, nodes in calls.items():
        if not isinstance(model.get_submodule(target), nn.BatchNorm2d):
            continue
        sources = [n.args[0] for n in nodes]
        convs = [s for s in sources if isinstance(s, torch.fx.Node) and s.op == "call_module"
                 and type(model.get_submodule(s.target)) is nn.Conv2d]
        if len(nodes) > 1 and convs:
            raise ValueError(f"BatchNorm2d {target!r} is fed by {len(nodes)} calls "
                             f"({', '.join(sorted({str(s.target) for s in convs}))}, ...): it cannot be folded into "
                             "any one conv; give each conv its own BatchNorm2d or fold_batchnorm=False")
        if len(convs) == 1 and len(convs[0].users) == 1 and len(calls[convs[0].target]) == 1:
            pairs.append((convs[0].target, target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) names of consecutive children of every ``nn.Sequential``, each module used once."""
    uses = names_by_module(model)
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and len(uses[id(conv)]) == 1 \
                    and len(uses[id(bn)]) == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (conv name, BatchNorm2d name) pairs :func:`fold_batchnorm` folds."""
    try:
        return _traced_pairs(model)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError):
        # Models with data-dependent control flow do not trace: their nn.Sequential blocks still can.
        return _sequential_pairs(model)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """``model`` with every conv that a BatchNorm2d follows (and only it feeds) folded with it, the BatchNorm an
    ``nn.Identity``; and the folded pairs. ``model`` must be in eval mode: a BatchNorm in training mode
    normalises by batch statistics, which no conv can hold. The input model is untouched unless ``inplace``."""
    training = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    if training:
        raise RuntimeError(f"fold_batchnorm needs the model in eval mode (call model.eval()): BatchNorm2d "
                           f"{training[0]!r} is in training mode, and batch statistics cannot be folded into a conv")
    pairs = batchnorm_pairs(model)
    if not inplace:
        model = copy.deepcopy(model)
    names = names_by_module(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        was_training = conv.training  # a conv's flag changes nothing it computes; torch's fusion wants it off
        fused = fuse_conv_bn_eval(conv.train(False), bn).train(was_training)
        conv.train(was_training)
        replace_everywhere(model, names[id(conv)], fused)
        replace_everywhere(model, names[id(bn)], nn.Identity())
    return model, pairs
