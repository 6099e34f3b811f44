"""Hydra configs, installed as the package ``eval.conf`` (see pyproject.toml).

Importing it stores every registered sampler's config (group ``sampler``) from its Config dataclass
(:mod:`eval.sampler_presets`); ``conf/sampler/`` holds only named presets.
"""
from eval.sampler_presets import store_samplers

store_samplers()
