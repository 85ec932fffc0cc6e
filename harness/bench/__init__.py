"""Throughput of the harness's hot paths, one module each: the training step (`train`), sampling
(`sample`), the latent loader (`loader`), generated data (`data`: the procedural shapes' batches), feature
extraction (`features`) and the sweep's plan (`plan`);
`common` holds the device, its peak and the timing loop, `report` the tables, `cli` the command line.

Every setting of one run is timed in the same process, interleaved round by round on the CPU, so the
ratios to the plain fp32 eager baseline hold on a noisy machine; each figure is the median of `repeats`
timed chunks of `steps` steps after `warmup` untimed ones. The training benchmark times the trainer's own
step (harness.train.make_stepper and train_step). Utilisation (MFU) is the model's real FLOPs (2 per
multiply-add of harness.model.flops, x3 for forward + backward; gradient-checkpoint recompute and the VAE not
counted) over the dense peak of the device for the setting's precision: a table for known GPUs, a measured
matmul for the CPU or an unknown device. Nothing else in the harness imports this package.

    python -m harness.bench train --model S --patch 8 --batch 32 [--settings fp32_eager,bf16] [--json]
    python -m harness.bench train --model XL --patch 2 --batch 128 --record   # -> conf/throughput.yaml
    python -m harness.bench sample --model S --patch 8 --batch 8 --sampling-steps 10
    python -m harness.bench loader --batch 256 --threads 1,2
    python -m harness.bench data --kind shapes --batch 256 --threads 1
    python -m harness.bench features
    python -m harness.bench plan [--repeats 3] [--grid "model=S patch=8,4"]
    python -m harness.bench analysis [--records 10] [--resamples 1000]   # the report of a 48-cell sweep
    python -m harness.bench summarize GPU_CHECK_OUT_DIR
"""

from harness.bench.common import (
    IMAGENET_CLASSES,
    PEAK_TFLOPS,
    VAES,
    Cell,
    device_name,
    device_peak,
    environment,
    make_codec,
    peak_table_entry,
    resolve_device,
)
from harness.bench.data import DATA_TARGET_IMAGES_PER_S, bench_data
from harness.bench.features import bench_features
from harness.bench.loader import LATENT_SHAPE_256, LOADER_TARGET_IMAGES_PER_S, bench_loader, write_latent_shards
from harness.bench.plan import PAPER_GRID, bench_plan, grid_cells, listed_cells
from harness.bench.report import format_table, summarize
from harness.bench.sample import CFG_SCALE, FID_HOURS_KEY, SAMPLE_SETTINGS, bench_sample
from harness.bench.train import (
    BASELINE,
    BF16_LOSS_RTOL,
    BF16_OUTPUT_RTOL,
    FAST_PATH,
    TRAIN_SETTINGS,
    bench_train,
    bf16_agreement,
    host_syncs_per_step,
    recorded_setting,
)

__all__ = [
    "BASELINE", "BF16_LOSS_RTOL", "BF16_OUTPUT_RTOL", "CFG_SCALE", "DATA_TARGET_IMAGES_PER_S", "FAST_PATH",
    "FID_HOURS_KEY", "IMAGENET_CLASSES",
    "LATENT_SHAPE_256", "LOADER_TARGET_IMAGES_PER_S", "PAPER_GRID", "PEAK_TFLOPS", "SAMPLE_SETTINGS",
    "TRAIN_SETTINGS", "VAES", "Cell", "bench_data", "bench_features", "bench_loader", "bench_plan", "bench_sample",
    "bench_train", "bf16_agreement", "device_name", "device_peak", "environment", "format_table", "grid_cells",
    "host_syncs_per_step", "listed_cells", "make_codec", "peak_table_entry", "recorded_setting",
    "resolve_device", "summarize", "write_latent_shards",
]
