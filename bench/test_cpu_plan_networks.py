"""Smoke test of the eager CPU benchmark by CPU plan mode: both networks, one fraction, small images."""


def test_cpu_plan_networks_rows_cover_both_modes_and_the_measured_decisions():
    from bench.cpu_plan_networks import MODES, run, to_markdown
    from cpkernels.dispatch import cpu as cpu_dispatch

    saved = cpu_dispatch.MEASURE
    rows = run(fractions=(0.25,), size=32, repeats=1)
    assert cpu_dispatch.MEASURE is saved and not cpu_dispatch.measured_plans()  # the benchmark restores both
    assert [(r["network"], r["mode"]) for r in rows] == [(n, m) for n in ("resnet18", "vgg16") for m in MODES]
    for r in rows:
        assert r["dense_ms"] > 0 and r["cp_ms"] > 0
        if r["mode"] == "measure":
            assert 0 < r["layers"] and 0 <= r["layers_dense"] <= r["layers"]
        else:
            assert r["layers"] is None

    class Args:
        threads, batch, size, repeats = 2, 1, 32, 1

    assert "call signatures run dense" in to_markdown(rows, {"device": "cpu", "torch": "x"}, Args)
