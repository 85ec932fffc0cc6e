"""Checks that need a CUDA GPU; skipped elsewhere. Run on a lent GPU by scripts/gpu_check.sh."""

import pytest
import torch

from harness import bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
XL2 = bench.Cell("XL", patch=2)


def test_bf16_autocast_matches_fp32_on_xl2():
    """bf16 autocast (fp32 master weights) against true fp32 (TF32 off): loss and output on a fixed batch."""
    c = bench.bf16_agreement(XL2, 8, torch.device("cuda"))
    assert c["loss_rel_err"] <= bench.BF16_LOSS_RTOL, c
    assert 0 < c["output_rel_err"] <= bench.BF16_OUTPUT_RTOL, c


def test_training_step_has_no_host_sync():
    """The trainer's own step (harness.train.train_step, bf16) makes no host-device synchronisation: none
    reported by torch.cuda.set_sync_debug_mode, so the CPU can queue steps ahead of the GPU."""
    n = bench.host_syncs_per_step(bench.Cell("S", patch=8), 32, torch.device("cuda"))
    assert n == 0, f"{n} host-device synchronisations in one training step"


def test_known_gpu_has_a_table_peak():
    name = torch.cuda.get_device_name()
    peak = bench.device_peak(torch.device("cuda"))
    assert peak["name"] == name and all(v > 0 for v in peak["tflops"].values())
    if any(k in name for k in ("H100", "H200", "A100")) and "NVL" not in name:
        assert peak["source"].startswith("data sheet"), peak


def test_fast_path_train_record_on_gpu():
    """A short bf16 + compiled run of S/8 through the trainer's step: images/s, utilisation within (0, 1],
    peak memory recorded, and the record names the fast path that --record would store."""
    r = bench.bench_train(bench.Cell("S", patch=8), 64, torch.device("cuda"), ["bf16", bench.FAST_PATH],
                          steps=2, repeats=1, warmup=2, check_bf16=False)
    for s in r["settings"]:
        assert s["images_per_s"] > 0 and 0 < s["mfu"] <= 1 and s["peak_mem_gib"] > 0, s
    assert bench.recorded_setting(r) == bench.FAST_PATH
