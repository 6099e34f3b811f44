"""Launcher presets for sweeps (`-m hydra/launcher=NAME`): joblib (one worker per local GPU),
submitit_slurm (a SLURM job array), submitit_local (submitit on this machine).  They extend the launcher
plugins' own configs; `pip install -e ".[cluster]"` installs the plugins (eval.launch)."""
