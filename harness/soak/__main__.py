"""The command `python -m harness.soak`: its options (each bad value said in one line, exit 2), `--plan` (the fault
schedule, nothing run), and main, which opens the cluster, runs the soak and prints every invariant's count
(exit 0 when all hold, 1 when one breaks or the soak did not settle).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import harness.soak
from harness.core import cli
from harness.soak.cluster import CLUSTER_SH, DEFAULT_CLUSTER_DIR, Cluster, read_env_file
from harness.soak.faults import KINDS, format_schedule, make_schedule
from harness.soak.run import Options, Soak, SoakError


def parse_kinds(text: str) -> dict[str, float]:
    """Returns the fault kinds of `--kinds` (comma-separated names, or `all`) with their weights."""
    if text == "all":
        return dict(KINDS)
    names = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise cli.BadInput(f"--kinds={text!r}: unknown kind(s) {unknown or '(none given)'}; allowed: all or "
                           f"a comma-separated list of {', '.join(KINDS)}")
    return {k: KINDS[k] for k in names}


def parse_options(argv: list[str] | None) -> tuple[Options, bool]:
    """Returns (the options, whether only the schedule is asked for); one-line errors (exit 2) for bad values."""
    p = cli.ArgumentParser(prog="python -m harness.soak", description=harness.soak.__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the fault schedule's seed (default 0)")
    p.add_argument("--cells", type=int, default=8, help="cells of the grid, seeds 0..N-1 (default 8)")
    p.add_argument("--faults", type=int, default=100, help="faults in the schedule (default 100)")
    p.add_argument("--minutes", type=float, default=20.0, help="the span the faults are drawn over (default 20)")
    p.add_argument("--steps", type=int, default=4000, help="training steps per cell (default 4000)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default steps/40)")
    p.add_argument("--kinds", default="all", help=f"fault kinds, comma-separated (default all: {', '.join(KINDS)})")
    p.add_argument("--out", type=Path, default=None, help="output folder, new or empty (default outputs/soak/seed<N>)")
    p.add_argument("--cluster-dir", type=Path, default=None,
                   help=f"the cluster's state folder (default $HARNESS_SLURM_DIR or {DEFAULT_CLUSTER_DIR})")
    p.add_argument("--cluster-sh", type=Path, default=CLUSTER_SH, help="the cluster script (tests/slurm/cluster.sh)")
    p.add_argument("--max-relaunches", type=int, default=100, help="launches of the main sweep at most (default 100)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="the whole soak's bound (default 3 x --minutes + 30)")
    p.add_argument("--plan", action="store_true", help="print the fault schedule and exit")
    a = p.parse_args(argv)
    checks = [
        (a.seed >= 0, f"--seed={a.seed}: must be 0 or more"),
        (1 <= a.cells <= 64, f"--cells={a.cells}: allowed 1..64 (each cell is a job on the one test node)"),
        (a.faults >= 0, f"--faults={a.faults}: must be 0 or more"),
        (0 < a.minutes <= 24 * 60, f"--minutes={a.minutes:g}: allowed above 0, at most 1440"),
        (a.steps >= 3, f"--steps={a.steps}: must be at least 3 (evaluations at a third, two thirds and the end)"),
        (a.ckpt_every is None or 1 <= a.ckpt_every <= a.steps,
         f"--ckpt-every={a.ckpt_every}: allowed 1..--steps ({a.steps})"),
        (a.max_relaunches >= 1, f"--max-relaunches={a.max_relaunches}: must be at least 1"),
        (a.max_minutes is None or a.max_minutes > a.minutes,
         f"--max-minutes={a.max_minutes}: must be above --minutes ({a.minutes:g})"),
    ]
    for ok, message in checks:
        if not ok:
            raise cli.BadInput(message)
    kinds = parse_kinds(a.kinds)
    cluster_dir = a.cluster_dir or Path(os.environ.get("HARNESS_SLURM_DIR", DEFAULT_CLUSTER_DIR))
    opts = Options(seed=a.seed, cells=a.cells, faults=a.faults, minutes=a.minutes, steps=a.steps,
                   ckpt_every=a.ckpt_every or max(1, a.steps // 40),
                   out=(a.out or Path("outputs") / "soak" / f"seed{a.seed}").resolve(),
                   cluster_dir=cluster_dir.resolve(), cluster_sh=a.cluster_sh,
                   max_relaunches=a.max_relaunches,
                   max_minutes=a.max_minutes if a.max_minutes is not None else 3 * a.minutes + 30,
                   kinds=kinds)
    return opts, a.plan


def open_cluster(opts: Options) -> Cluster:
    """Returns the cluster of --cluster-dir; cli.BadInput (one line) when it is not there or not up."""
    env_file = opts.cluster_dir / "env.sh"
    if not opts.cluster_sh.is_file():
        raise cli.BadInput(f"--cluster-sh={opts.cluster_sh}: no such file (the repository's tests/slurm/cluster.sh)")
    if not env_file.is_file():
        raise cli.BadInput(f"--cluster-dir={opts.cluster_dir}: no env.sh there; start the cluster with "
                           f"bash tests/slurm/cluster.sh up {opts.cluster_dir}")
    cluster = Cluster(opts.cluster_dir, {**os.environ, **read_env_file(env_file)}, opts.cluster_sh)
    if not cluster.up():
        raise cli.BadInput(f"--cluster-dir={opts.cluster_dir}: the cluster is not up (a daemon is stopped); run "
                           f"bash tests/slurm/cluster.sh up {opts.cluster_dir}")
    return cluster


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.soak [--seed N] [--cells N] [--faults N] [--minutes M] ...`: runs the soak, prints where
    its report is and every invariant's count; returns the exit code (0: every invariant holds)."""
    try:
        opts, plan_only = parse_options(argv)
        if plan_only:
            print(format_schedule(make_schedule(opts.seed, opts.faults, opts.minutes, opts.kinds)))
            return 0
        if opts.out.exists() and any(opts.out.iterdir()):
            raise cli.BadInput(f"--out={opts.out}: exists and is not empty; give a new folder (a soak starts from "
                               "nothing)")
        cluster = open_cluster(opts)
    except cli.BadInput as e:  # only the input is checked here: an error of the soak itself shows its traceback
        if cli.debug():
            raise
        cli.fail(e)
    opts.out.mkdir(parents=True, exist_ok=True)
    # TERM (and INT, which a shell ignores in the background jobs it starts) end the soak through its cleanup:
    # the sweeps it started are stopped, its jobs cancelled, a daemon it stopped started again.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    print(f"soak seed {opts.seed}: {opts.cells} cells x {opts.steps} steps, {opts.faults} faults over "
          f"{opts.minutes:g} min on {opts.cluster_dir}; report in {opts.out}", flush=True)
    try:
        report = Soak(opts, cluster).run()
    except SoakError as e:
        cli.fail(e, code=cli.FAILED_EXIT)
    counts = report["invariant_counts"]
    print(f"faults applied {report['faults_applied']} of {len(report['faults'])} "
          f"({', '.join(f'{k} {sum(v.values())}' for k, v in report['faults_by_kind'].items())}); "
          f"wall {report['wall_s'] / 60:.1f} min; settled {report['settled']}", flush=True)
    print("invariants: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    print(f"report: {opts.out / 'report.md'}", flush=True)
    return 0 if report["holds"] else cli.FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
