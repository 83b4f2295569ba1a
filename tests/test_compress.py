"""compress_model / apply_structure: layer choice, reasons, report, input untouched, save and load."""
import copy
import io

import pytest
import torch
from torch import nn

import cpkernels
from cpkernels import CPConv2d, apply_structure, compress_model
from cpkernels.compression.compress import ROW_KEYS, rank_for_mac_fraction


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
            nn.Conv2d(32, 64, 1),  # pointwise
        )
        self.shared = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Sequential(self.shared, nn.ReLU(), self.shared)  # one conv used twice
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.head(self.body(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_compress_replaces_what_it_should_and_says_why_not():
    model = Net().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    out, report = compress_model(model, rank=4, input_size=(1, 3, 16, 16), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    rows = {r["name"]: r for r in report.rows}
    assert set(rows) == {"stem", "body.0", "body.2", "body.4", "body.5", "shared"}
    assert rows["body.4"]["skipped"].startswith("depthwise")
    assert rows["body.5"]["skipped"].startswith("1x1")
    for name in ("stem", "body.0", "body.2", "shared"):
        assert rows[name]["skipped"] is None, rows[name]
        assert isinstance(out.get_submodule(name), CPConv2d)
    assert out.head[0] is out.head[2] is out.shared  # replaced once, still shared
    assert out.body[2].groups == 2 and out.body[2].stride == (2, 2)
    for r in report.rows:
        assert set(r) == set(ROW_KEYS)
    assert rows["body.0"]["macs_before"] == 16 * 16 * 32 * 16 * 9
    assert rows["body.0"]["macs_after"] < rows["body.0"]["macs_before"]
    assert 0 <= rows["body.0"]["weight_error"] <= 1 and rows["body.0"]["degeneracy"] >= 1
    assert rows["body.0"]["cancellation"] >= 1 - 1e-9  # sum of the terms' norms over the weight's norm
    totals = report.totals
    assert totals["params_after"] < totals["params_before"]
    assert totals["macs_after"] < totals["macs_before"]
    assert "shared" in str(report) and "skipped: depthwise" in str(report)
    assert out(x).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, compressed",
    [
        pytest.param(dict(include=["body.*"]), {"body.0", "body.2"}, id="include"),
        pytest.param(dict(exclude=["body.*"]), {"stem", "shared"}, id="exclude"),
        pytest.param(dict(predicate=lambda n, m: m.stride == (1, 1)), {"stem", "body.0", "shared"}, id="predicate"),
        pytest.param(dict(skip_first=True), {"body.0", "body.2", "shared"}, id="skip-first"),
        pytest.param(dict(min_channels=32), {"body.2", "shared"}, id="min-channels"),
        pytest.param(dict(rank={"stem": 2, "shared": 8}), {"stem", "shared"}, id="per-layer-dict"),
    ],
)
def test_layer_selection(kwargs, compressed):
    kwargs.setdefault("rank", 4)
    _, report = compress_model(Net(), progress=False, **kwargs)
    assert {r["name"] for r in report.rows if r["skipped"] is None} == compressed
    if isinstance(kwargs["rank"], dict):
        assert report.structure == kwargs["rank"]


def test_rank_that_saves_no_macs_is_skipped():
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    _, report = compress_model(model, rank=200, input_size=(1, 4, 8, 8), progress=False)
    assert "saves no MACs" in report.rows[0]["skipped"]


def test_target_error_policy_and_csv(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    out, report = compress_model(model, target_error=0.5, progress=False)  # as README offers it: no rank=None
    for r in report.rows:
        if r["skipped"] is None:
            assert r["weight_error"] <= 0.5
    path = tmp_path / "report.csv"
    report.to_csv(path)
    text = path.read_text().splitlines()
    assert text[0].split(",")[:3] == ["name", "shape", "stride"] and len(text) == 3


def test_default_rank_policy_is_a_quarter_of_the_parameters():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    _, default = compress_model(model, progress=False)
    _, quarter = compress_model(model, rank=0.25, progress=False)
    assert [r["rank"] for r in default.rows] == [r["rank"] for r in quarter.rows]
    with pytest.raises(ValueError, match="give either rank or target_error"):
        compress_model(model, rank=0.5, target_error=0.3, progress=False)


def test_inplace_modifies_and_keeps_device_and_dtype():
    model = Net().to(torch.float64)
    out, _ = compress_model(model, rank=4, inplace=True, progress=False)
    assert out is model and isinstance(model.stem, CPConv2d)
    assert model.stem.output_factor.dtype == torch.float64


def test_torch_save_and_apply_structure_round_trip():
    model, report = compress_model(Net().eval(), rank=4, progress=False)
    x = torch.randn(1, 3, 16, 16)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))

    fresh = apply_structure(Net().eval(), report.structure)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    assert fresh.head[0] is fresh.head[2]


def test_rank_for_mac_fraction():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    r = rank_for_mac_fraction(conv, 0.25, (32, 32))
    _, report = compress_model(nn.Sequential(conv), rank=r, input_size=(1, 64, 32, 32), progress=False)
    row = report.rows[0]
    assert row["macs_after"] <= 0.25 * row["macs_before"]
    _, bigger = compress_model(nn.Sequential(conv), rank=r + 1, input_size=(1, 64, 32, 32), progress=False)
    assert bigger.rows[0]["macs_after"] > 0.25 * row["macs_before"]


def test_public_names():
    assert cpkernels.compress_model is compress_model and cpkernels.apply_structure is apply_structure


def test_digits_example_recovers_accuracy():
    """The example end to end: fine-tuned accuracy within 1 point of the uncompressed model's."""
    pytest.importorskip("sklearn")  # installed by the test extras; may be absent on a bare GPU machine
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "digits_finetune.py"
    spec = importlib.util.spec_from_file_location("digits_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.run()
    assert r["acc_finetuned"] >= r["acc_dense"] - 1.0, r
    assert all(row["macs_after"] <= 0.25 * row["macs_before"] for row in r["report"].rows if row["skipped"] is None)
    assert r["conv_macs_after"] < r["conv_macs_before"] / 3.5


@pytest.mark.parametrize("kwargs", [pytest.param(dict(rank=0.3), id="fraction"), pytest.param(dict(rank=5), id="int"),
                                    pytest.param(dict(target_error=0.6), id="target-error")])
def test_rank_multiple_rounds_every_rank_up(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1))
    _, report = compress_model(model, rank_multiple=8, n_iter_max=20, progress=False, **kwargs)
    assert report.structure and all(r % 8 == 0 for r in report.structure.values()), report.structure


def test_rank_multiple_must_be_a_positive_int():
    with pytest.raises(ValueError, match="rank_multiple"):
        compress_model(nn.Sequential(nn.Conv2d(8, 8, 3)), rank=2, rank_multiple=0)
