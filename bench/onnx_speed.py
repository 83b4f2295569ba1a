"""ONNX Runtime on dense and CP-compressed exports of a ResNet-18- and a VGG-16-shaped network, beside
PyTorch eager on the same models.

    python -m bench.onnx_speed --out bench/results/cpu-amd-epyc-2core

For each network and rank fraction (of each conv's parameters, as ``compress_model(rank=f)``; ranks
rounded up to ``--rank-multiple``), the CP layers get random factors at those ranks (speed does not
depend on the values, and no decomposition is timed), both models are exported with
:func:`cpkernels.export_onnx`, and each runs ``--repeats`` times after a warm-up in ONNX Runtime
(CPU provider, ``intra_op_num_threads=--threads``, ``ORT_ENABLE_ALL``) and in PyTorch eager
(``torch.set_num_threads(--threads)``), each compressed model interleaved with its dense original
(:func:`cpkernels.core.timing.interleaved_median_seconds`). The medians and speed-ups go to ``onnx_speed.json`` and
``onnx_speed.md`` with the machine and versions. The compressed model is exported with
``merge_depthwise="auto"`` (each layer in its fastest form, dense where CP does not win);
``--merge-both`` also times it with every layer's depthwise stage as one conv and as two. ``--channels-last``
runs eager PyTorch on channels_last inputs (both models, and ``--keep-dense``'s timing of each layer); ONNX Runtime
takes its NCHW input as before.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch
from torch import nn

from cpkernels import apply_structure, export_onnx, resolve_rank
from cpkernels.compression.compress import convs_kept_dense
from cpkernels.compression.convs import filter_reason
from cpkernels.core.timing import interleaved_median_seconds
from cpkernels.export.onnx import ALIGN_RANKS
from cpkernels.tools.profile import environment

from .decompose_timing import vgg16_features
from .report import save_results

FRACTIONS = (0.5, 0.25, 0.125)


# --------------------------------------------------------------------------------------------------
# The networks (their shapes; random weights)
# --------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 1000) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def vgg16(classes: int = 1000) -> nn.Module:
    return nn.Sequential(vgg16_features(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


NETWORKS = {"resnet18": resnet18, "vgg16": vgg16}


def cp_structure(model: nn.Module, fraction: float, rank_multiple: int) -> dict[str, int]:
    """``compress_model(rank=fraction)``'s ranks (rounded up), for the convs it would compress."""
    structure = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and filter_reason(name, m, None, None, None, 1, False) is None:
            r = resolve_rank(fraction, tuple(m.weight.shape), m.groups)
            structure[name] = -(-r // rank_multiple) * rank_multiple
    return structure


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def interleaved_ms(calls: dict, repeats: int) -> dict[str, float]:
    return {name: 1e3 * t for name, t in interleaved_median_seconds(calls, repeats).items()}


def ort_session(path: str, threads: int):
    """An ONNX Runtime session of the CPU provider with every graph optimisation, its threads not spinning."""
    # the export extra is optional: imported on first use
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Two sessions take turns here: an idle session's threads must not spin-wait through the other's run (with
    # spinning on, interleaving slowed the dense VGG-16 from 75 ms to 114-125 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(networks=tuple(NETWORKS), fractions=FRACTIONS, size: int = 224, batch: int = 1, threads: int = 2,
        repeats: int = 10, rank_multiple: int = 8, merge_both: bool = False, keep_dense: bool = False,
        workdir=None, channels_last: bool = False) -> list[dict]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or tmp
        for net in networks:
            torch.manual_seed(0)
            dense = NETWORKS[net]().eval()
            x = torch.randn(batch, 3, size, size)
            x_eager = x.contiguous(memory_format=memory_format)
            dense_path = os.path.join(workdir, f"{net}_dense.onnx")
            export_onnx(dense, x, dense_path)
            dense_session = ort_session(dense_path, threads)
            feed = {dense_session.get_inputs()[0].name: x.numpy()}
            for fraction in fractions:
                structure = cp_structure(dense, fraction, rank_multiple)
                cp = apply_structure(copy.deepcopy(dense), structure).eval()  # random factors at these ranks
                calls = {"dense": lambda: dense(x_eager), "cp": lambda: cp(x_eager)}
                kept = convs_kept_dense(dense, structure, tuple(x.shape), memory_format) if keep_dense else {}
                if keep_dense:  # the convs whose CP form does not win stay nn.Conv2d
                    cp_kept = apply_structure(copy.deepcopy(dense), {n: r for n, r in structure.items()
                                                                     if n not in kept}).eval()
                    calls["cp_kept"] = lambda: cp_kept(x_eager)
                with torch.inference_mode():
                    eager = interleaved_ms(calls, repeats)
                eager_dense, eager_cp = eager["dense"], eager["cp"]
                for merge in (("auto", True, False) if merge_both else ("auto",)):
                    path = os.path.join(workdir, f"{net}_{fraction}_{merge}.onnx")
                    proto = export_onnx(cp, x, path, merge_depthwise=merge, threads=threads)
                    session = ort_session(path, threads)
                    with torch.no_grad():
                        onnx_out = torch.from_numpy(session.run(None, feed)[0])
                        max_diff = float((onnx_out - cp(x)).abs().max() / cp(x).abs().max())
                    ort = interleaved_ms({"dense": lambda: dense_session.run(None, feed),
                                          "cp": lambda s=session: s.run(None, feed)}, repeats)
                    ort_dense, ort_cp = ort["dense"], ort["cp"]
                    plan = json.loads(next((p.value for p in proto.metadata_props if p.key == "cpkernels.forms"),
                                           '{"forms": {}, "chosen": null}'))
                    first = merge == "auto"
                    rows.append({
                        "network": net, "fraction": fraction, "merge_depthwise": merge,
                        "ranks": sorted(set(structure.values())), "ort_dense_ms": round(ort_dense, 2),
                        "ort_cp_ms": round(ort_cp, 2), "ort_speedup": round(ort_dense / ort_cp, 2),
                        "eager_dense_ms": round(eager_dense, 2),
                        "eager_cp_ms": round(eager_cp, 2) if first else None,
                        "eager_speedup": round(eager_dense / eager_cp, 2) if first else None,
                        "eager_kept_ms": round(eager["cp_kept"], 2) if first and keep_dense else None,
                        "eager_kept_speedup": round(eager_dense / eager["cp_kept"], 2) if first and keep_dense
                        else None,
                        "kept_dense": kept, "factored": len(structure) - len(kept),
                        "onnx_vs_eager_rel_diff": max_diff,
                        "chosen": plan["chosen"],
                        "forms": {f: sum(v == f for v in plan["forms"].values()) for f in ("merged", "two", "dense")},
                    })
    return rows


def to_markdown(rows: list[dict], env: dict, args) -> str:
    # the export extra is optional: imported on first use
    import onnxruntime as ort

    lines = [f"# ONNX Runtime against PyTorch eager: {env['device']}", "",
             f"onnxruntime {ort.__version__} (CPU provider, ORT_ENABLE_ALL, intra_op_num_threads={args.threads}), "
             f"torch {env['torch']} ({args.threads} threads), batch {args.batch}, 3x{args.size}x{args.size}, "
             + ("eager PyTorch on channels_last inputs, " if args.channels_last else "")
             + f"median of {args.repeats} runs after a warm-up, dense and CP taking turns in each round (in eager "
             "PyTorch and in ONNX Runtime alike, whose sessions do not spin-wait); ranks = "
             "compress_model(rank=fraction) rounded up "
             f"to multiples of {args.rank_multiple}.", "",
             f"`export_onnx` pads each CP layer's rank with zero channels to a multiple of {ALIGN_RANKS} "
             "(`align_ranks`, its default), and writes every CP layer as one depthwise conv (`merged`) or two "
             "(`two`), or, with "
             "the default `merge_depthwise=\"auto\"`, as the fastest whole model in ONNX Runtime of all "
             "merged, all two, all dense (the reconstructed weights) and each layer in its own fastest form "
             "(the last column: the candidate chosen, and its layers per form). Eager PyTorch runs the CP "
             "model as it is (every layer CP, the CPU path). With --keep-dense, *kept* is the CP model with "
             "nn.Conv2d put back where the CP form was not 5 % faster than the conv, timed per layer "
             "(`compress_model(..., keep_dense_where_faster=True)`'s rule), and *convs kept* counts them.", "",
             "| network | fraction | export | ORT dense ms | ORT CP ms | ORT speed-up | eager dense ms | eager CP ms "
             "| eager speed-up | eager kept ms | eager kept speed-up | convs kept | ORT / eager speed-up "
             "| auto: chosen, merged / two / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = [r["eager_dense_ms"], r["eager_cp_ms"], r["eager_speedup"]]
        ratio = "" if r["eager_speedup"] is None else f"{r['ort_speedup'] / r['eager_speedup']:.2f}"
        export = {"auto": "auto", True: "merged", False: "two"}[r["merge_depthwise"]]
        forms = (f"{r['chosen']}: " + " / ".join(str(r["forms"][f]) for f in ("merged", "two", "dense"))
                 if export == "auto" else "")
        kept = ("", "", "") if r.get("eager_kept_ms") is None else (
            str(r["eager_kept_ms"]), f"{r['eager_kept_speedup']}x",
            f"{len(r['kept_dense'])} of {len(r['kept_dense']) + r['factored']}")
        lines.append(f"| {r['network']} | {r['fraction']} | {export} | "
                     f"{r['ort_dense_ms']} | {r['ort_cp_ms']} | {r['ort_speedup']}x | "
                     + " | ".join("" if v is None else str(v) for v in eager[:2])
                     + f" | {'' if eager[2] is None else str(eager[2]) + 'x'} | " + " | ".join(kept)
                     + f" | {ratio} | {forms} |")
    return "\n".join(lines) + "\n"


def network_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the whole-network CPU benchmarks (this one and ``bench.cpu_plan_networks``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def main(argv=None) -> int:
    parser = network_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--merge-both", action="store_true")
    parser.add_argument("--keep-dense", action="store_true",
                        help="also time the CP model with nn.Conv2d kept where its CP form is not faster")
    parser.add_argument("--channels-last", action="store_true", help="eager PyTorch on channels_last inputs")
    args = parser.parse_args(argv)
    rows = run(args.networks, args.fractions, args.size, args.batch, args.threads, args.repeats, args.rank_multiple,
               args.merge_both, args.keep_dense, channels_last=args.channels_last)
    env = environment("cpu")
    save_results(args.out, "onnx_speed", {"environment": env, "arguments": vars(args), "rows": rows},
                 to_markdown(rows, env, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
