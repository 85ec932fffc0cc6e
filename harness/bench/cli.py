"""`python -m harness.bench {train,sample,loader,data,features,plan,analysis,summarize}`: run one benchmark, print its
record as a table (or JSON), optionally write it to a file and, for training, record the throughput."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness import bench
from harness.bench.analysis import bench_analysis
from harness.bench.analysis import describe as describe_analysis
from harness.bench.common import IMAGENET_CLASSES, VAES, Cell, environment, resolve_device, write_progress
from harness.bench.data import bench_data, data_kinds
from harness.bench.features import bench_features
from harness.bench.loader import bench_loader
from harness.bench.plan import PAPER_GRID, bench_plan
from harness.bench.report import format_table, summarize
from harness.bench.sample import bench_sample
from harness.bench.train import bench_train, recorded_setting
from harness.core import cli, throughput
from harness.model.dit import CONDS, PATCH_SIZES


def _cell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="S", help="S, B, L, XL, or an off-paper name with --depth/--hidden/--heads")
    p.add_argument("--patch", type=int, default=8, choices=PATCH_SIZES)
    p.add_argument("--cond", default="adaln_zero", choices=CONDS)
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256x256 images)")
    p.add_argument("--num-classes", type=int, default=IMAGENET_CLASSES)
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--settings", help="comma-separated setting names (default: all for the device)")
    p.add_argument("--vae", choices=VAES, help="codec: tiny (CPU default), sd-arch (GPU default), none")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of a table")
    p.add_argument("--json-out", help="also write the record to this file (rewritten as settings finish)")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    _output_args(p)
    p.add_argument("--threads", help="torch intra-op threads (loader: a comma-separated list to compare)")


def _cell(a: argparse.Namespace) -> Cell:
    return Cell(a.model, a.patch, a.cond, a.input_size, num_classes=a.num_classes, depth=a.depth,
                hidden_size=a.hidden, num_heads=a.heads)


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def parser() -> argparse.ArgumentParser:
    """Returns the command line's parser (one subcommand per benchmark, and `summarize`)."""
    p = cli.ArgumentParser(prog="python -m harness.bench", description=bench.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("train", help="training step images/s, MFU, memory; ratios to fp32 eager")
    _cell_args(t)
    _common_args(t)
    t.add_argument("--steps", type=int, default=3, help="training steps per timed chunk")
    t.add_argument("--no-bf16-check", action="store_true")
    t.add_argument("--record", action="store_true",
                   help=f"store the fast path's throughput (else the fastest's) in {throughput.THROUGHPUT_FILE}")
    t.add_argument("--throughput-file", default=str(throughput.THROUGHPUT_FILE))
    s = sub.add_parser("sample", help="sampling images/s with and without guidance; FID-50K device-hours")
    _cell_args(s)
    _common_args(s)
    s.add_argument("--sampling-steps", type=int, default=10)
    ld = sub.add_parser("loader", help="latent loader images/s (get_batch + augment) from temporary shards")
    _common_args(ld)
    ld.add_argument("--batch", type=int, default=256)
    ld.add_argument("--count", type=int, default=8192, help="latent images written to the temporary shards")
    ld.add_argument("--dtype", default="float16", help="stored dtype: float16 or float32")
    ld.add_argument("--steps", type=int, default=20)
    dt = sub.add_parser("data", help="a data kind's training batches images/s (shapes: rendered on the fly)")
    _common_args(dt)
    dt.add_argument("--kind", dest="data_kind", default="shapes", choices=data_kinds(), help="the data kind")
    dt.add_argument("--batch", type=int, default=256)
    dt.add_argument("--steps", type=int, default=20, help="batches per timed chunk")
    dt.add_argument("--image-size", type=int, help="override the preset's data.image_size")
    f = sub.add_parser("features", help="feature extraction images/s (digits CNN; Inception if present)")
    _common_args(f)
    f.add_argument("--batch", type=int, default=256)
    pl = sub.add_parser("plan", help="wall time of the sweep's plan of a grid (the paper's 48 cells)")
    pl.add_argument("--repeats", type=int, default=3, help="runs of each timing; the median is reported")
    pl.add_argument("--grid", default=" ".join(PAPER_GRID),
                    help="space-separated key=a,b,... sweep overrides (default: the paper's 48-cell grid)")
    pl.add_argument("--no-import-time", action="store_true", help="skip timing `import harness.sweep` alone")
    pl.add_argument("--no-in-process", action="store_true", help="skip timing compose and plan_row in process")
    _output_args(pl)
    an = sub.add_parser("analysis", help="seconds to write the report of a synthetic 48-cell sweep")
    an.add_argument("--records", type=int, default=10, help="evaluations and validation records per cell")
    an.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of every fit")
    _output_args(an)
    sm = sub.add_parser("summarize", help="merge a GPU check folder into gpu_check.json and gpu_check.md")
    sm.add_argument("out_dir")
    return p


@cli.guard
def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark the command line names; returns its record (summarize: the merged dict)."""
    a = parser().parse_args(argv)
    if a.kind == "summarize":
        merged = summarize(a.out_dir)
        print((Path(a.out_dir) / "gpu_check.md").read_text(), flush=True)
        return merged

    if getattr(a, "threads", None) and a.kind != "loader":
        torch.set_num_threads(int(a.threads))
    if a.kind == "train":
        record = bench_train(_cell(a), a.batch, resolve_device(a.device), _split(a.settings), a.steps, a.repeats,
                             a.warmup, a.vae, check_bf16=not a.no_bf16_check, progress_path=a.json_out)
    elif a.kind == "sample":
        record = bench_sample(_cell(a), a.batch, resolve_device(a.device), _split(a.settings), a.sampling_steps,
                              a.repeats, a.warmup, a.vae, progress_path=a.json_out)
    elif a.kind == "loader":
        threads = [int(x) for x in _split(a.threads)] if a.threads else [1, torch.get_num_threads()]
        record = bench_loader(a.batch, a.count, a.dtype, tuple(dict.fromkeys(threads)), a.steps, a.repeats)
    elif a.kind == "data":
        record = bench_data(a.data_kind, a.batch, a.steps, a.repeats, a.image_size)
    elif a.kind == "analysis":
        record = bench_analysis(a.records, a.resamples)
        record["env"] = environment(argv)
        write_progress(record, a.json_out)
        print(json.dumps(record, indent=1, default=str) if a.json else describe_analysis(record), flush=True)
        return record
    elif a.kind == "plan":
        record = bench_plan(tuple(a.grid.split()), a.repeats, import_time=not a.no_import_time,
                            in_process=not a.no_in_process)
    else:
        record = bench_features(resolve_device(a.device), a.batch, a.repeats)
    record["env"] = environment(argv)
    write_progress(record, a.json_out)
    if a.kind == "train" and a.record:
        throughput.record_throughput(record, recorded_setting(record), str(torch.__version__), a.throughput_file)
    print(json.dumps(record, indent=1, default=str) if a.json else format_table(record), flush=True)
    return record
