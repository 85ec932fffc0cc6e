"""harness.bench on tiny cells on the CPU: structure and sanity of the records, never their speed."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness import bench
from harness.bench import cli
from harness.core import throughput

ROOT = Path(__file__).resolve().parents[2]
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


def test_train_bench_times_the_trainers_own_step(monkeypatch):
    """Every warm-up and timed step of the benchmark is one call of harness.train.train_step on a Stepper of
    harness.train.make_stepper with the recipe's settings, on a batch drawn as the trainer draws a step."""
    from harness import train
    from harness.bench import train as bench_train_module
    from harness.core.config import TrainConfig
    from harness.diffusion import DEFAULT_DIFFUSION_STEPS, create_diffusion

    calls = []

    def counting_step(stepper, *args):
        calls.append(stepper)
        return train.train_step(stepper, *args)

    monkeypatch.setattr(bench_train_module, "train_step", counting_step)
    bench.bench_train(TINY, 2, CPU, ["vae_encode"], steps=2, repeats=2, warmup=1, check_bf16=False)
    assert len(calls) == 1 + 2 * 2 and all(isinstance(s, train.Stepper) for s in calls)
    s = calls[0]
    assert s.ema_decay == TrainConfig().ema_decay and s.precision == "fp32" and s.codec is not None
    assert (s.micro, s.accum, s.distributed) == (2, 1, False)
    objective = create_diffusion("")
    a, b = (bench_train_module.fixed_batch(TINY, 64, objective, CPU) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # fixed: every setting and chunk sees the same batch
    assert a["t"].dtype == torch.int64 and int(a["t"].min()) >= 0 and int(a["t"].max()) < DEFAULT_DIFFUSION_STEPS
    assert a["x"].shape == a["noise"].shape == (64, 4, 8, 8) and a["drop"].dtype == torch.bool


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
        bench.make_codec("huge", CPU)


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
    from harness.data.datasets import LatentShardDataset

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
    assert throughput.read_throughput(path) == {"plan_device": None, "devices": {}}
    assert throughput.recorded_image_gflops_per_s(path) is None
    record = dict(train_record, env={"date": "2025-01-01T00:00:00+00:00"})
    setting = bench.recorded_setting(record)
    assert setting == max(record["settings"], key=lambda s: s["images_per_s"])["name"]  # no fast path ran: the fastest
    data = throughput.record_throughput(record, setting, str(torch.__version__), path)
    dev = data["devices"][record["device"]["name"]]
    assert dev["cells"]["DiT-tiny/4"]["setting"] == setting
    assert dev["type"] == "cpu" and data["plan_device"] is None  # a CPU never plans GPU-hours
    assert throughput.recorded_image_gflops_per_s(path) is None
    # A GPU record becomes the plan device and its fast path's figure is what the sweep reads.
    gpu = json.loads(json.dumps(record))
    gpu["device"].update(name="NVIDIA H100 80GB HBM3", type="cuda")
    gpu["settings"].append(dict(gpu["settings"][0], name=bench.FAST_PATH, images_per_s=0.5))
    assert bench.recorded_setting(gpu) == bench.FAST_PATH  # the fast path, even when it is not the fastest
    data = throughput.record_throughput(gpu, bench.recorded_setting(gpu), str(torch.__version__), path)
    assert data["plan_device"] == "NVIDIA H100 80GB HBM3"
    expected = 0.5 * record["cell"]["gflops"]
    assert throughput.recorded_image_gflops_per_s(path) == pytest.approx(expected, rel=1e-3)
    assert throughput.read_throughput(path) == data
    assert path.read_text().startswith("# Measured training throughput")
    with pytest.raises(ValueError, match="complete train record"):
        bench.recorded_setting({"kind": "loader"})
    with pytest.raises(ValueError, match="nothing to record"):
        bench.recorded_setting(dict(record, settings=[dict(record["settings"][0], images_per_s=None)]))


def test_repo_throughput_file_is_readable():
    from harness import sweep

    data = throughput.read_throughput()
    assert set(data) >= {"plan_device", "devices"}
    expected = throughput.recorded_image_gflops_per_s() or throughput.FAST_DIT_A100_IMAGE_GFLOPS_PER_S
    assert expected == throughput.gpu_image_gflops_per_s()
    # 256 images x 1000 steps of a 100-Gflops model at that rate
    hours = sweep.estimate_gpu_hours(100.0, 256, 1000)
    assert hours == pytest.approx(256 * 1000 / (expected / 100.0) / 3600)


def _cpu_file(path, devices):
    """Writes a throughput file of CPU devices {name: {label: (gflops, image_gflops_per_s)}}; the device's own
    rate is its largest cell's, as record_throughput keeps it."""
    data = {"plan_device": None, "devices": {
        name: {"cells": {label: {"gflops": g, "image_gflops_per_s": r} for label, (g, r) in cells.items()},
               "type": "cpu", "train_image_gflops_per_s": max(cells.values())[1]}
        for name, cells in devices.items()}}
    path.write_text(yaml.safe_dump(data))


def test_cpu_rate_follows_the_model_size_between_recorded_cells(tmp_path):
    path = tmp_path / "throughput.yaml"
    assert throughput.cpu_image_gflops_per_s(0.01, path) == throughput.DEFAULT_CPU_IMAGE_GFLOPS_PER_S  # none recorded
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = np.sort(10 ** rng.uniform(-4, 0, rng.integers(1, 5)))
        r = np.sort(10 ** rng.uniform(-1, 2, len(g)))  # a CPU's rate grows with the model, as measured
        _cpu_file(path, {throughput.cpu_name(): {f"c{i}": (float(a), float(b)) for i, (a, b) in enumerate(zip(g, r))},
                         "a faster CPU elsewhere": {"big": (1.0, 1e4)}})
        assert throughput.cpu_image_gflops_per_s(None, path) == pytest.approx(r[-1])  # the largest cell's
        for gi, ri in zip(g, r):
            assert throughput.cpu_image_gflops_per_s(float(gi), path) == pytest.approx(ri)
        assert throughput.cpu_image_gflops_per_s(float(g[0]) / 10, path) == pytest.approx(r[0])  # held at the ends
        assert throughput.cpu_image_gflops_per_s(float(g[-1]) * 10, path) == pytest.approx(r[-1])
        between = float(10 ** rng.uniform(np.log10(g[0]), np.log10(g[-1])))
        j = np.searchsorted(g, between)
        lo, hi = (r[j - 1], r[j]) if 0 < j < len(g) else (r[0], r[0]) if j == 0 else (r[-1], r[-1])
        assert lo * (1 - 1e-9) <= throughput.cpu_image_gflops_per_s(between, path) <= hi * (1 + 1e-9)
    # an unrecorded processor plans at the fastest recorded CPU's cells
    _cpu_file(path, {"one CPU": {"a": (0.001, 2.0), "b": (0.1, 20.0)}, "another": {"a": (0.001, 1.0)}})
    assert throughput.cpu_image_gflops_per_s(0.01, path) == pytest.approx(math.sqrt(2.0 * 20.0))


def test_plan_grid_and_output_parsing():
    cells = bench.grid_cells(bench.PAPER_GRID)
    assert len(cells) == 48 and len({tuple(c) for c in cells}) == 48
    assert cells[0] == ["model=S", "patch=2", "cond=in_context"]  # the sweep's order: the last key fastest
    assert bench.grid_cells(["model=S", "patch=8,4"]) == [["model=S", "patch=8"], ["model=S", "patch=4"]]
    for bad in (["model"], ["model="], ["=S"], ["patch=8,,4"]):
        with pytest.raises(ValueError, match="key=value"):
            bench.grid_cells(bad)
    out = ("sweep folder: /x\ncell   objective\n------\nDiT-S-8_adaln_zero_latents_s0_0 ddpm\n"
           "DiT-S-4_adaln_zero_latents_s0_1 ddpm\n2 cells, 2 to run; estimated GPU-hours: 1.0 in all\n")
    assert bench.listed_cells(out) == 2
    with pytest.raises(ValueError, match="says 3 cells"):
        bench.listed_cells(out.replace("2 cells, 2 to run", "3 cells, 3 to run"))
    with pytest.raises(ValueError, match="no summary"):
        bench.listed_cells(out.splitlines()[0])


@pytest.mark.process
def test_plan_record_of_a_small_grid(tmp_path):
    """The plan benchmark on two cells (S/8, S/4): the sweep's plan in a fresh process and the in-process
    parts; the import-only timing is skipped here (it costs another interpreter start)."""
    r = bench.bench_plan(("model=S", "patch=8,4"), repeats=1, import_time=False, root=str(tmp_path))
    assert r["kind"] == "plan" and r["complete"] and r["cells"] == 2 and r["repeats"] == 1
    assert r["grid"] == ["model=S", "patch=8,4"] and "plan=true" in r["command"]
    assert [s["name"] for s in r["settings"]] == ["sweep_plan", "compose", "plan_row"]
    assert r["settings"][0]["cells_listed"] == 2
    for s in r["settings"]:
        assert _finite_positive(s["wall_s"]) and len(s["wall_s_runs"]) == len(s["cpu_s_runs"]) == 1
        assert math.isfinite(s["cpu_s"]) and s["cpu_s"] >= 0
    assert r["settings"][0]["cpu_s"] > 0  # the child's CPU time is counted
    assert math.isfinite(r["loadavg_1m_start"]) and r["device"]["name"]
    assert list(tmp_path.iterdir()) == []  # the temporary shards and sweep folder are gone
    text = bench.format_table(r)
    assert "2 cells" in text and "sweep_plan" in text and "wall_s_runs" not in text
    json.dumps(r)
    with pytest.raises(ValueError, match="repeats=0"):
        bench.bench_plan(("model=S",), repeats=0)


def test_cli_parses_every_subcommand():
    p = cli.parser()
    a = p.parse_args(["plan"])
    assert a.repeats == 3 and tuple(a.grid.split()) == bench.PAPER_GRID and not a.no_import_time
    a = p.parse_args(["plan", "--repeats", "1", "--grid", "model=S patch=8,4", "--no-in-process", "--json"])
    assert (a.repeats, a.grid, a.no_in_process, a.json) == (1, "model=S patch=8,4", True, True)
    a = p.parse_args(["train", "--model", "XL", "--patch", "2", "--batch", "128", "--record"])
    assert (a.model, a.patch, a.batch, a.record) == ("XL", 2, 128, True)
    assert a.throughput_file == str(throughput.THROUGHPUT_FILE)
    for kind in ("sample", "loader", "features"):
        assert p.parse_args([kind]).kind == kind
    assert p.parse_args(["summarize", "out"]).out_dir == "out"


def test_summary_merges_a_gpu_check_folder(train_record, tmp_path):
    (tmp_path / "phases.tsv").write_text("gpu_tests\tok\t0\t12\ntrain_XL2\ttimeout\t124\t150\n")
    (tmp_path / "train_XL2.json").write_text(json.dumps(train_record))
    (tmp_path / "broken.json").write_text("{")
    merged = bench.summarize(tmp_path)
    assert [p["phase"] for p in merged["phases"]] == ["gpu_tests", "train_XL2"]
    assert merged["records"]["train_XL2"]["kind"] == "train" and "unreadable" in merged["records"]["broken"]["error"]
    md = (tmp_path / "gpu_check.md").read_text()
    for s in train_record["settings"]:
        assert s["name"] in md
    assert "| train_XL2 | timeout | 124 | 150 |" in md and "bf16 vs fp32" in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["phases"] == merged["phases"]


@pytest.mark.process
def test_gpu_check_dry_run_plans_every_phase(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    for phase in ("setup", "gpu_tests", "train_XL2", "sample_XL2", "train_L4", "train_B4", "train_S8", "summary"):
        assert phase in out.stdout
