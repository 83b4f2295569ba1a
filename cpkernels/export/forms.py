"""The ONNX Runtime plan: how the factored layers of a model (CP, Tucker-2) are written into an ONNX file, by timing.

A CP layer can be written in three forms:

- ``"merged"``: 1x1, one kh x kw depthwise, 1x1 convs;
- ``"two"``: 1x1, kh x 1 and 1 x kw depthwise, 1x1 convs;
- ``"dense"``: one conv of the reconstructed weight, where the CP form cannot win in this runtime.

First every ``CPConv2d`` the example inputs reach is timed alone in each form, in ONNX Runtime (CPU
provider, all graph optimisations, the given thread count) on the input it gets there, and the fastest
form per layer makes the ``"per-layer"`` candidate. Then the whole model is timed with every layer
``"merged"``, every layer ``"two"``, every layer ``"dense"``, and ``"per-layer"``; the fastest whole
model wins, except that every layer stays ``"dense"`` unless another candidate beats that by
:data:`cpkernels.dispatch.measured.DENSE_MARGIN` (and a layer alone likewise). The whole models take turns,
round by round. Timing whole models matters: ONNX Runtime keeps consecutive convs in its blocked NCHWc
layout without reordering between them, which a layer timed alone does not show, and on a 2-core AVX2
machine the per-layer choice alone ran a ResNet-18 at 0.25 of its parameters 1.5x slower than all
``"merged"``. Neither depthwise form won everywhere (bench/onnx_speed.py), and with every layer dense
the result is never slower than the dense model, as measured.

A Tucker-2 layer (``TuckerConv2d``) has one factored form, its three convs (written for ``"merged"`` and
``"two"`` alike), and ``"dense"``; it takes part in the same candidates.
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from cpkernels.compression.calibration import EvalHooks
from cpkernels.compression.convs import set_submodule
from cpkernels.compression.families import FAMILIES, family_of_layer
from cpkernels.core.timing import interleaved_median_seconds, median_seconds
from cpkernels.dispatch.measured import fastest_keeping_dense
from cpkernels.ops.onnx_form import depthwise_merged

FORMS = ("merged", "two", "dense")


class _Form(nn.Module):
    """One CP layer in one form, for timing."""
    def __init__(self, layer: nn.Module, form: str) -> None:
        super().__init__()
        self.layer = layer.to_conv2d() if form == "dense" else layer
        self.form = form

    def forward(self, x):
        with depthwise_merged(self.form != "two"):
            return self.layer(x)


def ort_run(model, x: torch.Tensor, threads: int, spinning: bool = True) -> Callable[[], object]:
    """One ONNX Runtime run of ``model`` (a path or the serialised bytes) on ``x``, as a call (CPU provider, all
    graph optimisations, ``intra_op_num_threads=threads``; ``spinning=False``: its threads do not spin-wait
    after a run, for sessions that take turns)."""
    # the export extra is optional: imported on first use
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def ort_ms(model, x: torch.Tensor, threads: int, repeats: int) -> float:
    """Median milliseconds of one ONNX Runtime run of ``model`` (a path or the serialised bytes) on ``x``,
    after a warm-up run (:func:`ort_run`)."""
    return 1e3 * median_seconds(ort_run(model, x, threads), repeats)


def time_form(layer: nn.Module, form: str, x: torch.Tensor, threads: int, repeats: int) -> float:
    """Median milliseconds of ``layer`` in ``form`` in ONNX Runtime on ``x``."""
    return ort_ms(_serialised(_Form(layer, form).eval(), (x,)), x, threads, repeats)


CANDIDATES = ("merged", "two", "dense", "per-layer")


def with_forms(model: nn.Module, forms: dict[str, str]) -> nn.Module:
    """A copy of ``model`` in eval mode whose factored layers are written in the given forms when exported."""
    copied = copy.deepcopy(model).eval()
    for name, form in forms.items():
        set_submodule(copied, name, _Form(copied.get_submodule(name), form))
    return copied


def _serialised(model: nn.Module, example_inputs) -> bytes:
    """``model`` exported for timing. The legacy exporter: a probe a tenth of the time of the torch.export-based
    one, with the same convs."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: it is only a probe here
        torch.onnx.export(model, tuple(example_inputs), buffer, dynamo=False, opset_version=18)
    return buffer.getvalue()


def _whole_models_ms(models: dict[str, nn.Module], example_inputs, threads: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each model (by candidate) in ONNX Runtime on ``example_inputs``.

    The models take turns, round by round: timed one after the other, a change of the machine's load or clock
    fell on one candidate (HED's CP export at 0.25 took "per-layer", which then ran 10 % slower than "merged" in
    a loop of its own). Their sessions do not spin-wait, which would slow the next one's run."""
    runs = {c: ort_run(_serialised(m, example_inputs), example_inputs[0], threads, spinning=False)
            for c, m in models.items()}
    return {c: 1e3 * t for c, t in interleaved_median_seconds(runs, repeats).items()}


def plan_onnx_forms(model: nn.Module, example_inputs: Sequence[torch.Tensor], threads: int = 0,
                    repeats: int = 5) -> dict:
    """``{"chosen": candidate, "forms": {name: form}, "ms": {candidate: ms}, "layers": {name: {form: ms}}}``
    for the factored layers reached by ``example_inputs`` (float32 CPU tensors, one input for the timing).
    ``threads=0`` lets ONNX Runtime choose, as a default session does. ``model`` is not modified."""
    inputs: dict[str, torch.Tensor] = {}
    factored = tuple(f.module for f in FAMILIES.values())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, factored)}

    def hook(name):
        def record(module, args, output):
            inputs.setdefault(name, args[0].detach().clone())
        return record

    with EvalHooks(model, layers, hook):  # eval mode, no grad; hooks removed and training flags restored after
        model(*example_inputs)
    per_layer = {}
    for name, x in inputs.items():
        layer = copy.deepcopy(layers[name]).eval()
        forms = family_of_layer(layer).onnx_forms
        per_layer[name] = {form: time_form(layer, form, x, threads, repeats) for form in forms}
    candidates = {form: {name: form for name in inputs} for form in FORMS}
    candidates["per-layer"] = {name: fastest_keeping_dense(ms, "dense") for name, ms in per_layer.items()}
    ms = _whole_models_ms({c: with_forms(model, forms) for c, forms in candidates.items()}, example_inputs, threads,
                          repeats)
    chosen = fastest_keeping_dense(ms, "dense")
    return {"chosen": chosen, "forms": candidates[chosen], "ms": ms, "layers": per_layer}
