"""Config: presets, overrides, and one-line errors with exit code 2 for every class of bad value."""
import pytest
import yaml

from rcsr_ray.cli import main
from rcsr_ray.config import ConfigError, dump_yaml, load_config


def test_defaults_are_preset_s4():
    cfg = load_config()
    assert cfg.preset == "S4"
    assert (cfg.partition.alpha, cfg.partition.missing_rate, cfg.fed.participation) == (0.1, 0.5, 0.5)
    assert cfg.partition.num_clients == 20 and cfg.runtime.backend == "ray" and cfg.fed.method == "rcsr"


@pytest.mark.parametrize("preset,alpha,missing,part", [
    ("S1", None, 0.0, 1.0), ("S2", 0.5, 0.0, 1.0), ("S3", 0.1, 0.0, 1.0), ("S4", 0.1, 0.5, 0.5)])
def test_presets(preset, alpha, missing, part):
    cfg = load_config(preset=preset)
    assert (cfg.partition.alpha, cfg.partition.missing_rate, cfg.fed.participation) == (alpha, missing, part)


def test_explicit_keys_override_preset_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"preset": "S1", "partition": {"num_clients": 7, "alpha": 2.0}, "fed": {"rounds": 4}}))
    cfg = load_config(f, ["fed.rounds=9", "partition.missing_rate=0.25"])
    assert cfg.preset == "S1"
    assert cfg.partition.alpha == 2.0  # the YAML key beats the preset's IID
    assert cfg.partition.num_clients == 7 and cfg.fed.rounds == 9 and cfg.partition.missing_rate == 0.25
    assert cfg.fed.participation == 1.0  # from S1


def test_override_values_are_typed():
    cfg = load_config(overrides=["partition.alpha=null", "train.lr=3e-4", "partition.num_clients=8"])
    assert cfg.partition.alpha is None and cfg.train.lr == pytest.approx(3e-4) and cfg.partition.num_clients == 8


@pytest.mark.parametrize("override,key", [
    ("partition.alpha=-1", "partition.alpha"),
    ("partition.missing_rate=1.5", "partition.missing_rate"),
    ("fed.method=fedmagic", "fed.method"),
    ("fed.nonsense=3", "fed.nonsense"),
    ("partition.num_clients=abc", "partition.num_clients"),
    ("fed.participation=0", "fed.participation"),
    ("seed=-1", "seed"),  # numpy's generators take no negative seed: stopped here, not in a traceback
    ("data.synthetic.seed=-5", "data.synthetic.seed"),
    ("train.lr=inf", "train.lr"),
    ("fed=3", "fed"),  # a section: the line says so
])
def test_bad_values_one_line_error_exit_2(override, key, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert info.value.key == key
    code = main(["run", "--quiet", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "Traceback" not in err[0]
    # The line names the key, the value given and what is allowed (ConfigError's own text).
    e = info.value
    assert err[0].endswith(f"{key}={e.value!r}: {e.allowed}")
    assert override.split("=", 1)[1] in str(e.value) and len(e.allowed) > 5


def test_bad_preset_and_missing_file(tmp_path, capsys):
    assert main(["config", "--preset", "S9"]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_preset_named_on_the_command_line_beats_the_files_keys(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_config(overrides=["partition.num_clients=7"])))  # S4, every key written
    cfg = load_config(saved, ["partition.missing_rate=0.25"], preset="S1")
    assert cfg.preset == "S1" and cfg.partition.alpha is None and cfg.fed.participation == 1.0
    assert cfg.partition.missing_rate == 0.25  # a key=value override beats the preset
    assert cfg.partition.num_clients == 7  # the file's other keys stay
    assert load_config(saved).preset == "S4" and load_config(saved).partition.alpha == 0.1
    by_key = load_config(saved, ["preset=S1", "partition.missing_rate=0.25"])  # preset= names it as --preset
    assert by_key == cfg


def test_a_section_given_a_value_is_named_as_one():
    with pytest.raises(ConfigError, match=r"fed=3: a section, not a key: set the keys in it, e\.g\. fed\.\w+=\.\.\."):
        load_config(overrides=["fed=3"])
