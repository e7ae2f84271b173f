"""Config tree: presets, dotted overrides, validation messages, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from comic.config import (
    EXECUTION_KEYS,
    METHOD_KEYS,
    RESUME_KEYS,
    Config,
    ConfigError,
    absolute_paths,
    apply_overrides,
    field_specs,
    from_dict,
    identity,
    identity_hash,
    load_config,
    to_dict,
    to_flat_dict,
)
from comic.presets import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_and_round_trip(preset):
    cfg = load_config(preset)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(to_flat_dict(cfg)) == cfg
    expected = "voc" if preset.startswith("voc2007-dev") else preset
    assert cfg.data.benchmark == expected


def test_overrides_from_strings_and_mappings_agree():
    a = load_config("synthetic", ["rlc.tau=0.8", "model.attention=false", "train.epochs=3", "loss.baseline.gamma=2"])
    b = load_config("synthetic", {"rlc.tau": 0.8, "model.attention": False, "train.epochs": 3,
                                  "loss.baseline.gamma": 2})
    assert a == b
    assert (a.rlc.tau, a.model.attention, a.train.epochs, a.loss.baseline) == (0.8, False, 3, {"gamma": 2})
    assert load_config("synthetic", ["optim.lr_trunk=1e-3"]).optim.lr_trunk == 1e-3  # YAML 1.1 reads this as str


def test_preset_values_apply_and_overrides_win():
    voc, coco = load_config("plt-voc"), load_config("plt-coco", ["data.pareto_b=7"])
    assert (voc.data.max_count, voc.data.pareto_b, voc.optim.step_head, voc.optim.step_tail) == (1400, 12.0, 12, 24)
    assert (coco.optim.step_head, coco.optim.step_tail, coco.data.pareto_b) == (24, 12, 7.0)


@pytest.mark.parametrize("override, message", [
    ("rlc.tau=1.5", "rlc.tau=1.5: must be in (0, 1)"),
    ("rlc.tau=0", "rlc.tau=0.0: must be in (0, 1)"),
    ("data.missing_rate=1.0", "data.missing_rate=1.0: must be in [0, 1)"),
    ("train.epochs=2.5", "train.epochs=2.5: must be an integer"),
    ("model.attention=maybe", "model.attention='maybe': must be true or false"),
    ("data.max_count=0", "data.max_count=0: must be in [1, inf]"),
])
def test_bad_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert str(err.value) == message


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'rlc.tua'; did you mean 'rlc.tau'\?"):
        load_config("synthetic", ["rlc.tua=0.3"])
    with pytest.raises(ConfigError, match="unknown config key 'htb.alfa'.*htb.alpha"):
        apply_overrides(Config(), {"htb.alfa": 1.0})


def test_cross_field_rule_and_malformed_override():
    with pytest.raises(ConfigError, match="data.max_count=3: must be >= data.min_count=5"):
        load_config("synthetic", ["data.min_count=5", "data.max_count=3"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("synthetic", ["rlc.tau"])
    with pytest.raises(ConfigError, match="unknown preset 'voc'; valid presets: plt-coco, plt-voc, synthetic"):
        load_config("voc")


def test_yaml_file_layer(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rlc:\n  tau: 0.9\nmethod: bce\nloss:\n  baseline: {gamma_neg: 4}\n")
    cfg = load_config("plt-voc", ["rlc.tau=0.6"], path=str(path))
    assert (cfg.method, cfg.rlc.tau, cfg.loss.baseline) == ("bce", 0.6, {"gamma_neg": 4})
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config("synthetic", path=str(tmp_path / "bad.yaml"))


def test_identity_is_what_a_run_computes():
    cfg = load_config()
    assert set(EXECUTION_KEYS + RESUME_KEYS + tuple(METHOD_KEYS)) <= set(field_specs())  # no typo hides a key
    assert identity_hash(cfg) == identity_hash(load_config())
    how = ["data.num_workers=4", "data.cache_dir=/elsewhere", "data.root=/data", "train.log_interval=3",
           "engine.threads=1", "engine.progress=false", "engine.device=cpu"]
    assert identity_hash(load_config("synthetic", how)) == identity_hash(cfg)
    for what in (["seed=1"], ["rlc.tau=0.8"], ["data.missing_rate=0.3"], ["train.epochs=5"], ["engine.amp=bf16"]):
        assert identity_hash(load_config("synthetic", what)) != identity_hash(cfg), what
    longer = load_config("synthetic", ["train.epochs=50", "engine.amp=bf16"])
    assert identity_hash(longer, resumable=True) == identity_hash(cfg, resumable=True)  # a resume may extend it
    assert "train.epochs" in identity(cfg) and "train.epochs" not in identity(cfg, resumable=True)
    assert identity_hash(cfg, dataset="a") != identity_hash(cfg, dataset="b")


def test_a_key_only_ml_gcn_reads_leaves_other_methods_cells_alone():
    vectors = ["model.label_embeddings=/data/glove.npy"]
    for method in ("comic", "bce"):
        plain = load_config("synthetic", [f"method={method}"])
        assert identity_hash(load_config("synthetic", [f"method={method}", *vectors])) == identity_hash(plain)
    gcn = load_config("synthetic", ["method=ml-gcn"])
    assert identity_hash(load_config("synthetic", ["method=ml-gcn", *vectors])) != identity_hash(gcn)
    read = identity(load_config("synthetic", ["method=ml-gcn", *vectors]))
    assert read["model.label_embeddings"] == "/data/glove.npy"


def test_paths_are_made_absolute_for_runs_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config("synthetic", ["data.root=voc", "model.label_embeddings=~/glove.npy"]))
    assert cfg.data.root == str(tmp_path / "voc") and Path(cfg.data.cache_dir).is_absolute()
    assert cfg.model.label_embeddings == str(Path.home() / "glove.npy")
    assert absolute_paths(load_config("synthetic")).model.label_embeddings == "random"  # not a path


def test_every_leaf_has_help_text():
    missing = [key for key, spec in field_specs().items() if not spec.metadata.get("help")]
    assert missing == []
