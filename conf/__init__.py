"""Hydra configs, installed as the package ``eval.conf`` (see pyproject.toml).

Importing it stores every registered sampler's config (group ``sampler``) from its Config dataclass
(:mod:`eval.sampler_presets`); ``conf/sampler/`` holds only named presets.  It also registers the
resolver ``${eval.gpu_count:}`` (:mod:`eval.launch`, the ``joblib`` launcher preset's worker count), and
quiets one Hydra note: conf/hydra/launcher/{joblib,submitit_slurm,submitit_local}.yaml carry the names of the
launcher plugins' own configs, so Hydra merges them onto the plugins' schemas (the launcher names
``hydra/launcher=NAME`` users know), which Hydra 1.3 calls "automatic schema matching" and notes as deprecated
on every run.  Here, not in ``eval.__main__``, because a joblib worker composes the config again and
imports this package but not the command.
"""
import warnings

from eval.launch import register_resolvers
from eval.sampler_presets import store_samplers

store_samplers()
register_resolvers()
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/(joblib|submitit_slurm|submitit_local)' is validated "
                        r"against ConfigStore schema with the same name", category=UserWarning)
