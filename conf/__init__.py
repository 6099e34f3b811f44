"""Hydra configs, installed as the package ``eval.conf`` (see pyproject.toml).

Importing it stores every registered sampler's config (group ``sampler``) from its Config dataclass
(:mod:`eval.sampler_presets`); ``conf/sampler/`` holds only named presets.  It also registers the
resolver ``${eval.gpu_count:}`` (:mod:`eval.launch`, the ``parallel`` launcher preset's worker count).
"""
from eval.launch import register_resolvers
from eval.sampler_presets import store_samplers

store_samplers()
register_resolvers()
