"""Registry key == sampler file stem == conf/sampler YAML stem == test file (1:1:1:1)."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from asynclane.sampler import REGISTRY, Sampler, build_sampler

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_DIRS = [ROOT / "src" / "baselines", ROOT / "src" / "asynclane" / "samplers"]
YAML_DIR = ROOT / "conf" / "sampler"

import baselines  # noqa: E402,F401  (registers every competing sampler)


def _file_stems():
    return {p.stem for d in SAMPLER_DIRS for p in d.glob("*.py") if p.stem != "__init__"}


def _yaml_stems():
    return {p.stem for p in YAML_DIR.glob("*.yaml")}


def test_registry_equals_sampler_files():
    assert set(REGISTRY) == _file_stems()


def test_registry_equals_yaml_files():
    assert set(REGISTRY) == _yaml_stems()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_sampler_has_a_test_file(name):
    candidates = [ROOT / "tests" / "baselines" / f"test_{name}.py", ROOT / "tests" / "asynclane" / f"test_{name}.py"]
    assert any(p.exists() for p in candidates), f"no test file for {name!r}: expected one of {candidates}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_class_follows_the_protocol(name):
    cls = REGISTRY[name]
    assert cls.name == name and isinstance(cls.can_batch, bool)
    assert isinstance(build_sampler(name, **_yaml_options(name)), Sampler)


def _yaml_options(stem):
    """The YAML's options with interpolations resolved against the top-level conf/config.yaml."""
    top = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    raw = yaml.safe_load((YAML_DIR / f"{stem}.yaml").read_text())
    resolved = OmegaConf.to_container(OmegaConf.create({"gen_length": top["gen_length"], "sampler": raw}),
                                      resolve=True)["sampler"]
    resolved.pop("name")
    return resolved


@pytest.mark.parametrize("stem", sorted(_yaml_stems()))
def test_yaml_name_and_keys_mirror_the_config(stem):
    raw = yaml.safe_load((YAML_DIR / f"{stem}.yaml").read_text())
    assert raw.get("name") == stem
    assert stem in REGISTRY, f"conf/sampler/{stem}.yaml has no registered sampler"
    fields = {f.name for f in dataclasses.fields(REGISTRY[stem].Config)}
    assert set(raw) - {"name"} == fields
    assert raw["gen_length"] == "${gen_length}", "gen_length must follow the top-level override"
    cfg = REGISTRY[stem].Config(**_yaml_options(stem))
    defaults = REGISTRY[stem].Config(gen_length=cfg.gen_length)
    assert cfg == defaults, "YAML values should mirror the dataclass defaults"


def test_unknown_sampler_lists_valid_choices():
    with pytest.raises(ValueError, match=r"no_such_sampler.*valid choices: .*blockwise"):
        build_sampler("no_such_sampler")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"treshold.*valid options: .*block_length"):
        build_sampler("blockwise", treshold=0.9)
