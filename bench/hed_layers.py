"""Where the CPU time of HED's compressed VGG-16 goes: per conv and per stage of the arranged CP path, at the
ranks of one :mod:`bench.hed_methods` configuration (issue #22).

    python -m bench.hed_layers --out bench/results/cpu-intel-xeon-avx512-2core            # 416x640, 2 threads
    python -m bench.hed_layers --out DIR --size 208 320 --threads 1 --layers conv1_2 conv2_1 --no-compile

For each of HED's 3x3 convs (:data:`cpkernels.tools.hed.CONV_NAMES`) at its input size in the network, on a
random input of ``--batch`` images, interleaved medians (every form and stage takes its turn in each round,
:func:`bench.hed_methods.interleaved_seconds`) of:

- ``dense``: HED's trained ``nn.Conv2d``;
- ``cp``: the CP layer at the configuration's rank, ``backend="auto"`` (the CPU plan's choice, which the JSON names
  with the plan's own timings); ``staged``: the arranged stages whole
  (:func:`cpkernels.ops.cp_arranged.cp_conv2d_arranged` with the staged arrangement, whatever the plan chose,
  without the layer's per-call work);
- each stage of that arrangement alone, on the tensors the previous stage made: ``stage1`` (1x1 Cin->R),
  ``depthwise`` (the merged kh x kw pass), ``stage4`` (1x1 R->Cout and the bias), ``weights`` (building the merged
  depthwise filter, each call), ``pad`` (an asymmetric padding's copy) and ``layout`` (an arrangement's contiguous
  copy, where it has one);
  and, not added to the rest, ``allocation``: fresh buffers of the stages' output sizes, each written once per
  page and freed once the next is made (the stages' own lifetimes), what the intermediates' page faults cost
  (glibc maps a large buffer fresh, and the kernel faults it in, depending on what was freed before: timed in
  turn with the rest, in the same state);
- ``tucker2``: a Tucker-2 layer, ``backend="auto"``, at the pair ``(R_out, R_in)`` in the ratio of the channel
  counts whose MACs (the families' ``macs``) are closest to the CP layer's;
- ``compiled``: ``torch.compile`` (inductor) of the CP layer, and ``compiled-arranged``: of the arranged stages
  (plain torch ops, which the compiler can fuse); a compile that fails or runs past ``compile_limit_s`` is
  recorded and not timed.

Factors are random (speed does not depend on their values; :meth:`FactoredConv2d.reset_parameters`). MACs are
the families' (``cp``, ``tucker2``) and the stages' own (the depthwise pass merged, as the arrangement runs it);
GMAC/s shows which stage runs far below the dense conv's rate. The network line sums each form over the convs
(a conv the configuration keeps dense counts its dense time in every form; HED's pools, side outputs and fusion
are not in it) and gives each stage's share of the summed staged time. Writes ``hed_layers.json`` and
``hed_layers.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpkernels import apply_structure
from cpkernels.compression.convs import conv_input_sizes
from cpkernels.compression.families import FAMILIES
from cpkernels.core import conv_args
from cpkernels.core.conv_args import output_size
from cpkernels.core.cost import ConvShape
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops.cp_arranged import (pointwise_to_pixel_major, cp_conv2d_arranged, cp_cpu_plan, im2col_depthwise,
                                       merged_depthwise_weight, pointwise_matmul)
from cpkernels.ops.tucker2_arranged import tucker2_cpu_plan
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .hed_methods import interleaved_seconds
from .report import save_results

SETTINGS = dict(
    size=(416, 640),  # bench.hed_methods' judging and timing size
    config="cp-data-0.25",
    threads=2,
    batch=1,
    runs=11,
    compile_limit_s=60.0,
)
RANKS = os.path.join(os.path.dirname(__file__), "results", "cpu-intel-xeon-avx512-2core", "hed_methods.json")
FORMS = ("dense", "cp", "staged", "pixel-major", "tucker2", "compiled", "compiled-arranged")
STAGES = ("weights", "stage1", "pad", "depthwise", "layout", "stage4")
PAGE_BYTES = 4096


# --------------------------------------------------------------------------------------------------
# The ranks and the layers
# --------------------------------------------------------------------------------------------------
def configuration_ranks(path: str, config: str) -> dict[str, Optional[int]]:
    """The CP rank of each of HED's convs in the row of ``config`` in a ``hed_methods.json`` (None: kept dense)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    row = next((r for r in rows if r["config"] == config), None)
    if row is None:
        raise ValueError(f"{path} has no row {config!r}: it has {', '.join(r['config'] for r in rows)}")
    ranks = row["ranks"]
    pairs = [name for name, r in ranks.items() if isinstance(r, list)]
    if pairs:
        raise ValueError(f"{config!r} gives {', '.join(pairs)} Tucker-2 ranks: this profile takes a CP configuration")
    return ranks


def tucker2_pair(shape: ConvShape, macs: int) -> tuple[int, int]:
    """The Tucker-2 ranks ``(R_out, R_in)``, in the ratio of the output and input channels (per group), whose MACs
    are closest to ``macs``."""
    cout, cin = shape.cout // shape.groups, shape.cin // shape.groups
    pairs = [(r_out, max(1, min(cin, round(r_out * cin / cout)))) for r_out in range(1, cout + 1)]
    return min(pairs, key=lambda pair: abs(FAMILIES["tucker2"].macs(shape, pair) - macs))


@dataclass
class Stage:
    """One stage of an arrangement: ``fn(t)`` of the previous stage's output ``t``, its MACs."""
    name: str
    fn: Callable[[Tensor], Tensor]
    macs: int
    chained: bool = True  # False: a side computation (the merged filter), its output not the next stage's input


def arranged_stages(arrangement: str, x: Tensor, layer: nn.Module, padding: Sequence[int]) -> list[Stage]:
    """The stages :func:`cpkernels.ops.cp_arranged.cp_conv2d_arranged` runs for ``arrangement`` on ``x`` (one batch
    chunk), one callable each, so that each can be timed alone. :func:`chained_outputs` checks their composition
    against the library's."""
    f_in, f_v, f_h, f_out, bias = (layer.input_factor, layer.vertical_factor, layer.horizontal_factor,
                                   layer.output_factor, layer.bias)
    groups, _, rank = f_in.shape
    n, cin, h, w = x.shape
    (kh, kw), cout = layer.kernel_size, layer.out_channels
    stride, dilation = list(layer.stride), list(layer.dilation)
    pt, pb, pl, pr = padding
    symmetric = pt == pb and pl == pr
    sym_pad = (pt, pl) if symmetric else (0, 0)
    oh, ow = output_size((h, w), (kh, kw), stride, padding, dilation)
    w_dw = merged_depthwise_weight(f_v, f_h)  # what the "weights" stage builds, made once for the others
    w_in = f_in.transpose(1, 2)
    macs1, macs_dw, macs4 = n * h * w * cin * rank, n * oh * ow * kh * kw * rank * groups, n * oh * ow * rank * cout
    weights = Stage("weights", lambda _: merged_depthwise_weight(f_v, f_h), 0, chained=False)
    pad = [] if symmetric else [Stage("pad", lambda t: F.pad(t, (pl, pr, pt, pb)), 0)]

    def grouped(t: Tensor) -> Tensor:
        return F.conv2d(t, w_dw, None, stride, sym_pad, dilation, groups * rank)

    if arrangement in ("im2col", "channels-last-im2col"):
        last = (Stage("stage4", lambda t: pointwise_matmul(t, f_out, bias), macs4) if arrangement == "im2col" else
                Stage("stage4", lambda t: F.linear(t.permute(0, 2, 3, 1), f_out[0], bias).permute(0, 3, 1, 2), macs4))
        return [weights, Stage("stage1", lambda t: pointwise_matmul(t, w_in, None), macs1), *pad,
                Stage("depthwise", lambda t: im2col_depthwise(t, w_dw, stride, sym_pad), macs_dw), last]
    if arrangement == "channels-last-convs":
        return [weights, Stage("stage1", lambda t: F.conv2d(t, w_in.reshape(groups * rank, -1, 1, 1), None, 1, 0, 1,
                                                            groups), macs1), *pad,
                Stage("depthwise", grouped, macs_dw),
                Stage("stage4", lambda t: F.conv2d(t, f_out.reshape(-1, rank, 1, 1), bias, 1, 0, 1, groups), macs4),
                Stage("layout", lambda t: t.contiguous(memory_format=torch.channels_last), 0)]
    if arrangement == "pixel-major":
        first = Stage("stage1", lambda t: pointwise_to_pixel_major(t, f_in[0]), macs1)
        copy_after = []
    elif arrangement == "nchw":
        first = Stage("stage1", lambda t: pointwise_matmul(t, w_in, None), macs1)
        copy_after = [Stage("layout", lambda t: t.contiguous(), 0)]
    else:
        raise ValueError(f"no stages for the arrangement {arrangement!r}")
    return [weights, first, *pad, Stage("depthwise", grouped, macs_dw), *copy_after,
            Stage("stage4", lambda t: pointwise_matmul(t, f_out, bias), macs4)]


def chained_outputs(stages: Sequence[Stage], x: Tensor) -> list[Tensor]:
    """Each stage's input (the previous chained stage's output; ``x`` for the first), and last the layer's output."""
    inputs, t = [], x
    for stage in stages:
        inputs.append(t)
        if stage.chained:
            t = stage.fn(t)
    return [*inputs, t]


def allocations(outputs: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """Fresh buffers the sizes of ``outputs`` (the chained stages' outputs, in order), each written once per page
    and freed once the next one is made, as the stages' intermediates are: their allocations' cost before any
    arithmetic."""
    numels, dtype = [t.numel() for t in outputs], outputs[0].dtype
    step = max(1, PAGE_BYTES // outputs[0].element_size())

    def allocate(_: Tensor) -> Tensor:
        previous = None
        for numel in numels:
            buffer = torch.empty(numel, dtype=dtype)
            buffer[::step] = 0
            previous = buffer  # frees the one before, whose stage's successor now exists
        return previous

    return allocate


# --------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raises TimeoutError in the main thread after ``seconds`` (a SIGALRM timer; nothing where there is none)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"compiling ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled(fn: Callable[[Tensor], Tensor], x: Tensor, limit_s: float) -> tuple[Optional[Callable], dict]:
    """``torch.compile(fn)`` after its first call on ``x`` (which compiles it), and ``{"seconds", "error"}``; None
    in place of the function where compiling failed or ran past ``limit_s``."""
    start = time.perf_counter()
    try:
        function = torch.compile(fn)
        with torch.no_grad(), _time_limit(limit_s):
            function(x)
    except Exception as error:  # any failure of the compiler is a result here, not a reason to stop
        return None, {"seconds": time.perf_counter() - start, "error": f"{type(error).__name__}: {error}"[:500]}
    return function, {"seconds": time.perf_counter() - start, "error": None}


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def _timing(seconds: float, macs: Optional[int] = None, nbytes: Optional[int] = None) -> dict:
    entry = {"ms": 1e3 * seconds}
    if macs:
        entry.update(macs=macs, gmacs=macs / seconds / 1e9)
    if nbytes:
        entry.update(bytes=nbytes, gbs=nbytes / seconds / 1e9)
    return entry


def measure_layer(name: str, conv: nn.Conv2d, cp: Optional[nn.Module], tucker2: Optional[nn.Module], x: Tensor,
                  runs: int, compile_forms: bool, limit_s: float) -> dict:
    """One conv's row: its forms and stages, timed interleaved on ``x`` (see the module docstring)."""
    shape = ConvShape.of_conv(conv, tuple(x.shape[2:]), batch=x.shape[0])
    row = {"name": name, "input": list(x.shape), "cin": conv.in_channels, "cout": conv.out_channels,
           "rank": None if cp is None else cp.rank, "dense_macs": shape.dense_macs()}
    forms = {"dense": conv}
    macs = {"dense": shape.dense_macs()}
    if cp is None:
        seconds = interleaved_seconds(forms, x, runs)
        return {**row, "forms": {"dense": _timing(seconds["dense"], macs["dense"])}, "stages": {}}
    padding = conv_args.explicit_padding(cp.padding, tuple(cp.kernel_size), tuple(cp.dilation))
    tensors = (cp.input_factor, cp.vertical_factor, cp.horizontal_factor, cp.output_factor, cp.bias)
    args = (list(cp.stride), list(padding), list(cp.dilation))
    with torch.no_grad():
        chosen = cp_cpu_plan(x, *tensors, *args)
        out_size = output_size(x.shape[2:], cp.kernel_size, cp.stride, padding, cp.dilation)
        staged = cpu_dispatch.staged_plan(x, cp.rank, cp.groups, cp.out_channels, cp.kernel_size, out_size,
                                          cp.dilation, False)
        key = cpu_dispatch.call_key(x, cp.rank, cp.groups, cp.out_channels, cp.kernel_size, cp.stride, padding,
                                    cp.dilation, False)
        measured = cpu_dispatch.measured_plans().get(key)
        t2_padding = conv_args.explicit_padding(tucker2.padding, tuple(tucker2.kernel_size), tuple(tucker2.dilation))
        tucker2_plan = tucker2_cpu_plan(x, tucker2.input_factor, tucker2.core, tucker2.output_factor, tucker2.bias,
                                        list(tucker2.stride), list(t2_padding), list(tucker2.dilation))
        # The banded arrangement runs every stage per band, so it has no whole-image stages to time: its row breaks
        # down the whole-image pixel-major stages instead (timed as the form "pixel-major").
        whole = cpu_dispatch.Plan("pixel-major", 1) if staged.arrangement == cpu_dispatch.BANDED else staged
        chunk = x[:whole.chunk]
        stages = arranged_stages(whole.arrangement, chunk, cp, padding)
        outputs = chained_outputs(stages, chunk)
        expected = cp_conv2d_arranged(cpu_dispatch.Plan(whole.arrangement, chunk.shape[0]), chunk, *tensors, *args)
        torch.testing.assert_close(outputs[-1], expected, rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()),
                                   msg=lambda m: f"{name}: the timed stages do not compute the arranged path: {m}")
    row.update(plan={"arrangement": chosen.arrangement, "chunk": chosen.chunk,
                     "measured_us": None if measured is None else measured.measured_us},
               staged={"arrangement": staged.arrangement, "chunk": staged.chunk,
                       "chunks": math.ceil(x.shape[0] / whole.chunk), "stages_of": whole.arrangement},
               tucker2_rank=list(tucker2.rank), tucker2_plan=tucker2_plan.arrangement)
    forms.update(cp=cp, staged=lambda t: cp_conv2d_arranged(staged, t, *tensors, *args), tucker2=tucker2)
    macs.update(cp=FAMILIES["cp"].macs(shape, cp.rank), tucker2=FAMILIES["tucker2"].macs(shape, tucker2.rank))
    macs["staged"] = shape.cp_macs(cp.rank, merged_depthwise=True)
    if whole is not staged:
        forms["pixel-major"], macs["pixel-major"] = (lambda t: cp_conv2d_arranged(whole, t, *tensors, *args),
                                                     macs["staged"])
    chunk_shape = ConvShape.of_conv(conv, tuple(x.shape[2:]), batch=chunk.shape[0])
    chunk_macs = chunk_shape.cp_macs(cp.rank, merged_depthwise=True)
    assert sum(s.macs for s in stages) == chunk_macs, f"{name}: the stages' MACs are not the arrangement's"
    if compile_forms:
        torch._dynamo.reset()  # a fresh cache per layer: the modules share forward's code, whose recompiles are capped
        arranged = functools.partial(cp_conv2d_arranged, staged)
        candidates = {"compiled": cp, "compiled-arranged": lambda t: arranged(t, *tensors, *args)}
        row["compile"] = {}
        for form, fn in candidates.items():
            function, row["compile"][form] = compiled(fn, x, limit_s)
            if function is not None:
                forms[form], macs[form] = function, macs["staged"]
    timed = dict(forms)
    for stage, t in zip(stages, outputs):
        timed[f"stage:{stage.name}"] = functools.partial(lambda fn, t, _: fn(t), stage.fn, t)
    # a chained stage's output is the next stage's input (outputs[i + 1])
    made = [out for stage, out in zip(stages, outputs[1:]) if stage.chained]
    timed["allocation"] = allocations(made)
    seconds = interleaved_seconds(timed, x, runs)
    row["forms"] = {form: _timing(seconds[form], macs[form]) for form in forms}
    chunks = row["staged"]["chunks"]
    row["stages"] = {}
    for stage, t in zip(stages, outputs):
        nbytes = t.numel() * t.element_size() if stage.name in ("pad", "layout") else None  # copies: bytes read
        row["stages"][stage.name] = _timing(chunks * seconds[f"stage:{stage.name}"], chunks * stage.macs,
                                            nbytes and chunks * nbytes)
    row["allocation"] = {"ms": 1e3 * chunks * seconds["allocation"],
                         "bytes": chunks * sum(t.numel() * t.element_size() for t in made)}
    return row


def _whole_form(row: dict) -> str:
    """The form whose stages a row breaks down: ``pixel-major`` where the staged form is banded."""
    return "pixel-major" if "pixel-major" in row["forms"] else "staged"


def network_summary(rows: Sequence[dict]) -> dict:
    """Each form's time summed over the convs (a missing form counts as the layer's ``cp`` time, a conv kept
    dense as its dense time, and the layers so substituted are named), and each stage's share of the staged time."""
    totals, substituted = {}, {}
    for form in FORMS:
        total, missing = 0.0, []
        for r in rows:
            if form in r["forms"]:
                total += r["forms"][form]["ms"]
            elif form == "pixel-major" and r["rank"] is not None:
                total += r["forms"]["staged"]["ms"]  # not banded: the staged form is the whole-image stages
            else:
                fallback = "dense" if r["rank"] is None else "cp"
                total += r["forms"][fallback]["ms"]
                if r["rank"] is not None:
                    missing.append(r["name"])
        totals[form] = total
        if missing:
            substituted[form] = missing
    staged = sum(r["forms"][_whole_form(r)]["ms"] for r in rows if r["rank"] is not None)
    stage_ms = {s: sum(r["stages"][s]["ms"] for r in rows if s in r["stages"]) for s in STAGES}
    allocation_ms = sum(r["allocation"]["ms"] for r in rows if r["rank"] is not None)
    shares = {s: ms / staged for s, ms in stage_ms.items() if ms and staged}
    shares["rest"] = 1 - sum(shares.values()) if staged else None
    return {"ms": totals, "speedup": {form: totals["dense"] / ms for form, ms in totals.items()},
            "substituted": substituted, "stage_ms": stage_ms, "staged_ms": staged, "stage_share": shares,
            "allocation_ms": allocation_ms}


def measure(names: Sequence[str], ranks: dict, size: tuple[int, int], batch: int, runs: int, channels_last: bool,
            compile_forms: bool, limit_s: float) -> list[dict]:
    model = hed.load_hed().eval()
    sizes = conv_input_sizes(model, (1, 3, *size))
    cp_ranks = {name: ranks[name] for name in names if ranks.get(name) is not None}
    cp_model = apply_structure(copy.deepcopy(model), cp_ranks).eval()  # random factors (reset_parameters)
    pairs = {}
    for name in cp_ranks:
        conv = model.get_submodule(name)
        shape = ConvShape.of_conv(conv, sizes[id(conv)], batch=batch)
        pairs[name] = tucker2_pair(shape, FAMILIES["cp"].macs(shape, cp_ranks[name]))
    tucker2_model = apply_structure(copy.deepcopy(model), pairs).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for name in names:
        conv = model.get_submodule(name)
        x = torch.randn(batch, conv.in_channels, *sizes[id(conv)]).contiguous(memory_format=memory_format)
        cp = cp_model.get_submodule(name) if name in cp_ranks else None
        tucker2 = tucker2_model.get_submodule(name) if name in cp_ranks else None
        row = measure_layer(name, conv, cp, tucker2, x, runs, compile_forms, limit_s)
        rows.append(row)
        print(json.dumps({"name": name, "rank": row["rank"], "plan": row.get("plan", {}).get("arrangement"),
                          **{f: round(v["ms"], 3) for f, v in row["forms"].items()}}), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def _ms(entry: Optional[dict], dense: Optional[dict] = None) -> str:
    if entry is None:
        return "-"
    text = f"{entry['ms']:.2f}"
    return f"{text} ({dense['ms'] / entry['ms']:.2f}x)" if dense is not None else text


def _rate(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    if "gmacs" in entry:
        return f"{entry['ms']:.2f} ({entry['gmacs']:.0f})"
    if "gbs" in entry:
        return f"{entry['ms']:.2f} ({entry['gbs']:.1f} GB/s)"
    return f"{entry['ms']:.2f}"


def to_markdown(rows: Sequence[dict], network: dict, settings: dict, env: dict) -> str:
    lines = [f"# HED's convs at the ranks of {settings['config']}: forms and stages ({env['device']})", "",
             f"torch {env['torch']}, commit {env['git_commit'][:7]}. Input {settings['size'][0]}x{settings['size'][1]}"
             f", batch {settings['batch']}, {settings['threads']} threads, median of {settings['runs']} interleaved "
             f"rounds, load average {settings['load_average'][0]:.1f} before and {env['load_average_at_end'][0]:.1f} "
             "after. Random factors; dense is HED's trained conv. `cp`: backend=\"auto\" (the CPU plan's choice); "
             "`staged`: the arranged stages whole (banded where the plan bands the image); `pixel-major`: the "
             "whole-image stages where `staged` is banded; `tucker2`: Tucker-2 at the pair of the same MACs; `compiled`: "
             "torch.compile of the layer; `compiled-arranged`: of the arranged stages.", "",
             "## Forms (ms, speed-up against dense)", "",
             "| conv | input | Cin->Cout | rank | plan | " + " | ".join(FORMS) + " | Tucker-2 rank | compile s |",
             "|---|---|---|---|---|" + "---|" * len(FORMS) + "---|---|"]
    for r in rows:
        dense = r["forms"]["dense"]
        cells = [_ms(r["forms"].get(f), None if f == "dense" else dense) for f in FORMS]
        compile_s = ", ".join(f"{v['seconds']:.1f}" + ("" if v["error"] is None else " (failed)")
                              for v in r.get("compile", {}).values()) or "-"
        plan = r.get("plan", {}).get("arrangement", "dense (kept)")
        pair = "x".join(map(str, r.get("tucker2_rank", ["-"])))
        lines.append(f"| {r['name']} | {r['input'][2]}x{r['input'][3]} | {r['cin']}->{r['cout']} | {r['rank'] or '-'} "
                     f"| {plan} | " + " | ".join(cells) + f" | {pair} | {compile_s} |")
    lines += ["", "## Stages of the arranged path (ms, GMAC/s or GB/s; allocation: the intermediates' page faults, "
              "not added to the rest; rest: staged minus its stages)", "",
              "| conv | arrangement | dense (GMAC/s) | " + " | ".join(STAGES)
              + " | allocation ms | staged ms | rest ms |",
              "|---|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
    for r in rows:
        if r["rank"] is None:
            continue
        stages = r["stages"]
        whole = r["forms"][_whole_form(r)]["ms"]
        rest = whole - sum(e["ms"] for e in stages.values())
        lines.append(f"| {r['name']} | {r['staged'].get('stages_of', r['staged']['arrangement'])} | "
                     f"{_rate(r['forms']['dense'])} | " + " | ".join(_rate(stages.get(s)) for s in STAGES)
                     + f" | {r['allocation']['ms']:.2f} | {whole:.2f} | {rest:.2f} |")
    totals = network["ms"]
    lines += ["", "## Network (the convs summed)", "",
              "| " + " | ".join(FORMS) + " |", "|" + "---|" * len(FORMS),
              "| " + " | ".join(f"{totals[f]:.1f} ({network['speedup'][f]:.2f}x)" for f in FORMS) + " |", ""]
    if network["substituted"]:
        lines.append("Where a form is missing (not run, or a failed compile) the layer's `cp` time stands in: "
                     + "; ".join(f"{f}: {', '.join(names)}" for f, names in network["substituted"].items()) + ".")
        lines.append("")
    shares = ", ".join(f"{s} {100 * v:.0f} %" for s, v in network["stage_share"].items() if v is not None)
    lines.append(f"Share of the whole-image stages' time ({network['staged_ms']:.1f} ms summed): {shares}; "
                 f"allocating the intermediates alone {network['allocation_ms']:.1f} ms.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write hed_layers.{json,md} here")
    parser.add_argument("--ranks", default=RANKS, help="a hed_methods.json holding the configuration's ranks")
    parser.add_argument("--config", default=SETTINGS["config"], help="a CP row of --ranks (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", default=list(hed.CONV_NAMES), help="some of HED's 3x3 convs")
    parser.add_argument("--size", nargs=2, type=int, default=list(SETTINGS["size"]), help="the network's input H W")
    parser.add_argument("--batch", type=int, default=SETTINGS["batch"])
    parser.add_argument("--threads", type=int, default=SETTINGS["threads"])
    parser.add_argument("--runs", type=int, default=SETTINGS["runs"], help="interleaved rounds (the median's count)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs (HED runs NCHW)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile forms")
    parser.add_argument("--compile-limit", type=float, default=SETTINGS["compile_limit_s"],
                        help="seconds a layer's compile may take before it is recorded as too slow")
    args = parser.parse_args(argv)
    unknown = [name for name in args.layers if name not in hed.CONV_NAMES]
    if unknown:
        parser.error(f"not HED's 3x3 convs: {', '.join(unknown)} (they are {', '.join(hed.CONV_NAMES)})")
    ranks = configuration_ranks(args.ranks, args.config)
    settings = dict(size=tuple(args.size), config=args.config, ranks_file=os.path.relpath(args.ranks),
                    threads=args.threads, batch=args.batch, runs=args.runs, channels_last=args.channels_last,
                    compile=not args.no_compile, compile_limit_s=args.compile_limit, layers=list(args.layers),
                    load_average=os.getloadavg())
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = measure(args.layers, ranks, tuple(args.size), args.batch, args.runs, args.channels_last,
                       not args.no_compile, args.compile_limit)
    finally:
        torch.set_num_threads(previous)
    network = network_summary(rows)
    env = environment("cpu")
    env["load_average_at_end"] = os.getloadavg()
    markdown = to_markdown(rows, network, settings, env)
    data = {"environment": env, "settings": settings, "layers": rows, "network": network}
    if args.out:
        save_results(args.out, "hed_layers", data, markdown)
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
