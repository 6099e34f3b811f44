"""Competing samplers, one file each; importing the package registers them all."""
from . import blockwise  # noqa: F401  (importing registers the sampler)
from . import d3llm  # noqa: F401
from . import dparallel  # noqa: F401
from . import dream  # noqa: F401
from . import fast_dllm  # noqa: F401
