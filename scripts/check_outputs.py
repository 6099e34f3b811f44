"""Token-identity check: every registered sampler (and its cache variants) on the embedded model.

Runs each sampler setting below on the first ``--n`` examples of the synthetic tasks at two
generation lengths (fp32, CPU, batch 1 and one padded batch of 4 for the samplers that batch)
and writes, per setting, the generated token ids and the NFE.  Run it on two commits and compare:

    python scripts/check_outputs.py --out /tmp/new.json
    python scripts/check_outputs.py --compare /tmp/old.json /tmp/new.json

The static decode step (backbone.py) must leave every sequence and every NFE unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SETTINGS = [  # (sampler, options): the cache modes and switches; any other registered sampler runs its defaults
    ("blockwise", {}),
    ("dream", {}),
    ("dparallel", {}),
    ("fast_dllm", {"cache": "none"}),
    ("fast_dllm", {"cache": "prefix"}),
    ("fast_dllm", {"cache": "dual"}),
    ("fast_dllm", {"cache": "prefix", "refresh_every": 2}),
    ("d3llm", {"cache": "none"}),
    ("d3llm", {"cache": "delayed"}),
    ("asynclane", {}),
    ("asynclane", {"cache": "none"}),
    ("asynclane", {"cache": "dual"}),
    ("asynclane", {"lane_batching": False}),
    ("asynclane", {"speculate": False}),
    ("asynclane", {"speculate": False, "cache": "dual"}),
    ("asynclane", {"speculate": False, "compact_refresh": False}),
]


def random_dream_prompts(bb, n):
    from asynclane.testing import random_prompts
    return random_prompts(bb, lengths=[6 + (i * 5) % 11 for i in range(n)], seed=0)


def run(n: int, lengths, tasks) -> dict:
    import baselines  # noqa: F401  (registers the competing samplers)
    from asynclane import build_sampler, load_backbone
    from asynclane.sampler import REGISTRY
    from eval.tasks import build_task

    torch.set_num_threads(1)
    listed = {s for s, _ in SETTINGS}
    settings = SETTINGS + [(name, {}) for name in sorted(REGISTRY) if name not in listed]  # new ones: defaults
    from asynclane.testing import random_backbone

    tiny = load_backbone(dtype="fp32", device="cpu")
    out = {}
    for task_name in tasks:
        if task_name == "random-dream":  # the Dream family (shifted logits) on a random tiny backbone
            bb = random_backbone("dream", seed=0)
            prompts = random_dream_prompts(bb, n)
        else:
            bb = tiny
            task = build_task(task_name)
            prompts = [task.build_prompt(bb.tokenizer, ex) for ex in task.examples(limit=n)]
        for L in lengths:
            for name, opts in settings:
                sampler = build_sampler(name, gen_length=L, **opts)
                key = f"{task_name}|L{L}|{name}|{json.dumps(opts, sort_keys=True)}"
                rows, t0 = [], time.perf_counter()
                from asynclane.counting import CountingBackbone
                batches = [[p] for p in prompts]
                if getattr(sampler, "can_batch", False):
                    batches.append(prompts[:4])  # one left-padded batch
                for batch in batches:
                    cb = CountingBackbone(bb)
                    g = sampler.generate(cb, batch, torch.Generator().manual_seed(0))
                    rows.append({"seqs": g.sequences.tolist(), "nfe": cb.nfe})
                out[key] = rows
                print(f"{key:70s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"MISSING {key}")
            bad += 1
            continue
        diff = [i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y]
        tok = [i for i in diff if a[key][i]["seqs"] != b[key][i]["seqs"]]
        if diff:
            bad += 1
            print(f"DIFF {key}: {len(diff)} of {len(a[key])} calls differ ({len(tok)} in tokens)")
    print(f"{len(set(a) | set(b)) - bad} settings identical, {bad} differ")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--lengths", default="64,128")
    ap.add_argument("--tasks", default="arith,listops,random-dream")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    a = ap.parse_args(argv)
    if a.compare:
        raise SystemExit(1 if compare(*(json.loads(p.read_text()) for p in a.compare)) else 0)
    res = run(a.n, [int(x) for x in a.lengths.split(",")], a.tasks.split(","))
    if a.out:
        a.out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
