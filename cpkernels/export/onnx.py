"""ONNX export of a compressed model, with standard ops only.

    cpkernels.export_onnx(model_cp, (x,), "model.onnx")          # checked, batch dimension dynamic

``torch.onnx.export`` itself works too (either exporter): while it runs, every CP layer writes itself
as standard ``Conv`` nodes (:mod:`cpkernels.ops.onnx_form`). The legacy exporter folds the factors'
reshapes into the conv weights; the ``torch.export``-based one folds them only for factors under 8192
elements and leaves Transpose/Reshape nodes on the larger ones' initializers (ONNX Runtime folds those
when it loads the model). This helper folds every one, then checks what a deployment wants: only
default-domain ONNX ops and no functions, every ``Conv`` weight and bias an initializer,
``onnx.checker`` at the pinned opset, and the model left as it was (it exports in eval mode and puts
each submodule's training flag back).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from cpkernels.export.forms import plan_onnx_forms, with_forms
from cpkernels.ops.onnx_form import depthwise_merged, rank_aligned

OPSET = 18
DEFAULT_DOMAINS = ("", "ai.onnx")
FOLD_LIMIT = 1 << 31  # elements: fold constant subgraphs of any size
# ONNX Runtime's CPU provider runs convs in a blocked NCHWc layout of 8 (AVX2) or 16 (AVX-512) channels per block.
# A rank that is not a multiple leaves the layer's depthwise conv in plain NCHW between two reorders: on HED's
# trained VGG-16 at 0.25 of the conv MACs (416x640, 2-core AVX-512 EPYC; README) padding the ranks to 16 cut the
# CP export's time by 15-17 % in the same loop (three loops), Tucker-2's by 8 % (one).
ALIGN_RANKS = 16


def _require_onnx():
    try:
        # the export extra is optional: imported on first use
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as error:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'cpkernels[export]'") from error
    return onnx


def check_standard_graph(model_proto) -> None:
    """Raise unless the graph holds only default-domain ONNX ops, no functions, and every ``Conv``'s
    weight and bias is an initializer (nothing computed at run time)."""
    graph = model_proto.graph
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in DEFAULT_DOMAINS})
    if custom or len(model_proto.functions):
        raise RuntimeError(f"the exported graph is not standard ONNX: custom ops {custom}, "
                           f"{len(model_proto.functions)} functions")
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv":
            computed = [name for name in node.input[1:] if name and name not in initializers]
            if computed:
                raise RuntimeError(f"Conv node {node.name!r} takes {computed} computed at run time, not initializers")


def export_onnx(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    path: Union[str, os.PathLike],
    *,
    merge_depthwise: Union[bool, str] = "auto",
    dynamic_batch: bool = True,
    threads: int = 0,
    opset_version: int = OPSET,
    dynamo: bool = True,
    input_names: Iterable[str] = ("input",),
    align_ranks: int = ALIGN_RANKS,
):
    """Export ``model`` (compressed or not) to ``path`` as standard ONNX and return the checked
    ``onnx.ModelProto``.

    Args:
        model: the module; a copy of it is exported in eval mode, the model itself is untouched.
        example_inputs: a tensor or a tuple of the positional inputs.
        merge_depthwise: how each CP layer is written. ``"auto"`` (default): timed in ONNX Runtime on
            ``example_inputs`` (:func:`cpkernels.export.forms.plan_onnx_forms`): the fastest whole model
            of every layer as one kh x kw depthwise conv, every layer as the kh x 1 and 1 x kw pair,
            every layer as one dense conv of its reconstructed weight, and each layer in the form that
            ran fastest alone. So the file is never slower than the dense model, as measured.
            ``True``: always one depthwise conv; ``False``: always the pair.
        dynamic_batch: the first dimension of every input (and so of the outputs) is symbolic.
        threads: ONNX Runtime's ``intra_op_num_threads`` for the timing of ``"auto"`` (0: its default).
        opset_version: the ONNX opset (18 is tested).
        dynamo: the ``torch.export``-based exporter (default) or the legacy TorchScript one.
        input_names: names of the graph inputs (the legacy exporter's dynamic axes refer to them).
        align_ranks: each factored layer without groups is written with its ranks padded with zero channels up
            to a multiple of this (:data:`ALIGN_RANKS`: ONNX Runtime's NCHWc block on AVX-512, a multiple of
            AVX2's); the output is the same. 1 writes the ranks as they are.

    With ``"auto"`` the plan and its timings are stored in the file's metadata under
    ``cpkernels.forms`` (JSON).

    Quantizing the file: static int8 in ONNX Runtime (``quantize_static``) kept the output of dense and
    Tucker-2 exports of HED's trained VGG-16, and lost it for CP exports (edge F1 0.000-0.334 against fp32;
    README, *Against pruning and int8*). A CP layer's rank-one components largely cancel, and int8 rounds each
    on one scale. For int8, compress with Tucker-2, or keep the CP layers in float.
    """


    onnx = _require_onnx()
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must be a tensor or a sequence of tensors")
    if merge_depthwise not in (True, False, "auto"):
        raise ValueError(f"merge_depthwise must be True, False or 'auto', got {merge_depthwise!r}")
    if isinstance(align_ranks, bool) or not isinstance(align_ranks, int) or align_ranks < 1:
        raise ValueError(f"align_ranks must be an int >= 1, got {align_ranks!r}")
    names = list(input_names)[:len(args)] + [f"input_{k}" for k in range(len(input_names), len(args))]
    kwargs = {}
    if dynamic_batch and dynamo:
        batch = torch.export.Dim("batch")
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in names}

    plan = None
    with rank_aligned(align_ranks):  # the timed forms are written as the file will be
        if merge_depthwise == "auto":
            plan = plan_onnx_forms(model, args, threads)
            exported = with_forms(model, plan["forms"])
        else:
            exported = copy.deepcopy(model).eval()
        with depthwise_merged(merge_depthwise is not False), torch.no_grad():
            torch.onnx.export(exported, args, str(path), dynamo=dynamo, opset_version=opset_version,
                              input_names=names, verbose=False, **kwargs)
    proto = onnx.load(str(path))
    # The exporter folds the factor reshapes into initializers only below 8192 elements (the optimizer's
    # default limit): fold every constant subgraph here, whatever its size, so the file holds the conv
    # weights themselves and a runtime computes nothing from them. (onnxscript: optional, as in _require_onnx.)
    import onnxscript

    proto = onnxscript.optimizer.optimize(proto, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    if plan is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "cpkernels.forms", json.dumps(plan)
    onnx.save(proto, str(path))
    check_standard_graph(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto
