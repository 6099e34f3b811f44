"""`python -m eval [key=value ...]`: evaluate one (model, sampler, task) configuration.

Configs live in the package ``eval.conf`` (the repository's conf/), so this works from any
directory.  Results go to Hydra's run directory (``hydra.run.dir=...`` to choose it); a rerun
into the same directory resumes.  Bad configuration values and missing checkpoints print one
error line and exit with status 2 (set HYDRA_FULL_ERROR=1 for the traceback).  A multirun
(``-m sampler=a,b gen_length=64,128``) writes one directory per job under the sweep directory,
named ``<task>/<model>-<sampler>-L<gen_length>-<job>``; ``python -m eval.report DIR`` turns any
set of run or sweep directories into tables and plots.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="pkg://eval.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # imported here so that --help and config errors answer before torch is imported
    from asynclane import CheckpointNotFound

    from .runner import UsageError, run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        s = run(cfg, out_dir)
    except (UsageError, CheckpointNotFound) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = f"model={cfg.model.name}: " if isinstance(e, CheckpointNotFound) else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(2)

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    print(f"{s['model']} / {s['sampler']} / {s['task']} ({s['task_version']}), gen_length "
          f"{s['config']['gen_length']}, {s['n']} examples on {s['device_name']} ({s['dtype']})\n"
          f"  accuracy       {fmt(s['accuracy'], '.3f')}\n"
          f"  NFE/sample     {fmt(s.get('nfe_mean'), '.1f')}\n"
          f"  tokens/forward {fmt(s.get('tokens_per_nfe'), '.2f')}\n"
          f"  TPS            {fmt(s.get('tps'), '.1f')}  (to first EOS; budget convention "
          f"{fmt(s.get('tps_budget'), '.1f')})\n"
          f"  results        {out_dir}")


if __name__ == "__main__":
    main()
