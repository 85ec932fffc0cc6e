"""A seeded chaos soak of the sweep on the local SLURM test cluster: the faults a cluster really has, overlapping,
and at the end the invariants that say nothing was lost and nothing was done twice (docs/soak.md).

    python -m harness.soak --seed 1                          # the long version: 8 cells, 100 faults over 20 minutes
    python -m harness.soak --seed 1 --cells 4 --faults 6 --minutes 1 --steps 600   # a short one (tests/slurm)
    python -m harness.soak --seed 1 --plan                   # print the fault schedule and run nothing

The cluster is the one `bash tests/slurm/cluster.sh up DIR` starts (`--cluster-dir`, default $HARNESS_SLURM_DIR or
/tmp/harness-slurm); the soak reads its clients' environment from DIR/env.sh and restarts its daemons through
cluster.sh's fault verbs. It runs a sweep of tiny cells (a 1-block DiT on 8x8 digits, several checkpoints and
evaluations each) through the SLURM launcher, and a fault loop that fires the seeded schedule: cancelled,
requeued and preempted jobs, SIGKILLed training and evaluation processes, slurmctld restarts, slurmd stopped for a
while, the sweep relaunched while its jobs run or killed, torn files of a cell. The sweep is relaunched until one
launched after the last fault reports every cell done; then a last relaunch must do nothing. Meanwhile the same
cells are trained once without faults (locally, one thread, as the jobs), and the end state is checked against
them. The schedule (moments, kinds, the draws that pick targets) is a function of the seed alone; which job or
file a draw lands on depends on what the cluster is doing at that moment, which is not.

Writes to --out: schedule.json, report.json and report.md (seed, every fault with its moment, target and outcome,
every invariant's count with its definition), sweep/ (the soak's sweep folder), reference/ (the undisturbed
cells), logs/ (each sweep's output). Exit 0 when every invariant holds, 1 when one breaks or the soak could not
settle within its bounds, 2 for bad input.

The modules, bottom to top (each imports only those below it, faults and invariants not each other; pyproject.toml's
import contracts check it):
    cluster     the test cluster's clients and daemons, the sweep's launches, the watcher of its folder
    faults      the fault kinds, the seeded schedule, and Chaos, which applies each fault
    invariants  the end-of-soak checks and what each counts
    run         the soak itself (Options, Soak) and its report
    __main__    the command: options, checks, exit codes
"""

from harness.soak.faults import (  # noqa: F401 - the names the tests and other code use
    JOB_KINDS,
    KINDS,
    TEAR_FILES,
    WARMUP_FRACTION,
    Fault,
    format_schedule,
    make_schedule,
)
from harness.soak.invariants import INVARIANTS  # noqa: F401
