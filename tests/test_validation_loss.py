"""The validation loss: held-out images, K stratified times, fixed noise, a mean with its standard error, raw and
EMA weights; a data set without a held-out split is measured on a training batch and never called validation."""

import numpy as np
import pytest
import torch
from helpers import TINY_CELL
from PIL import Image

from harness import heldout
from harness.cell import build_model, build_objective
from harness.core.config import compose
from harness.data import datasets
from harness.diffusion import create_diffusion, create_flow


def test_stratified_times_are_the_midpoints_of_equal_strata():
    assert create_diffusion("").stratified_t(4).tolist() == [125, 375, 625, 875]
    assert create_diffusion("").stratified_t(8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert create_flow().stratified_t(4).tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    ln = create_flow(time_sampling="logit_normal").stratified_t(5)
    # the logit-normal's quantiles: symmetric about 1/2 (loc 0), the middle one exactly 1/2, increasing
    assert ln[2].item() == pytest.approx(0.5) and ln[0].item() == pytest.approx(1 - ln[4].item())
    assert bool((ln[1:] > ln[:-1]).all())
    with pytest.raises(ValueError, match="positive"):
        create_diffusion("").stratified_t(0)


@pytest.fixture(scope="module")
def tiny():
    cfg = compose([*TINY_CELL, "train.val_images=24", "train.val_times=4"])
    torch.manual_seed(0)
    return cfg, build_model(cfg), build_objective(cfg)


def test_the_validation_set_is_held_out_fixed_and_the_same_for_every_cell(tiny):
    cfg, _, objective = tiny
    vs = heldout.validation_set(cfg, objective)
    test_x, test_y = datasets.digits_split("test", 8)
    # every image is a test image (the digits' held-out split), none a training image
    matches = [(test_x == x).flatten(1).all(1).nonzero().flatten().tolist() for x in vs.x]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 24
    assert [int(test_y[m[0]]) for m in matches] == vs.y.tolist()
    assert vs.describe() == {"split": "test", "heldout": True, "num_images": 24, "times": 4, "target": "mse",
                             "estimator": "stratified-times", "seed": heldout.VAL_SEED}
    again = heldout.validation_set(compose([*TINY_CELL, "train.val_images=24", "train.val_times=4", "model=demo-B",
                                            "train.lr=3e-4"]), objective)
    assert torch.equal(again.x, vs.x) and torch.equal(again.noise, vs.noise) and torch.equal(again.t, vs.t)
    assert vs.noise.shape == (24, 4, 1, 8, 8)


def test_the_record_is_the_mean_over_images_of_each_images_mean_over_times(tiny):
    cfg, model, objective = tiny
    vs = heldout.validation_set(cfg, objective)
    rec = heldout.validation_record(model, model, objective, vs, torch.autocast("cpu", enabled=False), chunk=7)
    per_image = torch.zeros(24, dtype=torch.float64)
    vb = torch.zeros(24, dtype=torch.float64)
    with torch.no_grad():
        model.eval()
        for j, t in enumerate(vs.t):  # by hand: one forward per (image, time)
            for i in range(24):
                terms = objective.training_losses(model, vs.x[i:i + 1], t.view(1), {"y": vs.y[i:i + 1]},
                                                  noise=vs.noise[i:i + 1, j])
                per_image[i] += terms["mse"].double().item() / 4
                vb[i] += terms["vb"].double().item() / 4
    assert rec["val_loss"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert rec["val_loss_se"] == pytest.approx(per_image.std().item() / np.sqrt(24), rel=1e-4)
    assert rec["val_vb"] == pytest.approx(vb.mean().item(), rel=1e-4)
    assert rec["val_loss_ema"] == rec["val_loss"] and rec["validation"]["heldout"] is True
    assert not any(k.startswith("train_batch") for k in rec)


def _image_folder(root, n_per_class=3, size=20):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_a_data_set_without_a_held_out_split_is_labelled_a_training_batch(tmp_path):
    train_dir = tmp_path / "imagenet" / "train"
    _image_folder(train_dir)
    cfg = compose(["data=imagenet256", f"data.path={train_dir}", "data.num_classes=2"])
    assert datasets.heldout_path(cfg.data) is None and datasets.heldout_dataset(cfg.data) is None
    _image_folder(tmp_path / "imagenet" / "val")  # ImageNet's layout: train/ and val/ side by side
    assert datasets.heldout_path(cfg.data) == str(tmp_path / "imagenet" / "val")
    found, split = datasets.heldout_dataset(cfg.data)
    assert split == "val" and len(found) == 6 and found.root == str(tmp_path / "imagenet" / "val")
    own = compose(["data=imagenet256", f"data.path={train_dir}", "data.num_classes=2",
                   f"data.val_path={tmp_path / 'imagenet' / 'val'}"])
    assert datasets.heldout_path(own.data) == str(tmp_path / "imagenet" / "val")
    bad = compose(["data=imagenet256", f"data.path={train_dir}", "data.num_classes=2",
                   f"data.val_path={tmp_path / 'nowhere'}"])
    assert any("data.val_path" in p and "nowhere" in p for p in datasets.validate_data(bad.data))
    digits = compose([*TINY_CELL, f"data.val_path={tmp_path}"])
    assert any("own held-out split" in p for p in datasets.validate_data(digits.data))


def test_without_a_held_out_split_the_loss_is_never_called_validation(tiny, monkeypatch):
    cfg, model, objective = tiny
    monkeypatch.setattr(datasets, "heldout_dataset", lambda data_cfg: None)
    vs = heldout.validation_set(cfg, objective)
    assert vs.describe()["split"] == "train" and not vs.heldout
    rec = heldout.validation_record(model, model, objective, vs, torch.autocast("cpu", enabled=False))
    assert {"train_batch_loss", "train_batch_loss_se", "train_batch_loss_ema"} <= set(rec)
    assert not any(k.startswith("val_") for k in rec)


def test_the_synthetic_kind_holds_out_its_own_seed_stream():
    cfg = compose(["data=synthetic", "data.synthetic_count=64"])
    train, (test, split) = datasets.build_dataset(cfg.data, "train"), datasets.heldout_dataset(cfg.data)
    assert split == "test" and not torch.equal(train.images[:8], test.images[:8])
