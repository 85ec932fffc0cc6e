"""Which checkpoints are trusted: the sidecar's sha256 when it is there and readable; when it is torn, the CRC-32s
torch.save's zip records carry (the chaos soak found the cell whose evaluation step's sidecar was torn could never
be evaluated, and so never finish: docs/soak.md)."""

import struct
import zipfile

import pytest
import torch

from harness.cell import check_checkpoint
from harness.core import checkpoint


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, generator=g)}, "ema": {"w": torch.randn(64, generator=g)}, "step": step}


@pytest.fixture
def run_dir(tmp_path):
    for step in (5, 10):
        checkpoint.save(tmp_path / "checkpoints", step, _state(step))
    return tmp_path


def _tear_sidecar(ckpt):
    sidecar = ckpt.with_suffix(".json")
    sidecar.write_bytes(sidecar.read_bytes()[:9])


def _flip_a_tensor_byte(ckpt):
    """Flips one bit in the bytes of the checkpoint's first tensor record (its zip local header located)."""
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 3] ^= 1
    ckpt.write_bytes(bytes(raw))


def test_a_torn_sidecar_beside_a_whole_checkpoint_is_trusted(run_dir):
    ckpt = checkpoint.ckpt_path(run_dir / "checkpoints", 5)  # an evaluation step's, kept while training went on
    _tear_sidecar(ckpt)
    assert checkpoint.verify(ckpt) is None
    assert check_checkpoint(run_dir, 5) == ckpt  # what an evaluation asks first: it no longer refuses the step
    assert torch.equal(checkpoint.load(ckpt)["model"]["w"], _state(5)["model"]["w"])


def test_a_torn_sidecar_beside_a_damaged_checkpoint_is_not(run_dir):
    ckpt = checkpoint.ckpt_path(run_dir / "checkpoints", 10)
    _tear_sidecar(ckpt)
    _flip_a_tensor_byte(ckpt)
    assert "fails its CRC-32" in checkpoint.verify(ckpt)
    assert checkpoint.load_latest(run_dir / "checkpoints")["step"] == 5
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert "not a whole zip archive" in checkpoint.verify(ckpt)
    with pytest.raises(ValueError, match="cannot be trusted"):
        check_checkpoint(run_dir, 10)


def test_a_missing_or_mismatched_sidecar_is_still_never_trusted(run_dir):
    ckpt = checkpoint.ckpt_path(run_dir / "checkpoints", 10)
    sidecar = ckpt.with_suffix(".json")
    sidecar.write_text(checkpoint.ckpt_path(run_dir / "checkpoints", 5).with_suffix(".json").read_text())
    assert "checksum mismatch" in checkpoint.verify(ckpt)  # the checkpoint is whole, but of another write
    sidecar.unlink()
    assert "no checksum sidecar" in checkpoint.verify(ckpt)  # a kill between the checkpoint and its sidecar
    assert checkpoint.load_latest(run_dir / "checkpoints")["step"] == 5
