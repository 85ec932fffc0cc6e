"""FD-DINOv2 end to end and offline: torch-fidelity's own DINOv2 extractor, loaded by torch hub from a local copy.

No network: a temporary $TORCH_HOME holds what torch hub would have downloaded, a repository folder
`facebookresearch_dinov2_main` whose hubconf.py builds the DINOv2 ViT-S/14 architecture (timm's
`vit_small_patch14_dinov2` is the same network) and loads its weights, random ones saved by the test, from the
checkpoint folder and URL the real hubconf uses. The metric's plumbing does not depend on the network's size, so
ViT-S/14 stands in for the default ViT-L/14 (14 times the compute on a CPU).
"""

import builtins
import shutil
import types
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch_fidelity.utils import create_feature_extractor

from harness.core import vocabulary
from harness.core.vocabulary import DIGITS_EXTRACTOR
from harness.metrics import fidelity as M
from harness.metrics import inception, references

timm = pytest.importorskip("timm")  # builds the DINOv2 architecture locally (a test-only dependency)

MODEL = "dinov2-vit-s-14"

HUBCONF = '''"""Stand-in for facebookresearch/dinov2's hubconf: its entry point, architecture and weights location."""
import timm
import torch

dependencies = ["torch", "timm"]


def dinov2_vits14(pretrained=True, **kwargs):
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    if pretrained:
        model.load_state_dict(torch.hub.load_state_dict_from_url({url!r}, map_location="cpu"))
    return model
'''


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A $TORCH_HOME (restored afterwards) holding the stand-in DINOv2 repository and random weights, with the
    network replaced by a recorder that refuses every connection and any prompt failing the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XFORMERS_DISABLED", "1")  # torch-fidelity sets it for good; restored with the rest
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    paths = inception.dinov2_paths(MODEL)
    paths["repo_dir"].mkdir(parents=True)
    (paths["repo_dir"] / "hubconf.py").write_text(HUBCONF.format(url=paths["weights_url"]))
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    with torch.no_grad():  # LayerScale at 1, not its 1e-5 init, or the embedding hardly depends on the image
        for name, p in net.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    paths["weights_path"].parent.mkdir(parents=True)
    torch.save(net.state_dict(), paths["weights_path"])
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(str(getattr(url, "full_url", url)))
        raise URLError("offline (test)")

    def no_prompt(*args):
        pytest.fail(f"torch hub asked: {args}")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(builtins, "input", no_prompt)
    return types.SimpleNamespace(paths=paths, calls=calls, state=net.state_dict())



def test_default_model_paths_are_the_real_hubconf_ones():
    p = inception.dinov2_paths()
    assert vocabulary.DINOV2_EXTRACTOR == "dinov2-vit-l-14"
    assert p["weights_url"] == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert p["weights_path"] == Path(torch.hub.get_dir()) / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    assert p["repo_dir"].name == "facebookresearch_dinov2_main"
    assert vocabulary.metric_label("fd_dinov2", extractor=vocabulary.DINOV2_EXTRACTOR) == "FD-DINOv2"


@pytest.mark.slow
def test_fd_dinov2_end_to_end_from_the_local_hub(local_hub, digits_sets):
    test, train = digits_sets
    samples, reference = train[:12], test[:12]
    spaces = M.preflight(("fid", "fd_dinov2"), DIGITS_EXTRACTOR, cuda=False, dinov2_model=MODEL)
    assert spaces["fd_dinov2"] == {"extractor": MODEL, "layer": "dinov2", "feature_dim": 384}
    # torch hub asked GitHub for the default branch, was refused, and used the cached repository; nothing was
    # downloaded, so the weights it loaded are the ones in the checkpoint folder.
    assert any("github.com/facebookresearch/dinov2" in c for c in local_hub.calls)
    assert not any("dl.fbaipublicfiles.com" in c for c in local_hub.calls)
    fe = create_feature_extractor(MODEL, ["dinov2"], cuda=False, verbose=False)
    assert all(torch.equal(v, local_hub.state[k]) for k, v in fe.model.state_dict().items())

    kw = dict(extractor=DIGITS_EXTRACTOR, data_name="digits", metrics=("fid", "fd_dinov2"), dinov2_model=MODEL)
    with pytest.warns(UserWarning, match="FD-DINOv2 from fewer images than feature dimensions"):
        rec = M.compute_metrics(samples, reference, **kw)
    assert set(rec["metrics"]) == {"fid", "fd_dinov2"} and rec["metrics"]["fd_dinov2"] > 0
    space = rec["feature_spaces"]["fd_dinov2"]
    assert space == {"extractor": MODEL, "layer": "dinov2", "feature_dim": 384,
                     "reference_stats_id": space["reference_stats_id"],
                     "weights_url": local_hub.paths["weights_url"]}
    assert space["reference_stats_id"].startswith("digits_test_16_dinov2-vit-s-14_")
    # One content hash for every feature space of one reference set.
    assert space["reference_stats_id"][-12:] == rec["feature_spaces"]["fid"]["reference_stats_id"][-12:]
    assert rec["feature_spaces"]["fid"]["extractor"] == DIGITS_EXTRACTOR
    assert rec["metric_labels"] == {"fid": "FID (digits extractor)", "fd_dinov2": "FD-DINOv2 (dinov2-vit-s-14)"}
    stats = references.cache_dir() / "fidelity" / MODEL / f"{space['reference_stats_id']}-dinov2-stats.npz"
    assert stats.is_file()

    # The reference against its own cached statistics: zero, up to the rounding of 373 null eigenvalues.
    self_rec = M.compute_metrics(reference, reference, **kw)
    assert abs(self_rec["metrics"]["fd_dinov2"]) < 1e-4 * rec["metrics"]["fd_dinov2"]


def test_missing_dinov2_weights_fail_before_any_work(local_hub, digits_sets, monkeypatch):
    local_hub.paths["weights_path"].unlink()
    with pytest.raises(inception.MissingWeightsError) as err:
        M.preflight(("fid", "fd_dinov2"), DIGITS_EXTRACTOR, cuda=False, dinov2_model=MODEL)
    message = str(err.value)
    assert str(local_hub.paths["weights_path"]) in message and local_hub.paths["weights_url"] in message
    assert "weights (MISSING)" in message and "code (present)" in message
    assert local_hub.paths["weights_url"] in local_hub.calls  # torch hub tried to fetch them, offline

    def no_work(*args, **kwargs):
        pytest.fail("features were extracted before the missing weights were found")

    monkeypatch.setattr(M.torch_fidelity, "calculate_metrics", no_work)
    monkeypatch.setattr(M, "_extract_features", no_work)
    test, train = digits_sets
    reference = test[12:24]  # a set no other test caches
    with pytest.raises(inception.MissingWeightsError, match="dinov2_vits14_pretrain.pth"):
        M.compute_metrics(train[:12], reference, extractor=DIGITS_EXTRACTOR, data_name="digits",
                          metrics=("fid", "fd_dinov2"), dinov2_model=MODEL)
    content_hash = references.reference_stats_id(reference, "digits", "test", MODEL)[-12:]
    assert not list(references.cache_dir().rglob(f"*{content_hash}*"))  # no statistics of it were written


def test_missing_dinov2_repository_fails_with_where_to_clone_it(local_hub):
    shutil.rmtree(local_hub.paths["repo_dir"])
    with pytest.raises(inception.MissingWeightsError) as err:
        M.preflight(("fd_dinov2",), DIGITS_EXTRACTOR, cuda=False, dinov2_model=MODEL)
    message = str(err.value)
    assert f"git clone {inception.DINOV2_REPO_URL} {local_hub.paths['repo_dir']}" in message
    assert "code (MISSING)" in message and "weights (present)" in message
    # What torch hub raises offline without a cached copy: the cause is kept.
    assert isinstance(err.value.__cause__, RuntimeError) and "no internet" in str(err.value.__cause__)
