"""Every registered sampler as a Hydra config in the group ``sampler``, built from its Config dataclass.

The dataclass is the one home of a sampler's defaults: :func:`store_samplers` (run when the config
package ``eval.conf`` is imported, before Hydra composes) puts ``{name, gen_length: ${gen_length},
<every other field>: <its default>}`` into Hydra's ConfigStore for each registered sampler, so
``python -m eval sampler=X sampler.key=value`` and ``--cfg job`` work without a YAML.  A YAML under
``conf/sampler/`` is only for a named preset (other defaults under another name).
"""
from __future__ import annotations

import dataclasses


def sampler_node(name: str) -> dict:
    """The config of sampler ``name`` as Hydra composes it: its name, the top-level gen_length, defaults."""
    from asynclane.sampler import REGISTRY

    sampler_names()  # registers every sampler (whatever the caller imported first)

    node = {"name": name, "gen_length": "${gen_length}"}
    for f in dataclasses.fields(REGISTRY[name].Config):
        if f.name == "gen_length":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        node[f.name] = list(default) if isinstance(default, tuple) else default
    return node


def sampler_names() -> list[str]:
    """Every registered sampler (the core library's and the competing ones)."""
    import asynclane  # noqa: F401  (registers the core samplers)
    import baselines  # noqa: F401  (registers every competing sampler)
    from asynclane.sampler import REGISTRY

    return sorted(REGISTRY)


def store_samplers() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name in sampler_names():
        cs.store(group="sampler", name=name, node=sampler_node(name))
