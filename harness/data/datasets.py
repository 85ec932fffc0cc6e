"""Data sets: embedded digits, procedural shapes (harness.data.shapes), ImageNet-style folders, precomputed latent
shards, synthetic tensors.

Every data set hands out whole batches: `get_batch(indices)` returns the stored items (deterministic),
`augment(x, generator)` applies the per-step randomness drawn only from `generator`, so a resumed run
that restores the generator sees exactly the batches it would have seen.
"""

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from harness.core.vocabulary import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, SHAPES_EXTRACTOR
from harness.data import shapes
from harness.data.codec import DEFAULT_VAE, LATENT_SCALE, Codec, IdentityCodec, VAECodec, encoder_id, vae_geometry
from harness.data.shapes import ShapesDataset

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataKind:
    """What the harness knows about one kind of data set (`data.name`); the one place a kind is looked up."""

    name: str
    latent: bool  # the DiT sees SD-VAE-latent-shaped input (sized by the VAE) or the pixels themselves
    vae_codec: bool  # samples decode through the VAE (and pixels encode through it); else the identity
    encode_every_step: bool  # pixels are encoded through the VAE at every training step (the paper's way)
    needs_path: bool  # data.path must name a folder
    splits: tuple[str, ...]  # the splits it holds
    extractor: str  # the FID feature extractor that measures it
    reference: bool  # its own images can serve as the FID reference set (else eval.reference_npz)
    sizes: tuple[int, ...] | None = None  # allowed image sizes (None: any multiple of `size_multiple`)
    size_multiple: int = 1
    precomputed: bool = False  # latents read from shards, whose meta.json knows their shape
    # The split the validation loss is measured on (images never trained on); None: the kind has none of its own,
    # and `data.val_path` may name one (an image folder's val/, a latent folder's val/ written by precompute).
    heldout: str | None = None


DIGITS_SIZE_MULTIPLE = 8  # digits are 8x8; resize to a multiple so every DiT patch size (2, 4, 8) divides it
IMAGE_FOLDER_SIZES = (256, 512)  # the paper's resolutions
DATA_KINDS = {k.name: k for k in (
    DataKind("digits", latent=False, vae_codec=False, encode_every_step=False, needs_path=False, splits=SPLITS,
             extractor=DIGITS_EXTRACTOR, reference=True, size_multiple=DIGITS_SIZE_MULTIPLE, heldout="test"),
    # Procedural colour shapes: an unlimited training stream (no image repeats), a fixed held-out test set.
    DataKind("shapes", latent=False, vae_codec=False, encode_every_step=False, needs_path=False, splits=SPLITS,
             extractor=SHAPES_EXTRACTOR, reference=True, sizes=shapes.SIZES, heldout="test"),
    DataKind("imagefolder", latent=True, vae_codec=True, encode_every_step=True, needs_path=True,
             splits=("train",), extractor=INCEPTION_EXTRACTOR, reference=True, sizes=IMAGE_FOLDER_SIZES),
    DataKind("latents", latent=True, vae_codec=True, encode_every_step=False, needs_path=True,
             splits=("train",), extractor=INCEPTION_EXTRACTOR, reference=False, precomputed=True),
    # Fixed random latent-shaped tensors, for benchmarks: already in the model's space (no VAE needed).
    DataKind("synthetic", latent=True, vae_codec=False, encode_every_step=False, needs_path=False,
             splits=SPLITS, extractor=INCEPTION_EXTRACTOR, reference=False, heldout="test"),
)}
DATASETS = tuple(DATA_KINDS)


def data_kind(name: str) -> DataKind:
    """Returns the DataKind of a data set name; ValueError naming the allowed ones."""
    kind = DATA_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    return kind

# digits: the i-th image (0-based) of each class goes to the test split when i % 6 == 5: a fixed,
# stratified, RNG-free split (1,501 train / 296 test) that interleaves the writers of the original data.
DIGITS_TEST_EVERY = 6
DIGITS_NUM_CLASSES = 10
# Same list as torchvision.datasets.folder.IMG_EXTENSIONS, so we find the files ImageFolder finds.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SYNTHETIC_POOL = 1024  # distinct synthetic tensors kept in memory; indices wrap around the pool
SYNTHETIC_SEEDS = {"train": 0, "test": 1}

# Latent shard format, written by harness.data.precompute, read by LatentShardDataset.
META_FILE = "meta.json"
HELDOUT_LATENT_DIR = "val"  # a latent folder's held-out shard set (from the validation images), a shard folder too
SHARD_FORMAT = 1
# moments[n, flip, k] is the posterior mean (k=0) or std (k=1) of image n (flip=0) or of its mirror (flip=1).
MOMENTS_LAYOUT = "N,flip,{mean,std},C,h,w"


def shard_names(k: int) -> tuple[str, str, str]:
    """Returns the file names (moments .npy, labels .npy, done marker .json) of shard k."""
    stem = f"shard_{k:05d}"
    return f"{stem}_moments.npy", f"{stem}_labels.npy", f"{stem}.json"


# ---------------------------------------------------------------------------------------------------------
# Pixels


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Returns the ADM centre crop (image_size x image_size) of a PIL image.

    From guided-diffusion (ADM), as used by DiT: while the short side is at least twice the target,
    halve the image with a BOX filter (cheap, alias-free anti-aliasing); then a bicubic resize brings the
    short side to exactly the target; then crop the centre square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def pil_to_tensor(pil_image: Image.Image) -> Tensor:
    """Returns a (3, H, W) float32 tensor in [-1, 1] (the ToTensor + Normalize(0.5, 0.5) of DiT)."""
    arr = np.asarray(pil_image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8_rgb(images: Tensor | np.ndarray) -> np.ndarray:
    """Returns float images (N, C, H, W) in [-1, 1] as uint8 (N, H, W, 3); grayscale is replicated to RGB."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
    # The rounding of facebookresearch/DiT sample_ddp.py, so references and samples quantise alike.
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Returns x (N, ..., W) with each sample mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))).to(x.device), x.flip(-1), x)


def _image_files(folder: str) -> list[str]:
    files = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return files


def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Returns (classes, [(file path, label)]) in torchvision ImageFolder order; ValueError if unusable."""
    if not root or not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
    samples = [(f, label) for label, c in enumerate(classes) for f in _image_files(os.path.join(root, c))]
    if not samples:
        raise ValueError(f"image folder {root!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


# ---------------------------------------------------------------------------------------------------------
# Data sets


class _Dataset:
    """The shared surface: len, get_batch, augment, describe; __getitem__ for torch DataLoaders."""

    num_classes: int

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns x: no per-step randomness."""
        return x

    def fixed(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns what the model sees of stored items x without augmentation (no flip), any sampling drawn from
        `generator`: the fixed view the validation loss is measured on."""
        return x


class ArrayDataset(_Dataset):
    """Images and labels held in memory."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, name: str = "array", **facts):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.name, self.facts = name, facts

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (images, labels) at `indices`."""
        return self.images[indices], self.labels[indices]

    def describe(self) -> dict:
        """Returns JSON-able facts: name, count, shape, num_classes, sha256 of the stored tensors."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return dict(
            name=self.name, count=len(self), shape=list(self.images.shape[1:]),
            num_classes=self.num_classes, checksum=h.hexdigest(), **self.facts,
        )


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # here, not at the top: scikit-learn adds ~1 s to every start-up

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split(split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """Returns (images (N, 1, S, S) float32 in [-1, 1], labels (N,) int64) of a fixed digits split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    images, labels = _digits_raw()
    # Rank of each image within its class, in file order.
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in range(DIGITS_NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    is_test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    keep = is_test if split == "test" else ~is_test
    x = torch.from_numpy(images[keep] / 16.0).unsqueeze(1)  # pixel values are 0..16
    # Bilinear with antialias: a convex combination of pixels, so values stay in [0, 1].
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x * 2 - 1).clamp(-1, 1).float().contiguous()
    return x, torch.from_numpy(labels[keep])


class DigitsDataset(ArrayDataset):
    """scikit-learn's 8x8 digits resized to image_size, pixel space, no flips (a mirrored 3 is no digit)."""

    def __init__(self, split: str = "train", image_size: int = 16):
        x, y = digits_split(split, image_size)
        super().__init__(x, y, DIGITS_NUM_CLASSES, name="digits", split=split, resolution=image_size)


class SyntheticDataset(ArrayDataset):
    """Fixed random latent-shaped tensors (N(0, 1)) and labels, for benchmarks; a pool reused cyclically."""

    def __init__(self, count: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        if count < 1:
            raise ValueError(f"synthetic_count must be positive, got {count}")
        g = torch.Generator().manual_seed(seed)
        pool = torch.randn(min(count, SYNTHETIC_POOL), *shape, generator=g)
        labels = torch.randint(num_classes, (count,), generator=g)
        # Not ArrayDataset.__init__: the pool is shorter than the label list by design.
        self.images, self.labels, self.num_classes = pool, labels, num_classes
        self.name, self.facts = "synthetic", dict(seed=seed)

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (tensors, labels) at `indices`; tensors repeat every SYNTHETIC_POOL items."""
        return self.images[indices % len(self.images)], self.labels[indices]

    def describe(self) -> dict:
        """Returns JSON-able facts: name, count (the nominal one), shape, num_classes, seed, checksum."""
        return {**super().describe(), "count": len(self)}


class ImageFolderDataset(_Dataset):
    """ImageNet-style class folders, ADM centre crop to image_size, random horizontal flips."""

    def __init__(self, root: str, image_size: int):
        self.root, self.image_size = root, image_size
        self.classes, self.samples = scan_image_folder(root)
        self.num_classes = len(self.classes)
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Tensor:
        """Returns image i as (3, S, S) float32 in [-1, 1] after the ADM centre crop."""
        with Image.open(self.samples[i][0]) as im:
            return pil_to_tensor(center_crop_arr(im.convert("RGB"), self.image_size))

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (images (N, 3, S, S) in [-1, 1], labels) at `indices`, unflipped."""
        return torch.stack([self.load(int(i)) for i in indices]), self.labels[indices]

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns x with a random horizontal flip per sample (the paper's only augmentation)."""
        return random_hflip(x, generator)

    def file_list_sha256(self) -> str:
        """Returns the sha256 of the (relative path, label) list: identifies the image set, not the bytes."""
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        """Returns JSON-able facts: name, path, count, resolution, num_classes, file-list checksum."""
        return dict(
            name="imagefolder", path=os.path.abspath(self.root), count=len(self),
            resolution=self.image_size, num_classes=self.num_classes, checksum=self.file_list_sha256(),
        )


def read_meta(path: str) -> dict:
    """Returns the meta.json of a latent shard folder; ValueError if there is none."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(
            f"latent folder {path!r} has no {META_FILE}: the precompute has not finished there (or it is the "
            f"wrong folder). Run: python -m harness.data.precompute --src IMAGE_FOLDER --out {path} ..."
        )
    with open(meta_path) as f:
        return json.load(f)


def latent_meta_problems(meta: dict, vae: str | None, resolution: int | None) -> list[str]:
    """Returns the reasons shards described by `meta` cannot serve a config asking for (vae, resolution)."""
    problems = []
    if meta.get("format") != SHARD_FORMAT:
        problems.append(f"shards have format {meta.get('format')!r}; this harness reads {SHARD_FORMAT}")
    if vae is not None and meta.get("encoder") != encoder_id(vae):
        problems.append(
            f"latent shards were encoded with VAE {meta.get('vae')!r} but the config asks for {vae!r}; "
            f"precompute them again with --vae {vae}, or set data.vae={meta.get('vae')}"
        )
    if resolution is not None and meta.get("resolution") != resolution:
        problems.append(
            f"latent shards are at resolution {meta.get('resolution')} but the config asks for {resolution}; "
            f"precompute them again with --resolution {resolution}, "
            f"or set data.image_size={meta.get('resolution')}"
        )
    return problems


class LatentShardDataset(_Dataset):
    """Precomputed SD-VAE posterior moments (of each image and its mirror), memory-mapped from .npy shards.

    The paper encoded every step, so each step saw a fresh posterior sample of a randomly flipped image.
    Keeping mean and std of both orientations lets `augment` do exactly that without the VAE.
    """

    def __init__(self, path: str, vae: str | None = None, resolution: int | None = None):
        self.path = path
        self.meta = read_meta(path)
        problems = latent_meta_problems(self.meta, vae, resolution)
        if problems:
            raise ValueError(f"latent folder {path!r}: " + "; ".join(problems))
        self.num_classes = int(self.meta["num_classes"])
        self.latent_shape = tuple(self.meta["latent_shape"])
        self._moments, labels = [], []
        for s in self.meta["shards"]:
            m = np.load(os.path.join(path, s["file"]), mmap_mode="r")
            if m.shape != (s["count"], 2, 2, *self.latent_shape):
                raise ValueError(f"shard {s['file']!r} in {path!r} has shape {m.shape}, meta.json disagrees")
            self._moments.append(m)
            labels.append(np.load(os.path.join(path, s["labels_file"])))
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        self._starts = np.cumsum([0] + [s["count"] for s in self.meta["shards"]])
        if self._starts[-1] != self.meta["count"]:
            raise ValueError(f"latent folder {path!r}: shards hold {self._starts[-1]} items, meta says "
                             f"{self.meta['count']}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (moments (N, 2, 2, C, h, w) float32 unscaled, labels) at `indices`; see MOMENTS_LAYOUT."""
        idx = indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices)
        # Gather in the stored dtype; torch converts float16 to float32 much faster than numpy does.
        out = np.empty((len(idx), 2, 2, *self.latent_shape), dtype=self._moments[0].dtype)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard):
            pos = np.flatnonzero(shard == k)
            local = idx[pos] - self._starts[k]
            order = np.argsort(local, kind="stable")  # read each shard front to back: page-cache friendly
            out[pos[order]] = self._moments[k][local[order]]
        return torch.from_numpy(out).float(), self.labels[indices]

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns scaled latents (N, C, h, w): random flip per sample, then (mean + std * noise) * scale."""
        n = x.shape[0]
        flip = (torch.rand(n, generator=generator) < 0.5).long()
        # Row 2i + flip_i of the (2N, 2, C, h, w) view: index_select is the cheapest gather on CPU.
        m = x.flatten(0, 1).index_select(0, (torch.arange(n) * 2 + flip).to(x.device))  # (N, 2, C, h, w)
        noise = torch.randn(m[:, 0].shape, generator=generator).to(x.device)
        return torch.addcmul(m[:, 0], m[:, 1], noise).mul_(LATENT_SCALE)

    def fixed(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Returns scaled latents (N, C, h, w) of the unflipped images: (mean + std * noise) * scale, noise from
        `generator` (a posterior sample, as training sees, but the same one every time)."""
        m = x[:, 0]  # (N, 2, C, h, w): flip 0
        noise = torch.randn(m[:, 0].shape, generator=generator).to(x.device)
        return torch.addcmul(m[:, 0], m[:, 1], noise).mul_(LATENT_SCALE)

    def describe(self) -> dict:
        """Returns JSON-able facts: name, path, count, resolution, vae, latent shape, shard checksum."""
        h = hashlib.sha256("".join(s["sha256"] + s["labels_sha256"] for s in self.meta["shards"]).encode())
        return dict(
            name="latents", path=os.path.abspath(self.path), count=len(self),
            resolution=self.meta["resolution"], vae=self.meta["vae"], latent_shape=list(self.latent_shape),
            num_classes=self.num_classes, checksum=h.hexdigest(), source=self.meta.get("source"),
        )


# ---------------------------------------------------------------------------------------------------------
# Config entry points


def _vae(data_cfg) -> str:
    return getattr(data_cfg, "vae", None) or DEFAULT_VAE


def _missing(path) -> bool:
    return path is None or str(path) in ("", "???")


def _first_image(folder: str) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):
        if any(n.lower().endswith(IMG_EXTENSIONS) for n in names):
            return True
    return False


def _digits_problems(data_cfg) -> list[str]:
    problems = []
    if data_cfg.num_classes != DIGITS_NUM_CLASSES:
        problems.append(f"digits has {DIGITS_NUM_CLASSES} classes, config says {data_cfg.num_classes}")
    if data_cfg.channels != 1:
        problems.append(f"digits has 1 channel, config says {data_cfg.channels}")
    return problems


def _shapes_problems(data_cfg) -> list[str]:
    problems = []
    if data_cfg.num_classes != shapes.NUM_CLASSES:
        problems.append(f"shapes has {shapes.NUM_CLASSES} classes, config says data.num_classes="
                        f"{data_cfg.num_classes}; allowed: {shapes.NUM_CLASSES}")
    if data_cfg.channels != shapes.CHANNELS:
        problems.append(f"shapes has {shapes.CHANNELS} channels (colour), config says data.channels="
                        f"{data_cfg.channels}; allowed: {shapes.CHANNELS}")
    return problems


def _synthetic_problems(data_cfg) -> list[str]:
    if getattr(data_cfg, "synthetic_count", 1) < 1:
        return [f"data.synthetic_count must be positive, got {data_cfg.synthetic_count}"]
    return []


def _imagefolder_problems(data_cfg) -> list[str]:
    path = data_cfg.path
    classes = _class_dirs(path)
    if not classes:
        return [f"image folder {path!r} has no class sub-folders (expected root/<class>/<image>)"]
    if not any(_first_image(os.path.join(path, c)) for c in classes):
        return [f"image folder {path!r} holds no images ({', '.join(IMG_EXTENSIONS)})"]
    if len(classes) != data_cfg.num_classes:
        return [f"image folder {path!r} has {len(classes)} classes, config says {data_cfg.num_classes}"]
    return []


def _latents_problems(data_cfg) -> list[str]:
    path = data_cfg.path
    try:
        meta = read_meta(path)
    except ValueError as e:
        return [str(e)]
    problems = latent_meta_problems(meta, _vae(data_cfg), data_cfg.image_size)
    if meta.get("num_classes") != data_cfg.num_classes:
        problems.append(f"latent folder {path!r} has {meta.get('num_classes')} classes, "
                        f"config says {data_cfg.num_classes}")
    missing = [f for s in meta.get("shards", []) for f in (s["file"], s["labels_file"])
               if not os.path.isfile(os.path.join(path, f))]
    if missing:
        problems.append(f"latent folder {path!r} lacks shard files: {', '.join(missing[:5])}")
    return problems


# The checks only one kind needs, after the shared ones (size, classes, path).
_KIND_PROBLEMS = {
    "digits": _digits_problems,
    "shapes": _shapes_problems,
    "synthetic": _synthetic_problems,
    "imagefolder": _imagefolder_problems,
    "latents": _latents_problems,
}


def validate_data(data_cfg) -> list[str]:
    """Returns every problem with a data config as a string; empty when it can be built."""
    try:
        kind = data_kind(data_cfg.name)
    except ValueError as e:
        return [str(e)]
    name, size = kind.name, data_cfg.image_size
    if not isinstance(size, int) or size < 1:
        return [f"data.image_size must be a positive integer, got {size!r}"]
    problems = []
    if data_cfg.num_classes < 1:
        problems.append(f"data.num_classes must be positive, got {data_cfg.num_classes}")
    if kind.sizes is not None and size not in kind.sizes:
        problems.append(f"{name} image_size {size} not allowed; allowed: {kind.sizes}")
    if size % kind.size_multiple:
        problems.append(f"{name} image_size {size} not allowed: use a multiple of {kind.size_multiple}")
    if kind.latent:
        try:
            _, downsample = vae_geometry(_vae(data_cfg))
        except (OSError, ValueError) as e:
            return problems + [str(e)]
        if kind.sizes is None and size % downsample:
            problems.append(f"{name} image_size {size} is not a multiple of VAE downsample {downsample}")
    val_path = getattr(data_cfg, "val_path", None)
    if not _missing(val_path):
        if kind.heldout is not None:
            problems.append(f"data.val_path={val_path!r}: {name} has its own held-out split ({kind.heldout!r}); "
                            "val_path names the held-out folder of an image folder or of latent shards")
        elif not os.path.isdir(str(val_path)):
            problems.append(f"data.val_path={val_path!r} does not exist (the held-out images of {name})")
    if kind.needs_path:
        path = data_cfg.path
        if _missing(path):
            return problems + [f"data.path is required for {name!r} (got {path!r})"]
        if not os.path.isdir(path):
            return problems + [f"{name} folder {path!r} does not exist"]
    return problems + _KIND_PROBLEMS[name](data_cfg)


def build_dataset(data_cfg, split: str = "train"):
    """Returns the data set a config names, after validating the config (ValueError listing every problem)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    problems = validate_data(data_cfg)
    if problems:
        raise ValueError("bad data config: " + "; ".join(problems))
    kind = data_kind(data_cfg.name)
    if split not in kind.splits:
        raise ValueError(
            f"{kind.name!r} has only a 'train' split: its FID reference is the reference statistics of the "
            f"training images (ADM), not a held-out split"
        )
    if kind.name == "digits":
        return DigitsDataset(split, data_cfg.image_size)
    if kind.name == "shapes":
        return ShapesDataset(split, data_cfg.image_size)
    if kind.name == "synthetic":
        channels, size = model_input_shape(data_cfg)
        return SyntheticDataset(data_cfg.synthetic_count, (channels, size, size), data_cfg.num_classes,
                                seed=SYNTHETIC_SEEDS[split])
    if kind.name == "imagefolder":
        return ImageFolderDataset(data_cfg.path, data_cfg.image_size)
    return LatentShardDataset(data_cfg.path, vae=_vae(data_cfg), resolution=data_cfg.image_size)


def heldout_path(data_cfg) -> str | None:
    """Returns the folder of a path-based kind's held-out images: data.val_path, else the conventional one beside
    the training data (an image folder `.../train` -> `.../val`, ImageNet's layout; a latent folder -> its `val/`,
    where harness.data.precompute --val-src writes) when it exists; None when there is none."""
    if not _missing(getattr(data_cfg, "val_path", None)):
        return str(data_cfg.val_path)
    kind = data_kind(data_cfg.name)
    if not kind.needs_path or _missing(data_cfg.path):
        return None
    path = os.path.normpath(str(data_cfg.path))
    candidate = (os.path.join(path, HELDOUT_LATENT_DIR) if kind.precomputed
                 else os.path.join(os.path.dirname(path), "val") if os.path.basename(path) == "train" else None)
    return candidate if candidate is not None and os.path.isdir(candidate) else None


def heldout_dataset(data_cfg):
    """Returns (data set, split name) of the images the validation loss is measured on, never trained on: the kind's
    own held-out split, or the folder `heldout_path` finds; None when the data set has none (its loss is then a
    fixed training-batch loss, labelled so: docs/scaling.md)."""
    kind = data_kind(data_cfg.name)
    if kind.heldout is not None:
        return build_dataset(data_cfg, kind.heldout), kind.heldout
    path = heldout_path(data_cfg)
    if path is None:
        return None
    if kind.name == "imagefolder":
        return ImageFolderDataset(path, data_cfg.image_size), "val"
    return LatentShardDataset(path, vae=_vae(data_cfg), resolution=data_cfg.image_size), "val"


def unique_images(dataset) -> int | None:
    """Returns how many distinct training images a data set holds (None: an unlimited stream that never repeats):
    what an epoch is counted against."""
    return getattr(dataset, "unique_images", len(dataset))


def model_input_shape(data_cfg) -> tuple[int, int]:
    """Returns (in_channels, input_size) of what the DiT sees: pixels for digits and shapes, VAE latents otherwise."""
    kind = data_kind(data_cfg.name)
    if not kind.latent:
        return data_cfg.channels, data_cfg.image_size
    path = data_cfg.path
    if kind.precomputed and not _missing(path) and os.path.isfile(os.path.join(path, META_FILE)):
        c, h, _ = read_meta(data_cfg.path)["latent_shape"]  # precomputed shards know their latent shape
        return c, h
    channels, downsample = vae_geometry(_vae(data_cfg))
    return channels, data_cfg.image_size // downsample


def build_codec(data_cfg, device="cpu") -> Codec:
    """Returns the codec between pixels and what the DiT sees: the SD VAE for kinds trained on its latents,
    the identity otherwise (digits and shapes pixels; synthetic tensors, already latent-shaped)."""
    if data_kind(data_cfg.name).vae_codec:
        return VAECodec(data_cfg.vae, device=device)
    return IdentityCodec(model_input_shape(data_cfg)[0])
