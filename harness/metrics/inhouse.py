"""Feature extractors trained in-house, for data sets Inception does not measure: `digits-cnn` for the embedded
digits, `shapes-cnn` for the procedural shapes (one per embedded data kind). Each is a small classifier whose pooled
features give FID, KID and precision/recall, whose logits give IS, and whose middle feature map gives sFID,
registered with torch-fidelity. `shapes-cnn` also learnt, through a head used only in training, to regress each
image's colours, position and size, so its features see a model that gets them wrong.

Their weights ship with the package (`harness/metrics/weights/<name>.pt`) and are pinned by a content hash
(`Spec.weights_sha256`), so the same samples give the same FID on every machine: the weights were trained once by
`python -m harness.metrics.inhouse train NAME`, the script beside them, and are never retrained on first use (as an
earlier version did, whose weights, and so whose FIDs, depended on the CPU they were trained on). Every metric
record names the hash.

A metric measured with one of these is not comparable to an Inception one, so it is labelled with the data set the
extractor knows: "FID (digits extractor)", "sFID (digits extractor)", ... (harness.core.vocabulary.metric_label).

    python -m harness.metrics.inhouse train digits-cnn            # retrain (deterministic recipe), print the hash
    python -m harness.metrics.inhouse train shapes-cnn
    python -m harness.metrics.inhouse check                        # every shipped file against its pinned hash
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from harness.core import cli
from harness.core.runfolder import atomic_write_bytes
from harness.core.vocabulary import DIGITS_EXTRACTOR, IN_HOUSE_EXTRACTORS, SHAPES_EXTRACTOR, SPATIAL_FEATURE
from harness.data import datasets, shapes
from harness.data.datasets import to_uint8_rgb
from harness.metrics.frechet import spatial_feature

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_DIM = 64  # the pooled feature that FID, KID and precision/recall read
_FEATURE_LAYER = str(FEATURE_DIM)  # torch-fidelity names layers by width ("2048")
# sFID's map, the analogue of Inception's mixed_6/conv: the middle conv layer's ReLU output after its max pool,
# body[:6] -> (N, 32, S/4, S/4), whose first SFID_CHANNELS channels give 4 x 4 x 7 = 112 features at S = 16. Like
# mixed_6 (the 17 x 17 stage, before the 8 x 8 one) it is mid-network and spatial. The 8 x 8 map before the pool would
# give 448 features, more than the 296 digits the demo compares against: a singular covariance, as mixed_6/conv's
# 2,023 features are for 50,000 ImageNet references (25 images per feature); 112 keep ~3.
_SPATIAL_END = 6


def _digits_images(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images (N, H, W, 3), labels int64) of the embedded digits' split at `size`."""
    images, labels = datasets.digits_split(split, size)
    return to_uint8_rgb(images), labels.numpy().astype(np.int64)


# shapes-cnn learns from a fixed prefix of the unlimited training stream, and is scored on the held-out test set.
SHAPES_EXTRACTOR_TRAIN_IMAGES = 30_000


def _shapes_indices(split: str) -> tuple[str, np.ndarray]:
    """Returns (the shapes stream, its indices) an extractor's split reads: the first training images, or the whole
    held-out set."""
    if split == "train":
        return "train", np.arange(SHAPES_EXTRACTOR_TRAIN_IMAGES)
    return "test", np.arange(shapes.HELDOUT_COUNT)


def _shapes_images(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images (N, H, W, 3), labels int64) of the shapes an extractor trains ('train') or is scored on."""
    stream, idx = _shapes_indices(split)
    return shapes.render(shapes.SEED, stream, idx, size)


def _shapes_aux(split: str) -> np.ndarray:
    """Returns the auxiliary regression targets (N, 10) float32 of `_shapes_images(split, .)`, each about [-1, 1]:
    foreground RGB, background RGB, centre x and y, scale, and the class's own shape parameter. Regressing them
    makes the pooled features carry colour, position and size, which a shape classifier alone would discard, so a
    model that gets colours or placement wrong is far from the data in FID."""
    stream, idx = _shapes_indices(split)
    p = shapes.image_params(shapes.SEED, stream, idx)
    lo, hi = shapes.SCALE_RANGE
    cols = [2 * p["fg"] - 1, 2 * p["bg"] - 1, 4 * (p["cx"][:, None] - 0.5), 4 * (p["cy"][:, None] - 0.5),
            (2 * p["scale"][:, None] - lo - hi) / (hi - lo), 2 * p["shape"][:, None] - 1]
    return np.concatenate(cols, axis=1).astype(np.float32)


@dataclass(frozen=True)
class Spec:
    """One in-house extractor: what it reads, how it was trained, and the hash its shipped weights must have."""

    name: str
    data: str  # the data kind it measures (and was trained on)
    in_channels: int  # 1: the images' mean over RGB (grayscale data); 3: colour
    size: int  # input resolution; other resolutions are resized to it
    num_classes: int
    images: Callable[[str, int], tuple[np.ndarray, np.ndarray]]  # (split, size) -> (uint8 N x H x W x 3, labels)
    # ((key, value), ...): epochs, batch, lr, seed (and aux_weight, label_smoothing if set) of the deterministic run
    recipe: tuple
    # split -> auxiliary regression targets (N, aux_dim) of the same images, learnt by a head used only in training
    # (its weights are not shipped); None: the class labels alone.
    aux: Callable[[str], np.ndarray] | None = None
    aux_dim: int = 0

    @property
    def weights_sha256(self) -> str:
        """The pinned sha256 of the shipped state dict (names, shapes, bytes): what `train` printed when the file
        was made, written in harness.core.vocabulary.IN_HOUSE_EXTRACTORS."""
        return IN_HOUSE_EXTRACTORS[self.name][1]

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.pt"


SPECS = {s.name: s for s in (
    Spec(DIGITS_EXTRACTOR, data="digits", in_channels=1, size=16, num_classes=10, images=_digits_images,
         recipe=(("epochs", 10), ("batch", 64), ("lr", 1e-2), ("seed", 0))),
    Spec(SHAPES_EXTRACTOR, data="shapes", in_channels=3, size=16, num_classes=shapes.NUM_CLASSES,
         images=_shapes_images, aux=_shapes_aux, aux_dim=10,
         recipe=(("epochs", 12), ("batch", 128), ("lr", 1e-2), ("seed", 0), ("aux_weight", 1.0),
                 ("label_smoothing", 0.1))),
)}


def spec(name: str) -> Spec:
    """Returns the Spec of an in-house extractor; ValueError naming the known ones."""
    if name not in SPECS:
        raise ValueError(f"{name!r} is no in-house extractor; known: {sorted(SPECS)}")
    return SPECS[name]


class SmallCNN(nn.Module):
    """Small classifier: three conv layers, global average pooling (the feature), a linear head; optionally an
    auxiliary linear head on the same feature, used only in training (aux_dim 0: none, the digits extractor's
    layout, so its state dict is what it always was)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, aux_dim: int = 0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # S -> S/2
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # S/2 -> S/4
            nn.Conv2d(32, FEATURE_DIM, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        # Created after the rest: the other layers draw the same initial weights with or without it.
        self.aux = nn.Linear(FEATURE_DIM, aux_dim) if aux_dim else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features (N, 64), logits (N, classes)) of images (N, C, S, S) in [-1, 1]."""
        feat = self.body(x)
        return feat, self.head(feat)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (sFID's map (N, 32, S/4, S/4), features (N, 64), logits (N, classes)): the same computation as
        forward, which training uses, split after the second conv block."""
        mid = self.body[:_SPATIAL_END](x)
        feat = self.body[_SPATIAL_END:](mid)
        return mid, feat, self.head(feat)


def preprocess(x: torch.Tensor, in_channels: int, size: int) -> torch.Tensor:
    """Returns uint8 images (N, 3, H, W) as float (N, in_channels, size, size) in [-1, 1]: the channel mean for a
    grayscale extractor, then an antialiased bilinear resize when the resolution differs."""
    x = x.to(torch.float32)
    if in_channels == 1:
        x = x.mean(dim=1, keepdim=True)
    x = x / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class InHouseFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a trained SmallCNN; weights from `extractor_info(name)["weights_path"]`."""

    SPATIAL_SOURCE = "SmallCNN conv2 ReLU after its 2x2 max pool (N, S/4, S/4, 32): [..., :7] flattened (H, W, C)"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name} needs feature_extractor_weights_path: call "
                             f"harness.metrics.inhouse.extractor_info({name!r}) and pass its 'weights_path'")
        ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.in_channels, self.size = int(ckpt["in_channels"]), int(ckpt["size"])
        self.net = SmallCNN(self.in_channels, int(ckpt["num_classes"]))
        self.net.load_state_dict(ckpt["model"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return _FEATURE_LAYER, "logits_unbiased", "logits", SPATIAL_FEATURE

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": _FEATURE_LAYER, "kid": _FEATURE_LAYER, "prc": _FEATURE_LAYER,
                "sfid": SPATIAL_FEATURE}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        mid, feat, logits = self.net.features(preprocess(x, self.in_channels, self.size))
        # Like Inception's 'logits_unbiased': the head without its bias, what torch-fidelity's IS reads.
        features = {_FEATURE_LAYER: feat, "logits_unbiased": feat @ self.net.head.weight.T,
                    "logits": logits, SPATIAL_FEATURE: spatial_feature(mid.permute(0, 2, 3, 1))}
        return tuple(features[a] for a in self.features_list)


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seed torch, use deterministic kernels and one thread; restore the caller's RNG and settings on exit."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    num_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        # One thread: CPU reductions then do not depend on the core count, and a tiny net trains faster so.
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(num_threads)
            torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Returns the sha256 hex digest of a state dict's names, shapes, dtypes and tensor bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def train(s: Spec) -> dict:
    """Trains a fresh SmallCNN by the spec's recipe (deterministic on one CPU thread, seconds) and returns the
    checkpoint to ship: {"model", "in_channels", "size", "num_classes", "heldout_accuracy" (fraction), "num_train",
    "num_heldout", "recipe", "weights_sha256"}. The loss is cross-entropy (with the recipe's label_smoothing, if any:
    on separable data it bounds the logits, which otherwise grow into the hundreds and make IS of poor samples
    NaN), plus aux_weight x the mean squared error of the auxiliary targets when the spec has them; the auxiliary
    head is left out of the shipped state. The bytes depend on the CPU's kernels: ship them, never retrain."""
    recipe = dict(s.recipe)
    x_train, y_train = s.images("train", s.size)
    x_test, y_test = s.images("test", s.size)
    aux_train = torch.from_numpy(s.aux("train")) if s.aux is not None else None
    # Train on what the extractor will see: uint8 images through the extractor's own preprocessing.
    u_train = torch.from_numpy(x_train).permute(0, 3, 1, 2)
    u_test = torch.from_numpy(x_test).permute(0, 3, 1, 2)
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)
    with _deterministic(recipe["seed"]):
        net = SmallCNN(s.in_channels, s.num_classes, s.aux_dim)
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
        steps_per_epoch = -(-len(u_train) // recipe["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"],
                                                    total_steps=recipe["epochs"] * steps_per_epoch)
        x_all = preprocess(u_train, s.in_channels, s.size)
        for _ in range(recipe["epochs"]):
            for idx in torch.randperm(len(u_train)).split(recipe["batch"]):
                feat, logits = net(x_all[idx])
                loss = F.cross_entropy(logits, y_train_t[idx], label_smoothing=recipe.get("label_smoothing", 0.0))
                if aux_train is not None:
                    loss = loss + recipe["aux_weight"] * F.mse_loss(net.aux(feat), aux_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            _, logits = net(preprocess(u_test, s.in_channels, s.size))
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("aux.")}
    return {"model": state, "in_channels": s.in_channels, "size": s.size, "num_classes": s.num_classes,
            "heldout_accuracy": float((logits.argmax(1) == y_test_t).float().mean()),
            "num_train": len(u_train), "num_heldout": len(u_test), "recipe": repr(s.recipe),
            "weights_sha256": state_sha256(state)}


def _load_checked(s: Spec) -> dict:
    """Returns the shipped checkpoint of `s` after checking its state against the pinned hash."""
    if not s.weights_path.is_file():
        raise cli.MissingWeights(f"the {s.name} weights are missing: {s.weights_path} ships with the harness "
                                 f"(reinstall it, or rebuild the file with python -m harness.metrics.inhouse train "
                                 f"{s.name} and pin the hash it prints in harness.core.vocabulary.IN_HOUSE_EXTRACTORS)")
    ckpt = torch.load(s.weights_path, map_location="cpu", weights_only=True)
    got = state_sha256(ckpt["model"])
    if got != s.weights_sha256:
        raise ValueError(f"{s.weights_path} holds weights {got[:12]}, not the pinned {s.weights_sha256[:12]} of "
                         f"{s.name}: metrics from it would not compare with anyone's; restore the shipped file")
    return ckpt


_INFO: dict[str, dict] = {}  # name -> info: a process checks each file once


def extractor_info(name: str) -> dict:
    """Loads and checks the shipped weights of an in-house extractor, registers it with torch-fidelity, and returns
    its facts: {"name", "weights_sha256", "weights" ("shipped"), "heldout_accuracy" (fraction), "feature_dim",
    "weights_path", "num_train", "num_heldout"}."""
    if name not in _INFO:
        s = spec(name)
        ckpt = _load_checked(s)
        for known in SPECS:  # all of them: registering loads nothing, and the registry then lists every one
            if known not in FEATURE_EXTRACTORS_REGISTRY:
                register_feature_extractor(known, InHouseFeatureExtractor)
        _INFO[name] = {"name": name, "weights_sha256": s.weights_sha256, "weights": "shipped",
                       "heldout_accuracy": float(ckpt["heldout_accuracy"]), "feature_dim": FEATURE_DIM,
                       "weights_path": str(s.weights_path), "num_train": int(ckpt["num_train"]),
                       "num_heldout": int(ckpt["num_heldout"])}
    return dict(_INFO[name])


def write_weights(s: Spec, out_dir: Path = WEIGHTS_DIR) -> tuple[Path, dict]:
    """Trains `s` and writes its checkpoint to `out_dir/<name>.pt` atomically; returns (path, checkpoint)."""
    ckpt = train(s)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = Path(out_dir) / f"{s.name}.pt"
    atomic_write_bytes(path, buf.getvalue())
    return path, ckpt


@cli.guard
def main(argv: list[str] | None = None) -> int:
    """`python -m harness.metrics.inhouse train NAME [--out DIR]` | `check`."""
    parser = cli.ArgumentParser(prog="python -m harness.metrics.inhouse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an extractor by its recipe and write its weights file")
    t.add_argument("name", choices=sorted(SPECS))
    t.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder of the weights file (default: shipped)")
    sub.add_parser("check", help="check every shipped weights file against its pinned hash")
    args = parser.parse_args(argv)
    if args.command == "train":
        path, ckpt = write_weights(spec(args.name), args.out)
        print(f"{args.name}: held-out accuracy {ckpt['heldout_accuracy']:.4f} on {ckpt['num_heldout']} images; "
              f"weights_sha256 {ckpt['weights_sha256']}; written to {path}")
        return 0
    for name in sorted(SPECS):
        info = extractor_info(name)
        print(f"{name}: {info['weights_path']} sha256 {info['weights_sha256'][:12]} ok "
              f"(held-out accuracy {info['heldout_accuracy']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
