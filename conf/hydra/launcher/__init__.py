"""Launcher presets for sweeps (`-m hydra/launcher=NAME`): parallel (joblib, one worker per local GPU),
slurm (submitit, a SLURM job array), slurm_local (submitit on this machine).  They extend the launcher
plugins' own configs; `pip install -e ".[cluster]"` installs the plugins (eval.launch)."""
