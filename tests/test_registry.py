"""Every sampler file registers its own stem (and may register variants, e.g. freedave_pp), every
registered sampler lives in a sampler file with a test file of the same stem; the harness config of every sampler is
built from its Config dataclass (the one home of its defaults), and presets under conf/sampler/ only
name other defaults of a registered sampler."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from asynclane.sampler import REGISTRY, Sampler, build_sampler
from eval.sampler_presets import sampler_names, sampler_node

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_DIRS = [ROOT / "src" / "baselines", ROOT / "src" / "asynclane" / "samplers"]
PRESET_DIR = ROOT / "conf" / "sampler"

import baselines  # noqa: E402,F401  (registers every competing sampler)


def _file_stems():
    return {p.stem for d in SAMPLER_DIRS for p in d.glob("*.py") if p.stem != "__init__"}


def _home(name):
    """The stem of the sampler file that registers ``name``."""
    return REGISTRY[name].__module__.rsplit(".", 1)[-1]


def test_registry_equals_sampler_files():
    assert {_home(n) for n in REGISTRY} == _file_stems() <= set(REGISTRY)
    assert set(REGISTRY) == set(sampler_names())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_sampler_has_a_test_file(name):
    stem = _home(name)
    candidates = [ROOT / "tests" / "baselines" / f"test_{stem}.py", ROOT / "tests" / "asynclane" / f"test_{stem}.py"]
    assert any(p.exists() for p in candidates), f"no test file for {name!r}: expected one of {candidates}"


def _composed(*overrides):
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_harness_config_is_the_dataclass(name):
    """``sampler=<name>`` composes to the name, the top-level gen_length and every other field's default."""
    conf = _composed(f"sampler={name}", "gen_length=96")
    options = dict(conf["sampler"])
    assert options.pop("name") == name and options["gen_length"] == 96
    cls = REGISTRY[name]
    assert cls.Config(**options) == cls.Config(gen_length=96)
    assert set(options) == {f.name for f in dataclasses.fields(cls.Config)}
    assert isinstance(build_sampler(name, **options), Sampler) and cls.name == name
    assert isinstance(cls.can_batch, bool)


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_named_presets_choose_a_registered_sampler_and_its_keys(path):
    raw = yaml.safe_load(path.read_text())
    assert raw.get("name") in REGISTRY, f"{path.name}: name must be a registered sampler"
    assert set(raw) - {"defaults"} <= set(sampler_node(raw["name"])), f"{path.name}: keys the sampler does not have"
    # a preset starts from its sampler's dataclass node and overrides what differs
    assert raw.get("defaults") == [raw["name"], "_self_"], f"{path.name}: defaults must be [{raw['name']}, _self_]"


def test_unknown_sampler_lists_valid_choices():
    with pytest.raises(ValueError, match=r"no_such_sampler.*valid choices: .*blockwise"):
        build_sampler("no_such_sampler")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"treshold.*valid options: .*block_length"):
        build_sampler("blockwise", treshold=0.9)
