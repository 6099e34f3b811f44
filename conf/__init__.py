"""Hydra configs, installed as the package ``eval.conf`` (see pyproject.toml)."""
