"""harness.bench on tiny cells on the CPU: structure and sanity of the records, never their speed."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from harness import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = bench.Cell("tiny", patch=4, input_size=8, num_classes=10, depth=1, hidden_size=32, num_heads=2)
CPU = torch.device("cpu")


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def train_record():
    return bench.bench_train(TINY, 4, CPU, ["fp32_eager", "bf16", "grad_ckpt", "vae_encode"], steps=1,
                             repeats=2, warmup=1)


def test_train_record_structure_and_values(train_record):
    r = train_record
    assert r["kind"] == "train" and r["complete"] and r["baseline"] == "fp32_eager"
    assert [s["name"] for s in r["settings"]] == ["fp32_eager", "bf16", "grad_ckpt", "vae_encode"]
    assert r["cell"]["gflops"] > 0 and r["cell"]["params"] > 0 and r["cell"]["tokens"] == 4
    assert r["device"]["source"] == "measured matmul" and r["device"]["type"] == "cpu"
    assert all(_finite_positive(v) for v in r["device"]["tflops"].values())
    for s in r["settings"]:
        assert _finite_positive(s["images_per_s"]) and len(s["images_per_s_runs"]) == 2
        assert _finite_positive(s["tflops"]) and _finite_positive(s["mfu"])
        assert _finite_positive(s["ratio_to_baseline"])
        assert s["peak_mem_gib"] is None  # CPU: no per-setting memory figure
    assert r["settings"][0]["ratio_to_baseline"] == 1.0
    # TFLOP/s is images/s x 3 x 2 x Gflops (forward + backward, real FLOPs)
    s = r["settings"][0]
    assert s["tflops"] == pytest.approx(s["images_per_s"] * 6 * r["cell"]["gflops"] / 1e3)
    assert r["host_syncs_per_step"] is None
    json.dumps(r)  # JSON-able as --json prints it


def test_bf16_loss_and_output_agree_with_fp32(train_record):
    c = train_record["bf16_check"]
    assert c["ok"], c
    assert 0 <= c["loss_rel_err"] <= bench.BF16_LOSS_RTOL
    assert 0 < c["output_rel_err"] <= bench.BF16_OUTPUT_RTOL  # > 0: the output is not the zero of a fresh model
    assert c["loss_fp32"] > 0 and math.isfinite(c["loss_bf16"])


def test_table_lists_every_setting(train_record):
    text = bench.format_table(train_record)
    for s in train_record["settings"]:
        assert s["name"] in text
    assert "bf16 vs fp32" in text and "ok" in text


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="nope"):
        bench.bench_train(TINY, 2, CPU, ["nope"])
    with pytest.raises(ValueError, match="batch=0"):
        bench.bench_train(TINY, 0, CPU, ["fp32_eager"])
    with pytest.raises(ValueError, match="mps"):
        bench.resolve_device("mps")
    with pytest.raises(ValueError, match="huge"):
        bench._codec("huge", CPU)


def test_peak_table_names():
    assert bench.peak_table_entry("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert bench.peak_table_entry("NVIDIA H100 PCIe") == "H100 PCIe"
    assert bench.peak_table_entry("NVIDIA H200") == "H200"
    assert bench.peak_table_entry("NVIDIA A100-SXM4-80GB") == "A100"
    assert bench.peak_table_entry("NVIDIA H100 NVL") is None  # not in the table: measured instead
    assert bench.peak_table_entry("NVIDIA GeForce RTX 4090") is None
    for peaks in bench.PEAK_TFLOPS.values():
        assert peaks["bf16"] > peaks["tf32"] > peaks["fp32"] > 0


def test_sample_record():
    r = bench.bench_sample(TINY, 2, CPU, ["fp32", "bf16_cfg"], sampling_steps=2, repeats=1, warmup=0, vae="tiny")
    assert r["complete"] and [s["name"] for s in r["settings"]] == ["fp32", "bf16_cfg"]
    assert r["decode_s_per_image"] > 0
    for s in r["settings"]:
        assert _finite_positive(s["images_per_s"]) and _finite_positive(s["ratio_to_baseline"])
        hours = s["fid50k_250_steps_device_hours"]
        assert math.isfinite(hours) and hours > 0
    assert r["settings"][1]["guidance"] and not r["settings"][0]["guidance"]


def test_loader_reads_what_it_wrote(tmp_path):
    from harness.data import LatentShardDataset

    root = bench.write_latent_shards(tmp_path / "shards", 10, latent_shape=(4, 4, 4), shard_size=4, num_classes=3)
    ds = LatentShardDataset(str(root), vae="stabilityai/sd-vae-ft-ema", resolution=32)
    assert len(ds) == 10 and ds.num_classes == 3
    x, y = ds.get_batch(torch.arange(10))
    assert x.shape == (10, 2, 2, 4, 4, 4) and (x[:, :, 1] >= 0).all() and int(y.max()) < 3
    r = bench.bench_loader(batch=8, count=32, threads=(1,), steps=2, repeats=2, root=str(tmp_path))
    (row,) = r["settings"]
    assert row["threads"] == 1 and _finite_positive(row["images_per_s"])
    assert _finite_positive(row["get_batch_images_per_s"]) and _finite_positive(row["augment_images_per_s"])
    assert row["meets_target"] == (row["images_per_s"] >= bench.LOADER_TARGET_IMAGES_PER_S)
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # the bench's temporary shards are gone
    with pytest.raises(ValueError, match="float64"):
        bench.write_latent_shards(tmp_path / "x", 4, dtype="float64")


def test_throughput_file_round_trip_feeds_the_sweep(train_record, tmp_path):
    path = tmp_path / "throughput.yaml"
    assert bench.read_throughput(path) == {"plan_device": None, "devices": {}}
    assert bench.recorded_image_gflops_per_s(path) is None
    record = dict(train_record, env={"date": "2025-01-01T00:00:00+00:00"})
    data = bench.record_throughput(record, path)
    dev = data["devices"][record["device"]["name"]]
    cell = dev["cells"]["DiT-tiny/4"]
    assert cell["setting"] in {s["name"] for s in record["settings"]}
    assert dev["type"] == "cpu" and data["plan_device"] is None  # a CPU never plans GPU-hours
    assert bench.recorded_image_gflops_per_s(path) is None
    # A GPU record becomes the plan device and its figure is what the sweep reads.
    gpu = json.loads(json.dumps(record))
    gpu["device"].update(name="NVIDIA H100 80GB HBM3", type="cuda")
    gpu["settings"].append(dict(gpu["settings"][0], name=bench.FAST_PATH, images_per_s=500.0))
    data = bench.record_throughput(gpu, path)
    assert data["plan_device"] == "NVIDIA H100 80GB HBM3"
    expected = 500.0 * record["cell"]["gflops"]
    assert bench.recorded_image_gflops_per_s(path) == pytest.approx(expected, rel=1e-3)
    assert bench.read_throughput(path) == data
    assert path.read_text().startswith("# Measured training throughput")
    with pytest.raises(ValueError, match="complete train record"):
        bench.record_throughput({"kind": "loader"}, path)


def test_repo_throughput_file_is_readable():
    from harness import sweep

    data = bench.read_throughput()
    assert set(data) >= {"plan_device", "devices"}
    expected = bench.recorded_image_gflops_per_s() or sweep.FAST_DIT_A100_IMAGE_GFLOPS_PER_S
    assert expected == sweep.GPU_IMAGE_GFLOPS_PER_S
    # 256 images x 1000 steps of a 100-Gflops model at that rate
    hours = sweep.estimate_gpu_hours(100.0, 256, 1000)
    assert hours == pytest.approx(256 * 1000 / (expected / 100.0) / 3600)


def test_gpu_check_dry_run_plans_every_phase(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    for phase in ("setup", "gpu_tests", "train_XL2", "sample_XL2", "train_L4", "train_B4", "train_S8", "summary"):
        assert phase in out.stdout
