"""`python -m eval [key=value ...]`: evaluate one (model, sampler, task) configuration.

Configs live in the package ``eval.conf`` (the repository's conf/), so this works from any
directory.  Results go to Hydra's run directory (``hydra.run.dir=...`` to choose it); a rerun
into the same directory resumes.  Every expected error (a bad value or key, an unknown choice, a
missing or unreadable checkpoint, an unwritable output directory, an altered data file) prints
one ``error: ...`` line naming the problem and what is valid, and exits with status 2 (set
HYDRA_FULL_ERROR=1 for the traceback); anything else is a bug and prints its traceback.  A multirun
(``-m sampler=a,b gen_length=64,128``) writes one directory per job under the sweep directory,
named ``<task>/<model>-<sampler>-L<gen_length>-<job>``; ``python -m eval.report DIR`` turns any
set of run or sweep directories into tables and plots.

``torchrun --nproc_per_node N -m eval [key=value ...]`` runs the same evaluation data parallel: N
processes, one model copy each, the batches shared out by rank, one merged ``samples.jsonl`` and
``summary.json`` (:mod:`eval.distributed`, the runner's docstring); rank 0 prints the summary.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .cli import one_line_errors, run_cli


@hydra.main(config_path="pkg://eval.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with one_line_errors():
        from .distributed import env_world, label_logs

        world = env_world()
        label_logs(world)  # torchrun: "[rank k/N]" on each log line; the console keeps rank 0's
        from .runner import run  # imported here: Hydra's own errors answer before the runner loads

        s = run(cfg, out_dir)
    if not world.leader:
        return

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    dp = s.get("data_parallel")  # torchrun: the TPS line is per process; this one is the whole job's
    job = (f"  TPS, all ranks {fmt(dp['tps_wall'], '.1f')}  ({dp['world_size']} processes: this run's tokens / "
           f"the slowest process's generation seconds)\n" if dp else "")
    print(f"{s['model']} / {s['sampler']} / {s['task']} ({s['task_version']}), gen_length "
          f"{s['config']['gen_length']}, {s['n']} examples on {s['device_name']} ({s['dtype']})\n"
          f"  accuracy       {fmt(s['accuracy'], '.3f')}\n"
          f"  NFE/sample     {fmt(s.get('nfe_mean'), '.1f')}\n"
          f"  tokens/forward {fmt(s.get('tokens_per_nfe'), '.2f')}\n"
          f"  TPS            {fmt(s.get('tps'), '.1f')}  {tps_note(s)}\n"
          f"{job}"
          f"  results        {out_dir}")


def tps_note(s: dict) -> str:
    """What the TPS line needs said: the convention and thread count, or why there is no number."""
    if s.get("tps") is None:
        if s.get("n") and not s.get("n_timed"):
            return (f"(every row is a warm-up row: the first warmup={s['config'].get('warmup')} example(s) of "
                    f"a process are not timed; raise limit or set warmup=0)")
        return ""
    threads = f", {s['threads']} CPU thread(s)" if s.get("threads") else ""
    note = f"(to first EOS{threads}; budget convention {s['tps_budget']:.1f})"
    if s.get("tps_by_threads"):  # a resume with another thread count: not blended
        note += "; by threads: " + ", ".join(f"{k}: {'n/a' if v is None else format(v, '.1f')}"
                                             for k, v in s["tps_by_threads"].items())
    return note


if __name__ == "__main__":
    run_cli(main)
