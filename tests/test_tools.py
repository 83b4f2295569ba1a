"""Smoke tests of the command-line tools on the CPU: profiler, benchmark report."""
import json
import os
import subprocess
import sys

import pytest

from cpkernels.tools import profile
from cpkernels.tools.layers import LAYERS, LAYERS_BY_NAME


def test_shared_layer_list():
    names = [layer.name for layer in LAYERS]
    assert len(names) == len(set(names))
    assert {"example-3-2-5x5", "vgg19-conv1_1", "alexnet-conv2-5x5"} <= set(names)
    assert sum(name.startswith("vgg16-") for name in names) == 8  # with vgg19-conv1_1 = VGG-16's conv1_1
    assert any(layer.shape.stride == 2 for layer in LAYERS)
    assert LAYERS_BY_NAME["vgg16-conv3_2"].ranks() == (16, 32, 64, 128, 256, 320)
    assert LAYERS_BY_NAME["vgg19-conv1_1"].ranks() == (1, 2, 3, 4)  # C = 3: 3/16 and 3/8 round to 1


def test_rows_kernel_factor_bytes_by_hand():
    from cpkernels.core.cost import ConvShape

    # 2 images, 10x20 output (padding 1), ROWS 4, BLOCK_W 16: 3 bands x 2 strips = 6 programs per image.
    shape = ConvShape(2, 8, 6, (10, 20))
    per_program = (4 + 2) * 3 * 8 * 5 + 4 * 6 * 5  # input rows x kw x Cin x R + output rows x Cout x R
    assert shape.rows_kernel_factor_bytes(5, rows=4, block_w=16, element_size=2) == 2 * 6 * per_program * 2
    strided = ConvShape(1, 8, 6, (10, 20), stride=2)  # 5x10 output: 2 bands, 1 strip, 9 input rows each
    assert strided.rows_kernel_factor_bytes(5, 4, 16, 2) == 2 * (9 * 3 * 8 * 5 + 4 * 6 * 5) * 2


def test_results_record_the_allocator_environment(monkeypatch):
    # glibc's malloc settings change the CPU time of large tensors (README): every result says which were set
    for key in [k for k in os.environ if k.startswith(profile.ALLOCATOR_ENV_PREFIXES)]:
        monkeypatch.delenv(key)
    assert profile.environment("cpu")["allocator_env"] == {}
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOCX", "1")  # not one of glibc's MALLOC_ variables: left out
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert profile.environment("cpu")["allocator_env"] == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0",
                                                          "MALLOC_MMAP_MAX_": "0"}


def test_profiler_on_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    trace = tmp_path / "trace.json"
    profile.main(["--cin", "16", "--cout", "32", "--size", "12x10", "--batch", "2", "--rank", "8",
                  "--device", "cpu", "--json", str(out), "--trace", str(trace)])
    text = capsys.readouterr().out
    assert "Profiling on the CPU" in text and "reference path per stage" in text
    data = json.loads(out.read_text())
    assert {r["backend"] for r in data["backends"]} == {"dense", "reference", "cpu", "compiled-reference"}
    assert set(data["reference_stages_ms"]) == {"stage1_pointwise_in", "stage2_vertical", "stage3_horizontal",
                                                "stage4_pointwise_out"}
    assert all(r["spill_bytes"] == 0 for r in data["fused_kernel"]["configs"])
    assert data["cpu_plan"] == {"arrangement": "nchw", "chunk": 2}  # rank 8: NCHW intermediates
    assert "cpu path: nchw arrangement, batch chunks of 2" in text
    assert json.loads(trace.read_text())  # a Chrome trace


def test_profiler_applies_dilation(monkeypatch):
    """--dilation reaches every backend: the dense conv's output shrinks by the dilated kernel."""
    import torch

    from cpkernels.core.cost import ConvShape

    captured = {}
    original = profile.build_cases

    def spy(*args, **kwargs):
        cases = original(*args, **kwargs)
        with torch.inference_mode():  # as the profiler times them
            captured.update({c.backend: c.fn(c.x).shape for c in cases})
        return cases

    monkeypatch.setattr(profile, "build_cases", spy)
    profile.main(["--cin", "8", "--cout", "8", "--size", "12", "--batch", "1", "--rank", "4", "--padding", "0",
                  "--dilation", "2", "--device", "cpu"])
    assert set(captured.values()) == {(1, 8, 8, 8)}  # 12 - 2*(3-1) = 8 for every backend
    assert ConvShape(1, 8, 8, (12, 12), padding=0).out_size == (10, 10)  # the cost model's own (dilation 1)


def test_profiler_lists_layers(capsys):
    profile.main(["--list"])
    assert "vgg16-conv3_2" in capsys.readouterr().out


def test_benchmark_report_from_a_real_run(tmp_path):
    """Time one small group for real, then build the Markdown table and both plots from its JSON."""
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "-k", "resnet18-layer4-R32",
           f"--benchmark-json={results}", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
           "--benchmark-warmup=off"]
    # Under pytest-xdist the worker's variables would make pytest-benchmark skip the timing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    from bench import report

    report.main([str(results), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "| resnet18-layer4 | 32 | nchw |" in md and "×" in md
    assert (tmp_path / "speedup_vs_rank.png").stat().st_size > 1000
    assert (tmp_path / "roofline.png").stat().st_size > 1000


def test_report_refuses_untimed_results(tmp_path):
    from bench import report

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit, match="no timed benchmarks"):
        report.main([str(empty)])


def test_gpu_bench_script_on_cpu(tmp_path):
    """The GPU check's benchmark script, run on the CPU at a tiny size: the table and files it writes."""
    from bench import gpu_bench

    gpu_bench.main(["--out", str(tmp_path), "--device", "cpu", "--layers", "roofline-128-28", "--batch", "1",
                    "--dtypes", "float32"])
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {r["backend"] for r in data["rows"]} == {"dense", "reference"}  # no fused rows without CUDA
    assert {r["rank"] for r in data["rows"]} == {32, 64, 128, 160}  # C/4, C/2, C, 1.25 C
    assert all(r["modeled_us"] > 0 and r["planned"] for r in data["rows"])  # each row beside the GPU plan's model
    assert "| 128->128 @28^2 N=1 | 32 | float32 | dense | nchw |" in (tmp_path / "gpu_bench.md").read_text()


def test_gpu_bench_fused_row_notes_config_and_l2_bytes():
    """What the GPU table adds to a fused row, after a launch (here under the interpreter)."""
    import torch

    from bench import gpu_bench
    from cpkernels import cp_conv2d
    from cpkernels.core.cost import ConvShape

    from .oracle import random_factors

    cp_conv2d(torch.randn(1, 8, 9, 10), random_factors(6, 8, (3, 3), 4), padding=1, backend="triton")
    shape = ConvShape(32, 256, 256, (56, 56))  # the traffic is the model's, for any shape
    info = gpu_bench.fused_launch_info(shape, 64, torch.bfloat16)
    config = info["config"]
    assert config["kernel"] == "rows"
    expected = shape.rows_kernel_factor_bytes(64, config["ROWS"], config["BLOCK_W"], 2) / 1e6
    assert info["factor_mb_from_l2"] == round(expected, 1) > 100
    assert "kernel=rows" in gpu_bench._config_text(config)


def test_gpu_bench_times_the_taps_kernel_too(monkeypatch):
    """--taps-layers rows run the same fused cases with the taps kernel forced, then restore the default."""
    import torch

    from bench import gpu_bench
    from cpkernels.core.cost import ConvShape
    from cpkernels.kernels import cp_conv2d_fused as fused
    from cpkernels.tools.profile import Case

    seen = set()
    x = torch.zeros(1)

    def fake_cases(shape, rank, dtype, device, backends):
        return [Case(b, "nchw", lambda x, b=b: seen.add((b, fused.DEFAULT_KERNEL)), x, 1) for b in ("dense", "fused")]

    monkeypatch.setattr(gpu_bench, "build_cases", fake_cases)
    monkeypatch.setattr(gpu_bench, "fused_launch_info", lambda *args: {})
    rows = gpu_bench.bench_layer(ConvShape(1, 8, 8, (8, 8)), 2, torch.float32, "cpu", 1e9, also_taps=True)
    assert [r["backend"] for r in rows] == ["dense", "fused", "fused-taps"]
    assert seen == {("dense", "auto"), ("fused", "auto"), ("fused", "taps")}
    assert fused.DEFAULT_KERNEL == "auto"


def test_gpu_bench_graph_time(device):
    """CUDA-graph replay time on a GPU; elsewhere the failed capture is recorded, not raised."""
    import torch

    from bench import gpu_bench
    from cpkernels.tools.profile import Case

    info = gpu_bench.graph_time(Case("dense", "nchw", lambda x: x * 2, torch.zeros(1024, device=device), 1))
    if device == "cuda":
        assert info["graph_us"] > 0
    else:
        assert set(info) == {"graph_error"} and info["graph_error"]
