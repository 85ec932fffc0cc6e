"""`--help` of the commands that take config overrides (harness.sweep, harness.train, harness.evaluate): what the
command does, every config group with its options, the named grids with their one-line descriptions, and
examples, read from conf/ and sweeps/ as they are now (a new preset or grid appears in the help by existing).

It is printed before the command imports anything heavy (torch, Hydra's config loader), so it answers at once:
each command calls `exit_with_help_if_asked` first thing.
"""

from __future__ import annotations

import sys

from harness.core.config import CONDS, CONF_DIR, PATCH_SIZES, named_sweeps, sweep_description

HELP_FLAGS = ("-h", "--help")
# The config groups of conf/, in the order a cell is described, with what each chooses.
GROUPS = {
    "model": "transformer size (depth, width, heads): the paper's S, B, L, XL and off-paper sizes",
    "data": "the data set: embedded digits and shapes, ImageNet folders, precomputed latents, synthetic",
    "train": "the training recipe (steps, batch, learning rate, EMA, validation and checkpoint intervals)",
    "eval": "the evaluation protocol (sample count, sampler, guidance, metrics, reference set)",
    "objective": "what the network learns: the paper's DDPM, or rectified flow",
    "cluster": "a SLURM cluster's settings, with hydra/launcher=slurm",
}
KEYS = {
    "patch": ("patch size", PATCH_SIZES),
    "cond": ("conditioning variant", CONDS),
}

COMMANDS = {
    "sweep": {
        "what": "Runs a grid of DiT cells, each trained and evaluated in its own run folder: one SLURM job per cell "
                "(hydra/launcher=slurm) or one after another on this machine. The whole grid is checked and planned "
                "first; a relaunch runs only what is missing.",
        "usage": "python -m harness.sweep -m [GROUP=OPTION[,OPTION...]] [KEY=VALUE[,VALUE...]] [plan=true]",
        "examples": [
            ("python -m harness.sweep -m sweeps=demo", "the embedded CPU demo on digits"),
            ("python -m harness.sweep -m sweeps=paper data.path=SHARDS plan=true", "the paper's grid: the plan only"),
            ("python -m harness.sweep -m model=S,B,L,XL patch=2,4,8 data=latents256 data.path=SHARDS "
             "hydra/launcher=slurm cluster=example", "the paper's grid, one SLURM job per cell"),
        ],
        "groups": ("model", "data", "train", "eval", "objective", "cluster"),
        "sweeps": True,
    },
    "train": {
        "what": "Trains one cell to train.steps, resuming exactly from its newest checkpoint after any stop.",
        "usage": "python -m harness.train [GROUP=OPTION] [KEY=VALUE ...]",
        "examples": [
            ("python -m harness.train model=S patch=4 data=digits train=demo train.steps=200", "a small digits cell"),
            ("python -m harness.train model=demo-B data=shapes train=demo objective=flow", "rectified flow on shapes"),
            ("python -m harness.train model=XL patch=2 data=latents256 data.path=SHARDS", "DiT-XL/2 as the paper"),
        ],
        "groups": ("model", "data", "train", "eval", "objective"),
        "sweeps": False,
    },
    "evaluate": {
        "what": "Evaluates the kept checkpoints of one run folder: samples, then FID, sFID, IS, precision/recall "
                "(and FD-DINOv2 on request) with every setting recorded in evals/step_N.json; with "
                "validation=only, measures the held-out validation loss of kept checkpoints instead.",
        "usage": "python -m harness.evaluate run_dir=RUN_FOLDER step=N|all [validation=only] [eval=PRESET] "
                 "[eval.KEY=VALUE ...]",
        "examples": [
            ("python -m harness.evaluate run_dir=outputs/demo/DiT-demo-B-2_... step=all eval=digits",
             "every configured step"),
            ("python -m harness.evaluate run_dir=RUN step=400000 eval=fid50k_cfg", "the paper's guided protocol"),
            ("python -m harness.evaluate run_dir=RUN step=all validation=only", "the validation loss of kept "
             "checkpoints"),
        ],
        "groups": ("eval",),
        "sweeps": False,
    },
}


def options(group: str) -> list[str]:
    """Returns the options of a config group of conf/ (its file names), sorted."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def help_text(command: str) -> str:
    """Returns the help of a command: what it does, usage, config groups and keys with their options, the named
    grids (for the sweep), examples."""
    c = COMMANDS[command]
    lines = [f"python -m harness.{command}: {c['what']}", "", f"usage: {c['usage']}", "",
             "Config groups (GROUP=OPTION; in a sweep, a comma-separated list sweeps them):"]
    width = max(len(g) for g in (*c["groups"], *KEYS, "sweeps"))
    for group in c["groups"]:
        lines.append(f"  {group:<{width}}  {' '.join(options(group))}")
        lines.append(f"  {'':<{width}}    {GROUPS[group]}")
    if command != "evaluate":
        lines += ["", "Keys of a cell (KEY=VALUE):"]
        for key, (what, allowed) in KEYS.items():
            lines.append(f"  {key:<{width}}  {' '.join(str(a) for a in allowed)}   ({what})")
        lines.append(f"  {'...':<{width}}  any field of the typed schema, e.g. train.lr=3e-4 model.hidden_size=96 "
                     "(harness/core/config.py)")
    if c["sweeps"]:
        lines += ["", "Named grids (sweeps=NAME):"]
        grids = named_sweeps()
        name_width = max(len(p.stem) for p in grids)
        lines += [f"  {p.stem:<{name_width}}  {sweep_description(p)}" for p in grids]
    lines += ["", "Examples:"]
    lines += [f"  {cmd}\n      {why}" for cmd, why in c["examples"]]
    lines += ["", "Bad input is said in one line (exit 2); HARNESS_DEBUG=1 shows the traceback. docs/ has the rest."]
    if command == "sweep":
        lines.append("Hydra's own flags: --hydra-help, --cfg job, --shell-completion.")
    return "\n".join(lines)


def exit_with_help_if_asked(command: str, module: str, argv: list[str] | None = None) -> None:
    """Prints the help of `command` and exits 0 when the module runs as a program with -h or --help."""
    argv = sys.argv[1:] if argv is None else argv
    if module == "__main__" and any(a in HELP_FLAGS for a in argv):
        print(help_text(command))
        raise SystemExit(0)
