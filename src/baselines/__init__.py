"""Competing samplers, one file each; importing the package imports (and so registers) every module in it."""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
