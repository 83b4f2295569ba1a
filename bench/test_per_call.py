"""Smoke test of the per-call benchmark: every family and mode, a few repeats, the result's structure (speed is
shown by the benchmark's runs, not asserted by a timed test)."""
from bench.per_call import run, to_markdown


def test_per_call_rows_are_complete():
    data = run(calls=3, rounds=2)
    rows = data["rows"]
    assert {(r["family"], r["autograd"]) for r in rows} == {(f, g) for f in ("cp", "tucker2", "svd")
                                                            for g in (False, True)}
    for r in rows:
        for name in ("layer", "forward", "functional", "impl", "conv", "module"):
            assert r[f"{name}_us"] > 0 and r[f"{name}_cpu_us"] >= 0
        assert r["own_work_us"] == round(r["layer_us"] - r["impl_us"], 2)
        assert r["package_us"] == round(r["forward_us"] - r["impl_us"], 2)
        assert r["beyond_module_us"] == round(r["layer_us"] - r["impl_us"] - r["module_us"], 2)
        assert isinstance(r["arrangement"], str)
    assert len(data["load_average_before"]) == 3 and data["environment"]["torch"]
    markdown = to_markdown(data)
    assert markdown.count("\n| ") == 1 + len(rows) and "load average" in markdown  # the header and the rows
