"""The configs as specifications: every option of every group composes and validates, every named grid plans,
and a cell's id survives upgrades of the harness (new defaulted fields) while a changed value that matters is
a new cell."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from helpers import ConfigPlus, run_module
from omegaconf import OmegaConf
from PIL import Image

from harness import cell, sweep
from harness.bench import write_latent_shards
from harness.core import config
from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.core.config import ALWAYS, CONF_DIR, REPO_ROOT, ROLE, compose
from harness.model import dit
from harness.scaling import isoflop

GROUPS = ("model", "data", "train", "eval", "objective")
SWEEPS = sorted(p.stem for p in (REPO_ROOT / "sweeps").glob("*.yaml"))
SWEEP_CELLS = {"paper": 12, "conditioning": 4, "demo": 6, "scaling": 8}

# The cell ids of grids that studies have already run: the harness must never rename them. (Recorded with the
# first release of the harness; paper cells depend on the shard path, here the literal "SHARDS".)
GOLDEN_IDS = {
    ("sweeps=demo", "model=demo-S", "patch=2"): "DiT-demo-S-2_adaln_zero_digits_s0_3fee024e",
    ("sweeps=demo", "model=demo-S", "patch=4"): "DiT-demo-S-4_adaln_zero_digits_s0_32735c0e",
    ("sweeps=demo", "model=demo-S", "patch=8"): "DiT-demo-S-8_adaln_zero_digits_s0_772902d8",
    ("sweeps=demo", "model=demo-B", "patch=2"): "DiT-demo-B-2_adaln_zero_digits_s0_1df87536",
    ("sweeps=demo", "model=demo-B", "patch=4"): "DiT-demo-B-4_adaln_zero_digits_s0_2e0cd9fb",
    ("sweeps=demo", "model=demo-B", "patch=8"): "DiT-demo-B-8_adaln_zero_digits_s0_f6617afb",
    ("sweeps=paper", "data.path=/tmp", "model=S", "patch=8"): "DiT-S-8_adaln_zero_latents_s0_1205fd6d",
    ("sweeps=paper", "data.path=/tmp", "model=B", "patch=4"): "DiT-B-4_adaln_zero_latents_s0_d4940c5e",
    ("sweeps=paper", "data.path=/tmp", "model=XL", "patch=2"): "DiT-XL-2_adaln_zero_latents_s0_b161f477",
    ("sweeps=conditioning", "data.path=/tmp", "cond=in_context"): "DiT-XL-2_in_context_latents_s0_274285b9",
    ("sweeps=conditioning", "data.path=/tmp", "cond=cross_attn"): "DiT-XL-2_cross_attn_latents_s0_bb9dd94f",
}
# The fields every cell id has hashed since the first release, with their values: they must stay `identity`.
FIRST_RELEASE_IDENTITY = {
    "model": {"name", "depth", "hidden_size", "num_heads", "off_paper"},
    "data": {"name", "path", "image_size", "num_classes", "channels", "vae", "synthetic_count"},
    "train": {"steps", "global_batch", "lr", "weight_decay", "ema_decay", "class_dropout_prob", "val_batch",
              "precision"},
    "": {"patch", "cond", "seed"},
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory) -> dict[str, str]:
    """Folders the data options can point at: latent shards at 256 and 512, an ImageNet-shaped class tree."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for res in (256, 512):
        paths[f"latents{res}"] = str(write_latent_shards(root / f"latents{res}", count=4, shard_size=4,
                                                         latent_shape=(4, res // 8, res // 8)))
    tree = root / "imagenet"
    for k in range(1000):  # the configs say 1000 classes; one image is enough to be a folder of images
        (tree / f"n{k:08d}").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tree / "n00000000" / "a.png")
    paths["imagenet256"] = paths["imagenet512"] = str(tree)
    return paths


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_composes_and_validates(group, option, data_paths):
    extra = [f"data.path={data_paths[option]}"] if group == "data" and option in data_paths else []
    if group == "eval" and option == "shapes":  # the shapes preset reads the shapes' held-out split
        extra = ["data=shapes"]
    elif group == "eval" and option != "digits":  # the ImageNet protocols (fid50k_cfg guides 3 latent channels)
        extra = ["data=latents256", f"data.path={data_paths['latents256']}"]
    cfg = compose([f"{group}={option}", *extra])
    assert cell.validate(cfg) == [], (group, option)
    path = CONF_DIR / group / f"{option}.yaml"
    chosen = OmegaConf.to_container(OmegaConf.load(path))
    section = chosen.get(group, {}) if "@package _global_" in path.read_text() else chosen
    for key, value in section.items():  # the option's values are what the cell gets
        if value != "???":  # a value the user must give (data.path), given above
            assert cfg[group][key] == value, (group, option, key)


@pytest.mark.parametrize("option", _options("hydra/launcher"))
@pytest.mark.parametrize("cluster", ["", *_options("cluster")])
def test_every_launcher_and_cluster_composes(option, cluster):
    if cluster and option != "slurm":
        pytest.skip("a cluster file sets SLURM keys: it goes with hydra/launcher=slurm")
    cfg = compose([f"hydra/launcher={option}", *([f"cluster={cluster}"] if cluster else [])])
    assert cell.validate(cfg) == []


def test_the_paper_recipe_and_protocol_have_one_home():
    """conf/train/paper.yaml and conf/eval/fid50k.yaml select the schema's defaults and add nothing."""
    for group, option in (("train", "paper"), ("eval", "fid50k")):
        assert not OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), f"{group}/{option}.yaml sets values"
    t, e = config.TrainConfig(), config.EvalConfig()
    assert (t.lr, t.global_batch, t.ema_decay, t.steps, t.class_dropout_prob) == (1e-4, 256, 0.9999, 400_000, 0.1)
    assert (e.num_samples, e.sampling_steps, e.cfg_scale, e.sampler) == (50_000, "250", 1.0, "ddpm")


def test_the_model_table_is_the_registry():
    """conf/model/{S,B,L,XL}.yaml hold exactly the paper's sizes of harness.model.dit.MODEL_SIZES (one source)."""
    for name, size in dit.MODEL_SIZES.items():
        m = compose([f"model={name}"]).model
        assert (m.name, m.depth, m.hidden_size, m.num_heads) == (name, size["depth"], size["hidden_size"],
                                                                 size["num_heads"])
    off = [o for o in _options("model") if o not in dit.MODEL_SIZES]
    assert off and all(compose([f"model={o}"]).model.off_paper for o in off)


def test_the_scaling_study_places_several_sizes_at_every_budget():
    """Each option of sweeps/scaling_size/ is one cell of sweeps=scaling: its width with its steps, validated from
    past the warm-up up to its last step and evaluated at its middle and last step. The design's point (the
    IsoFLOP profiles): of six budgets log-spaced from the smallest that three fitted sizes reach to the largest,
    each is crossed by the records of at least three sizes (a parabola's minimum) and the four inside by at least
    four; and the larger a size, the more compute its last step spent."""
    options = sorted(p.stem for p in (REPO_ROOT / "sweeps" / "scaling_size").glob("*.yaml"))
    cfgs = sorted((compose(["sweeps=scaling", f"scaling_size={o}"]) for o in options),
                  key=lambda c: c.model.hidden_size)
    assert len(cfgs) == SWEEP_CELLS["scaling"]
    widths = [c.model.hidden_size for c in cfgs]
    assert widths == sorted(set(widths))
    spans = []  # per fitted size: the training compute of its first and last record (Gflops)
    for c in cfgs:
        assert c.model.name == f"w{c.model.hidden_size}" and c.data.name == "shapes"
        val = list(c.train.val_at_steps)
        assert val == sorted(set(val)) and val[-1] == c.train.steps and 100 <= val[0] <= 300
        assert list(c.eval.at_steps) == [c.train.steps // 2, c.train.steps]
        assert not cell.validate(c), cell.validate(c)
        per_step = FORWARD_BACKWARD_FACTOR * cell.cell_facts(c)["gflops"] * c.train.global_batch
        spans.append((per_step * val[0], per_step * val[-1]))
    fitted = spans[:-1]
    assert [hi for _, hi in fitted] == sorted(hi for _, hi in fitted)
    # the budgets the profiles read, by the profiles' own rule, from each fitted size's first and last record
    # (a curve's size only labels it here: images = compute / (3 size) puts its records at these budgets)
    curves = [(str(k), float(k), np.log(np.array(span) / (FORWARD_BACKWARD_FACTOR * k)), np.zeros(2))
              for k, span in enumerate(fitted, start=1)]
    crossing = [sum(a <= c <= b for a, b in fitted) for c in isoflop._default_budgets(curves)]
    assert min(crossing) >= 3 and min(crossing[1:-1]) >= 4, crossing


@pytest.mark.parametrize("name", SWEEPS)
def test_every_named_grid_plans(name, data_paths, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["harness.sweep", "-m", f"sweeps={name}", "plan=true", f"out_dir={out}",
            f"data.path={data_paths['latents256']}"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        sweep.main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    plan = capsys.readouterr().out
    rows = [ln for ln in plan.splitlines() if ln.startswith("DiT-")]
    assert rows and all(ln.rstrip().endswith("to run") for ln in rows), plan
    if SWEEP_CELLS.get(name):
        assert len(rows) == SWEEP_CELLS[name], plan
    assert not out.exists(), "plan=true creates nothing"


@pytest.mark.process
@pytest.mark.parametrize("cluster", _options("cluster"))
def test_the_slurm_launcher_with_each_cluster_preset_plans_from_the_command_line(cluster, tmp_path):
    """The command a SLURM user types, through the whole entry point (its check of the fixed overrides
    included): a cluster preset sets launcher keys that exist only once hydra/launcher=slurm is chosen."""
    out = tmp_path / "sweep"
    proc = run_module("harness.sweep", "-m", "sweeps=demo", "hydra/launcher=slurm", f"cluster={cluster}",
                      "plan=true", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(ln.startswith("DiT-") for ln in proc.stdout.splitlines()) == 6 and not out.exists()


# ---- identity ----

@pytest.mark.parametrize("overrides", list(GOLDEN_IDS), ids=lambda o: " ".join(o))
def test_cell_ids_of_existing_grids_never_change(overrides):
    assert cell.cell_id(compose(list(overrides))) == GOLDEN_IDS[overrides]


def test_first_release_fields_are_always_hashed():
    for section, names in FIRST_RELEASE_IDENTITY.items():
        schema = config.section_schema(section) if section else config.Config
        roles = {f.name: f.metadata.get(ROLE) for f in dataclasses.fields(schema)}
        assert {n for n in names if roles[n] != ALWAYS} == set(), section


def upgraded(cfg):
    """`cfg` as a harness with ConfigPlus's schema composes it: the new fields at their defaults."""
    return OmegaConf.merge(OmegaConf.structured(ConfigPlus), OmegaConf.to_container(cfg))


def test_a_new_defaulted_field_or_section_renames_no_cell(monkeypatch):
    before = {o: cell.cell_id(compose(list(o))) for o in GOLDEN_IDS}
    monkeypatch.setattr(config, "Config", ConfigPlus)  # the schema identity() reads
    after = {o: cell.cell_id(upgraded(compose(list(o)))) for o in GOLDEN_IDS}
    assert after == before == GOLDEN_IDS
    # ...while a value of the new field that changes what is trained is a new cell
    demo = ("sweeps=demo", "model=demo-S", "patch=2")
    changed = upgraded(compose(list(demo)))
    changed.train.warmup_steps = 100
    other = upgraded(compose(list(demo)))
    other.extra.knob = "on"
    ids = {cell.cell_id(changed), cell.cell_id(other), GOLDEN_IDS[demo]}
    assert len(ids) == 3


CHANGES_THE_CELL = ["train.lr=2e-4", "train.steps=100", "seed=1", "model.hidden_size=96", "objective=flow",
                    "model.parametrization=mup model.mup_base_width=32", "data.image_size=16",
                    "objective=flow objective.time_sampling=logit_normal", "train.global_batch=32", "cond=adaln"]
SAME_CELL = ["train.log_every=7", "train.ckpt_every=100", "eval.num_samples=100", "device=cpu", "train.compile=true",
             "model.mup_base_width=32", "objective.time_sampling=logit_normal", "resources.gpus_per_node=2",
             "train.num_workers=0", "lock_wait_s=5", "out_dir=/elsewhere", "sweep_name=other"]


def test_values_that_change_training_make_new_cells_and_the_others_do_not():
    base = ["sweeps=demo", "model=demo-S", "patch=2"]
    ids = {cell.cell_id(compose(base + c.split())) for c in CHANGES_THE_CELL}
    assert len(ids) == len(CHANGES_THE_CELL) and GOLDEN_IDS[tuple(base)] not in ids
    for c in SAME_CELL:  # bookkeeping, speed, where: and settings that have no effect on this cell (sp, ddpm)
        assert cell.cell_id(compose(base + c.split())) == GOLDEN_IDS[tuple(base)], c


def test_every_identity_value_is_in_the_hash(monkeypatch):
    """Property: changing any single always-hashed field of the demo cell changes its id."""
    base = compose(["sweeps=demo", "model=demo-S", "patch=2"])
    for section in ("model", "data", "train", ""):
        schema = config.section_schema(section) if section else config.Config
        for f in dataclasses.fields(schema):
            if f.metadata.get(ROLE) != ALWAYS:
                continue
            c = base.copy()
            node = c[section] if section else c
            value = node[f.name]
            node[f.name] = (not value) if isinstance(value, bool) else (value + 1 if isinstance(value, (int, float))
                                                                        else f"{value}x")
            assert cell.cell_id(c) != GOLDEN_IDS[("sweeps=demo", "model=demo-S", "patch=2")], (section, f.name)


def test_upgraded_schema_reads_an_old_run_folders_config(tmp_path, monkeypatch):
    """A run folder written before the new fields existed loads with them at their defaults, same id."""
    cfg = compose(["sweeps=demo", "model=demo-S", "patch=2", f"out_dir={tmp_path}"])
    run = cell.prepare_run_dir(cfg)
    monkeypatch.setattr(cell, "Config", ConfigPlus)  # the schema load_run_config reads onto
    monkeypatch.setattr(config, "Config", ConfigPlus)  # the schema identity() reads
    loaded = cell.load_run_config(run, [])
    assert loaded.train.warmup_steps == 0 and cell.cell_id(loaded) == run.name == GOLDEN_IDS[
        ("sweeps=demo", "model=demo-S", "patch=2")]


def test_compose_says_a_bad_override_in_one_line():
    with pytest.raises(config.BadInput, match=r"Could not find 'model/Q'; allowed: .*demo-S"):
        compose(["model=Q"])
    with pytest.raises(config.BadInput) as e:
        compose(["train.steps=many"])
    assert "\n" not in str(e.value) and "many" in str(e.value)


def test_conf_path_has_one_home():
    """Every module that needs conf/ takes it from harness.core.config (no module recomputes it)."""
    offenders = [p.name for p in (REPO_ROOT / "harness").rglob("*.py")
                 if p.name != "config.py" and ('parents[1] / "conf"' in p.read_text()
                                               or "Path(__file__).resolve().parents" in p.read_text())]
    assert offenders == []

