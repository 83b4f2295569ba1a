"""What every benchmark smoke test on HED's real weights shares: the skip it starts with, each reason saying what is
missing, and the tiny settings of :mod:`bench.hed_methods` it runs at."""
import pytest

from bench import hed_methods
from cpkernels.tools import hed


def skip_without_hed(photos: bool = True) -> None:
    """Skip the calling test module where HED's weights cannot be read, or (``photos``) where the calibration and
    judging photos cannot be had. Call it at module level, before the benchmark's tests."""
    pytest.importorskip("h5py", reason="HED's weights are read with h5py")
    if photos:
        pytest.importorskip("skimage", reason="the calibration photos ship with scikit-image")
        pytest.importorskip("sklearn", reason="the judging photos ship with scikit-learn")
    try:
        hed.hed_weights_path()
    except FileNotFoundError as error:
        pytest.skip(str(error), allow_module_level=True)


def tiny_settings(monkeypatch, **changes) -> None:
    """:data:`bench.hed_methods.SETTINGS` for a smoke run, for the length of the test: one calibration photo (and its
    mirror) at 48x64, judged at 48x64, one ALS iteration, a two-rung ladder; ``changes`` on top."""
    settings = dict(calibration_photos=hed.CALIBRATION_PHOTOS[:1], calibration_size=(48, 64), size=(48, 64),
                    n_iter_max=1, ladder=(0.2, 0.1))
    for key, value in {**settings, **changes}.items():
        monkeypatch.setitem(hed_methods.SETTINGS, key, value)
