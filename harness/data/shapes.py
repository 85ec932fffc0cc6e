"""Procedural shapes: class-conditional colour images that never repeat, bit-identical on every machine.

Image i of a split is a pure function of (seed, split, i). Its parameters come from a counter-based hash: the
image's key is splitmix64 of (stream key + (i + 1) * gamma), and its parameter j is the j-th output of a splitmix64
generator started at that key, computed in numpy uint64 (wrapping arithmetic, exact). A parameter's uniform is the
top 24 bits of its hash times 2^-24 (exact in float32). Rendering uses only operations IEEE 754 rounds exactly
(+ - * / sqrt, min, max, abs, floor, comparisons) in float32, each a separate numpy ufunc (no fused multiply-add):
no sin, cos, exp, log or pow, whose libm and SIMD versions differ in the last bit between CPUs. A rotation is
therefore the rational one, cos = (1 - t^2) / (1 + t^2), sin = 2t / (1 + t^2), with t in [-tan(pi/8), tan(pi/8)]
(angles within +-45 degrees, nearly uniform: the density of the angle varies by 17%) and one of four quarter-turns.
Edges are anti-aliased by analytic coverage, clip(0.5 - signed distance / pixel, 0, 1), and the colour is quantised
to uint8 as floor(v * 255 + 0.5). The model sees uint8 / 127.5 - 1, which `datasets.to_uint8_rgb` rounds back to
the same bytes.

Ten classes whose shape types stay distinct under any rotation and scale (SHAPE_CLASSES). Each image has its own
background colour, a foreground colour at least FG_MIN_CONTRAST away from it (L1 over RGB in [0, 1]), a position
that keeps the shape on the canvas, a scale, a rotation and one shape parameter (a ring's thickness, a bar's width,
...): eleven continuous factors beside the class, so a bigger model keeps finding something to learn.

Splits (SPLIT_CODES): `train`, an unlimited stream (image i for every i; no image is ever repeated, so there is no
epoch); `test`, a fixed held-out set of HELDOUT_COUNT images from its own stream (the validation loss and the FID
reference); `floor`, FLOOR_COUNT further real images, neither trained on nor the reference (the metric floors: 3
disjoint draws of FID-5K).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SHAPE_CLASSES = ("disk", "ring", "square", "triangle", "plus", "bar", "crescent", "two dots", "half-disk", "L")
NUM_CLASSES = len(SHAPE_CLASSES)
CHANNELS = 3
SIZES = (16, 32)  # powers of two: the pixel grid and the pixel size are exact binary fractions
DEFAULT_SIZE = 16
SEED = 0  # the data kind's seed: every `shapes` run sees the same stream
SPLIT_CODES = {"train": 0, "test": 1, "floor": 2}
HELDOUT_COUNT = 2048
FLOOR_COUNT = 15_000
# The nominal length of the unlimited training stream, for code that calls len(); `unique_images` None is the signal
# that it never repeats (datasets.unique_images).
STREAM_LENGTH = 2**62
# Bump when anything below changes the images: describe() checksums it with the parameters.
GENERATOR_VERSION = 1

# Parameter ranges, in canvas units (the canvas is [0, 1]^2) unless said otherwise.
SCALE_RANGE = (0.24, 0.40)  # radius of the shape's bounding circle: 3.8 to 6.4 pixels at 16 x 16
ROTATION_T_MAX = 0.41421356  # tan(pi/8): t in [-tan(pi/8), tan(pi/8)] is an angle within +-45 degrees
FG_MIN_CONTRAST = 0.6  # L1 distance over RGB in [0, 1] between foreground and background
FG_CANDIDATES = 4  # foreground draws tried before the fallback (each passes with probability ~0.8)

# Parameter numbers: the j-th output of the image's splitmix64 generator.
P_CLASS, P_QUARTER, P_ROT, P_CX, P_CY, P_SCALE, P_SHAPE = range(7)
P_BG = 7  # 3 channels
P_FG = 10  # FG_CANDIDATES x 3 channels
NUM_PARAMS = P_FG + 3 * FG_CANDIDATES

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (odd: i -> i * gamma is a bijection mod 2^64)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_F32 = np.float32
_U24 = _F32(2.0**-24)
_SQRT3_2 = _F32(0.8660254)  # sqrt(3) / 2, rounded once here (a literal, not a libm call)
_CHUNK = 512  # images rendered at once: the float32 temporaries (512 x 16 x 16) stay in the CPU's L2 cache


# ---------------------------------------------------------------------------------------------------------
# The counter-based hash


def _mix64(z: np.ndarray) -> np.ndarray:
    """Returns splitmix64's finaliser of a uint64 array (a bijection; numpy arrays wrap without warnings)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, split: str) -> np.ndarray:
    """Returns the uint64 key (shape (1,)) of a split's stream of a seed; ValueError for an unknown split."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown shapes split {split!r}; allowed: {', '.join(SPLIT_CODES)}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"shapes seed must be an integer in [0, 2^64), got {seed!r}")
    s = _mix64(np.array([int(seed)], dtype=np.uint64) + _GAMMA)
    return _mix64(s + np.array([SPLIT_CODES[split] + 1], dtype=np.uint64) * _GAMMA)


def param_hashes(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    """Returns the uint64 hashes (N, NUM_PARAMS) of the parameters of images `indices` (non-negative integers)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)):
        raise ValueError(f"indices must be a 1-d array of non-negative integers, got {idx.dtype} {idx.shape}")
    key = _mix64(stream_key(seed, split) + (idx.astype(np.uint64) + np.uint64(1)) * _GAMMA)
    steps = (np.arange(1, NUM_PARAMS + 1, dtype=np.uint64) * _GAMMA)[None, :]
    return _mix64(key[:, None] + steps)


def _uniform(h: np.ndarray) -> np.ndarray:
    """Returns float32 uniforms in [0, 1 - 2^-24] from uint64 hashes: the top 24 bits, scaled exactly."""
    return (h >> np.uint64(40)).astype(_F32) * _U24


def _between(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return _F32(lo) + u * (_F32(hi) - _F32(lo))


def labels_of(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    """Returns the class labels (N,) int64 of images `indices`, without rendering them."""
    h = param_hashes(seed, split, indices)[:, P_CLASS]
    return ((h >> np.uint64(32)) % np.uint64(NUM_CLASSES)).astype(np.int64)


def image_params(seed: int, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the parameters of images `indices`: {"label" (N,) int64, "cos", "sin" (N,) float32 of the rotation,
    "cx", "cy" (N,) centre in canvas units ([0, 1], x to the right, y down), "scale" (N,) bounding radius in canvas
    units, "shape" (N,) the class's own parameter in [0, 1), "bg", "fg" (N, 3) colours in [0, 1]}."""
    h = param_hashes(seed, split, indices)
    u = _uniform(h)
    label = ((h[:, P_CLASS] >> np.uint64(32)) % np.uint64(NUM_CLASSES)).astype(np.int64)
    # Rotation: the rational parametrisation within +-45 degrees, then a quarter-turn (exact: swaps and signs).
    t = _between(u[:, P_ROT], -ROTATION_T_MAX, ROTATION_T_MAX)
    t2 = t * t
    c0, s0 = (_F32(1) - t2) / (_F32(1) + t2), (_F32(2) * t) / (_F32(1) + t2)
    quarter = (h[:, P_QUARTER] >> np.uint64(62)).astype(np.int64)
    cos = np.select([quarter == 0, quarter == 1, quarter == 2], [c0, -s0, -c0], s0).astype(_F32)
    sin = np.select([quarter == 0, quarter == 1, quarter == 2], [s0, c0, -s0], -c0).astype(_F32)
    scale = _between(u[:, P_SCALE], *SCALE_RANGE)
    # The centre keeps the bounding circle on the canvas: in [scale, 1 - scale].
    cx = scale + u[:, P_CX] * (_F32(1) - _F32(2) * scale)
    cy = scale + u[:, P_CY] * (_F32(1) - _F32(2) * scale)
    bg = u[:, P_BG:P_BG + 3]
    # Foreground: the first candidate with enough contrast; else each channel half a range away from the background.
    fg = np.where(bg < _F32(0.5), bg + _F32(0.5), bg - _F32(0.5))
    for k in reversed(range(FG_CANDIDATES)):
        cand = u[:, P_FG + 3 * k:P_FG + 3 * k + 3]
        d = np.abs(cand - bg)
        ok = (d[:, 0] + d[:, 1]) + d[:, 2] >= _F32(FG_MIN_CONTRAST)  # written out: a reduction may reorder
        fg = np.where(ok[:, None], cand, fg)
    return {"label": label, "cos": cos, "sin": sin, "cx": cx, "cy": cy, "scale": scale, "shape": u[:, P_SHAPE],
            "bg": bg, "fg": fg}


# ---------------------------------------------------------------------------------------------------------
# Signed distances, in the shape's own frame: the shape fits in the unit disk, negative inside


def _length(x, y):
    return np.sqrt(x * x + y * y)


def _box(x, y, hx, hy):
    """Signed distance to the axis-aligned box |x| <= hx, |y| <= hy."""
    dx, dy = np.abs(x) - hx, np.abs(y) - hy
    zero = _F32(0)
    return _length(np.maximum(dx, zero), np.maximum(dy, zero)) + np.minimum(np.maximum(dx, dy), zero)


def _disk(x, y, a):
    return _length(x, y) - (_F32(0.8) + _F32(0.15) * a)


def _ring(x, y, a):
    w = _F32(0.13) + _F32(0.09) * a  # half thickness; the outer edge at radius 0.95
    return np.abs(_length(x, y) - (_F32(0.95) - w)) - w


def _square(x, y, a):
    b = _F32(0.6) + _F32(0.07) * a  # half side; its corners within 0.95
    return _box(x, y, b, b)


def _triangle(x, y, a):
    # Equilateral, centred: the largest of the three edge distances (exact inside, rounds the corners outside).
    h = _F32(0.44) + _F32(0.03) * a  # inradius (circumradius 2h <= 0.94)
    e1 = _SQRT3_2 * x - _F32(0.5) * y
    e2 = -_SQRT3_2 * x - _F32(0.5) * y
    return np.maximum(np.maximum(y, e1), e2) - h


def _plus(x, y, a):
    w = _F32(0.17) + _F32(0.09) * a  # half width of the arms
    arm = _F32(0.92)
    return np.minimum(_box(x, y, arm, w), _box(x, y, w, arm))


def _bar(x, y, a):
    return _box(x, y, _F32(0.93), _F32(0.15) + _F32(0.1) * a)


def _crescent(x, y, a):
    # A disk of radius 0.7 cut out of one of 0.95, offset so that the crescent is 0.7 to 0.9 thick at its middle:
    # thin horns on a thick body, never a thin arc that reads as a bent bar.
    o = _F32(0.45) + _F32(0.2) * a
    return np.maximum(_length(x, y) - _F32(0.95), _F32(0.7) - _length(x - o, y))


def _two_dots(x, y, a):
    r = _F32(0.3) + _F32(0.09) * a
    d = _F32(0.95) - r  # the dots touch the unit circle; the gap between them is 1.9 - 4r
    ax = np.abs(x)  # symmetric: one dot at (+-d, 0)
    return _length(ax - d, y) - r


def _half_disk(x, y, a):
    r = _F32(0.9) + _F32(0.05) * a
    yc = _F32(-0.25)  # the flat side at y = -0.25, so the shape sits round its centre (corners within 0.98)
    return np.maximum(_length(x, y - yc) - r, yc - y)


def _ell(x, y, a):
    w = _F32(0.14) + _F32(0.06) * a  # half thickness of both arms: thin, so the right angle reads clearly
    x0, y0, y1 = _F32(-0.6), _F32(-0.68), _F32(0.68)
    upright = _box(x - (x0 + w), y, w, y1)
    foot = _box(x, y - (y0 + w), _F32(0.6), w)
    return np.minimum(upright, foot)


_SDF = (_disk, _ring, _square, _triangle, _plus, _bar, _crescent, _two_dots, _half_disk, _ell)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _pixel_centres(size: int) -> np.ndarray:
    return ((np.arange(size, dtype=_F32) + _F32(0.5)) / _F32(size)).astype(_F32)


def _coverage(p: dict[str, np.ndarray], rows: np.ndarray, size: int, cls: int) -> np.ndarray:
    """Returns the foreground coverage (n, size, size) float32 in [0, 1] of images `rows` of `p`, all of class cls."""
    g = _pixel_centres(size)
    cos, sin, scale = (p[k][rows][:, None, None] for k in ("cos", "sin", "scale"))
    dx = g[None, None, :] - p["cx"][rows][:, None, None]  # (n, 1, S): x along columns
    dy = g[None, :, None] - p["cy"][rows][:, None, None]  # (n, S, 1): y along rows
    # Into the shape's frame: rotate by minus the angle, divide by the scale.
    x = (dx * cos + dy * sin) / scale
    y = (dy * cos - dx * sin) / scale
    sdf = _SDF[cls](x, y, p["shape"][rows][:, None, None])
    # Signed distance in pixels: unit-frame distance x scale x pixels per canvas unit.
    d = sdf * (scale * _F32(size))
    return np.minimum(np.maximum(_F32(0.5) - d, _F32(0)), _F32(1))


def render(seed: int, split: str, indices, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, size, size, 3), labels int64 (N,)) of images `indices` of a split's stream.

    Image i is the same whatever batch it is rendered in (every operation is elementwise per image)."""
    if size not in SIZES:
        raise ValueError(f"shapes image_size {size} not allowed; allowed: {SIZES}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(idx), dtype=np.int64)
    for lo in range(0, len(idx), _CHUNK):
        p = image_params(seed, split, idx[lo:lo + _CHUNK])
        cov = np.empty((len(p["label"]), size, size), dtype=_F32)
        for cls in np.unique(p["label"]):  # grouped by class: one vectorised distance function per group
            rows = np.flatnonzero(p["label"] == cls)
            cov[rows] = _coverage(p, rows, size, int(cls))
        bg, diff = p["bg"][:, None, None, :], (p["fg"] - p["bg"])[:, None, None, :]
        v = bg + cov[..., None] * diff
        out[lo:lo + _CHUNK] = np.floor(v * _F32(255) + _F32(0.5)).astype(np.uint8)
        labels[lo:lo + _CHUNK] = p["label"]
    return out, labels


def to_model(images: np.ndarray) -> Tensor:
    """Returns uint8 images (N, H, W, 3) as the model sees them: float32 (N, 3, H, W), uint8 / 127.5 - 1 in [-1, 1]
    (datasets.to_uint8_rgb maps them back to the same bytes)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    return (x / 127.5 - 1.0).contiguous()


CHECKSUM_PROBE = 64  # held-out images whose bytes enter the checksum


def generator_checksum(seed: int = SEED, size: int = DEFAULT_SIZE) -> str:
    """Returns the sha256 hex digest of the generator's version, seed, resolution, classes, ranges and hash constants
    and of the bytes of its first CHECKSUM_PROBE held-out images: it changes when the images would, and differs on a
    machine that renders them differently."""
    facts = (GENERATOR_VERSION, int(seed), int(size), SHAPE_CLASSES, SPLIT_CODES, HELDOUT_COUNT, FLOOR_COUNT,
             SCALE_RANGE, ROTATION_T_MAX, FG_MIN_CONTRAST, FG_CANDIDATES, NUM_PARAMS, int(_GAMMA), int(_MIX1),
             int(_MIX2))
    h = hashlib.sha256(repr(facts).encode())
    h.update(render(seed, "test", np.arange(CHECKSUM_PROBE), size)[0].tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The data set


_COUNTS = {"train": None, "test": HELDOUT_COUNT, "floor": FLOOR_COUNT}


class ShapesDataset:
    """Procedural shapes at image_size (16 or 32), 3 channels, 10 classes, pixel space, no augmentation.

    `train` is an unlimited stream: `unique_images` is None (datasets.unique_images then says so) and len() is the
    nominal STREAM_LENGTH. `test` and `floor` are fixed sets (HELDOUT_COUNT, FLOOR_COUNT images), rendered once, on
    first use, and kept as uint8. The surface of datasets._Dataset: get_batch, augment, fixed, describe,
    __getitem__."""

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", image_size: int = DEFAULT_SIZE, seed: int = SEED):
        stream_key(seed, split)  # checks both
        if image_size not in SIZES:
            raise ValueError(f"shapes image_size {image_size} not allowed; allowed: {SIZES}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.unique_images = _COUNTS[split]
        self._stored: tuple[np.ndarray, np.ndarray] | None = None  # a fixed split's (uint8 images, labels)

    def __len__(self) -> int:
        return STREAM_LENGTH if self.unique_images is None else self.unique_images

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]

    def _check(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"shapes {self.split} indices must lie in [0, {len(self)}), got "
                             f"[{idx.min()}, {idx.max()}]")

    def _uint8(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Returns (uint8 images (N, H, W, 3), labels (N,) int64) at `indices`: rendered (the stream), or taken
        from the fixed split, rendered whole the first time (15,000 images take well under a second)."""
        idx = (indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices)).astype(np.int64).reshape(-1)
        self._check(idx)
        if self.unique_images is None:
            return render(self.seed, self.split, idx, self.image_size)
        if self._stored is None:
            self._stored = render(self.seed, self.split, np.arange(self.unique_images), self.image_size)
        return self._stored[0][idx], self._stored[1][idx]

    def uint8_images(self, indices=None) -> np.ndarray:
        """Returns images `indices` (all of a fixed split when None) as uint8 (N, H, W, 3)."""
        if indices is None:
            if self.unique_images is None:
                raise ValueError("the shapes training stream is unlimited: name the indices")
            indices = np.arange(self.unique_images)
        return self._uint8(indices)[0]

    def get_batch(self, indices) -> tuple[Tensor, Tensor]:
        """Returns (images (N, 3, S, S) float32 in [-1, 1], labels (N,) int64) at `indices`."""
        u8, labels = self._uint8(indices)
        return to_model(u8), torch.from_numpy(labels)

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns x: no augmentation (no flips: every class is mirror- and rotation-invariant as a class)."""
        return x

    def fixed(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns x: the model sees the stored images as they are."""
        return x

    def describe(self) -> dict:
        """Returns JSON-able facts: name, seed, split, count (None: unlimited), resolution, channels, num_classes,
        classes, generator version and checksum."""
        return dict(name="shapes", seed=int(self.seed), split=self.split, count=self.unique_images,
                    resolution=self.image_size, channels=CHANNELS, num_classes=NUM_CLASSES,
                    classes=list(SHAPE_CLASSES), generator_version=GENERATOR_VERSION,
                    checksum=generator_checksum(self.seed, self.image_size))


# ---------------------------------------------------------------------------------------------------------
# A figure


def grid(per_class: int = 12, size: int = DEFAULT_SIZE, split: str = "test", seed: int = SEED) -> np.ndarray:
    """Returns uint8 (NUM_CLASSES, per_class, size, size, 3): the first `per_class` images of each class of a
    split's stream, in index order."""
    picked: dict[int, list[int]] = {c: [] for c in range(NUM_CLASSES)}
    start = 0
    while min(len(v) for v in picked.values()) < per_class:
        labels = labels_of(seed, split, np.arange(start, start + 1024))
        for i, c in enumerate(labels.tolist()):
            if len(picked[c]) < per_class:
                picked[c].append(start + i)
        start += 1024
    idx = np.array([picked[c] for c in range(NUM_CLASSES)]).reshape(-1)
    return render(seed, split, idx, size)[0].reshape(NUM_CLASSES, per_class, size, size, 3)


def save_grid(path: str | Path, per_class: int = 12, zoom: int = 6, gap: int = 2) -> Path:
    """Writes a PNG of `per_class` held-out images per class (one row per class, in SHAPE_CLASSES order), each
    enlarged `zoom` times by nearest neighbour, `gap` white pixels apart; returns the path."""
    from PIL import Image

    g = grid(per_class)
    cell = DEFAULT_SIZE * zoom + gap
    canvas = np.full((NUM_CLASSES * cell + gap, per_class * cell + gap, 3), 255, dtype=np.uint8)
    for r in range(NUM_CLASSES):
        for c in range(per_class):
            big = g[r, c].repeat(zoom, axis=0).repeat(zoom, axis=1)
            canvas[gap + r * cell:gap + r * cell + DEFAULT_SIZE * zoom,
                   gap + c * cell:gap + c * cell + DEFAULT_SIZE * zoom] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
