"""Per-call cost of the native backbones at real 8B shapes (random bf16 weights), on a GPU.

What it measures, at batch 1 (one request) on the project's own forward (``Backbone.forward``):

* ``full``: a cache-free bidirectional call over prompt + generation (LLaDA/Dream reference
  samplers pay this every step);
* ``cached``: a call whose queries are ``lanes`` blocks of ``block`` tokens, one row per lane,
  attending a shared batch-1 prefix cache of ``prompt + gen`` slots (Fast-dLLM with a dual cache
  carries one row; AsyncLane's lane batching carries one row per active lane in the same call).

It prints one JSON object per measurement (milliseconds, median of ``--iters`` timed calls after
``--warmup``) and writes them all to ``--out``.  ``scripts/benchmark.py --gpu-costs FILE`` turns
the ``cached`` rows into a projected GPU TPS for every sampler.  Random weights are fine: the
cost of a forward does not depend on the values.

    python scripts/gpu_forward_cost.py --out results/gpu_forward_cost.json
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

from asynclane.backbone import Backbone, BackboneSpec, ModelConfig, Transformer  # noqa: E402

SHAPES = {
    # research/backbones.md §1 (LLaDA-8B-Instruct config.json) and §2 (Dream-v0-Instruct-7B)
    "llada": ModelConfig(family="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                         mlp_hidden=12288, vocab_size=126464, rope_theta=500000.0, norm_eps=1e-5,
                         qkv_bias=False, max_length=4096),
    "dream": ModelConfig(family="dream", d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                         mlp_hidden=18944, vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6,
                         qkv_bias=True, max_length=4096),
}


def build(family: str, device: str) -> Backbone:
    cfg = SHAPES[family]
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Transformer(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    spec = BackboneSpec(name=f"{family}-8b-shape", family=family, mask_id=0, eos_ids=(1,), pad_id=1,
                        vocab_size=cfg.vocab_size, max_length=cfg.max_length)
    return Backbone(model, spec)


def timed(fn, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure(bb: Backbone, prompt: int, gens, block: int, lanes_list, warmup: int, iters: int):
    dev = bb.device
    V = bb.cfg.vocab_size
    for gen in gens:
        L = prompt + gen
        ids = torch.randint(2, V, (1, L), device=dev)
        ms = timed(lambda: bb.forward(ids), warmup, iters)
        yield {"mode": "full", "prompt": prompt, "gen": gen, "query_tokens": L, "lanes": 1, "ms": round(ms, 3)}
        cache = bb.new_cache(1, L)
        bb.forward(ids, cache=cache, write=True)  # fill every slot once (prompt + drafted answer)
        for lanes in (n for n in lanes_list if n * block <= gen):
            # lane i works on block i of the answer; one row per lane, all reading the shared cache
            starts = [prompt + i * block for i in range(lanes)]
            pos = torch.stack([torch.arange(s, s + block, device=dev) for s in starts])
            q = torch.randint(2, V, (lanes, block), device=dev)
            ms = timed(lambda: bb.forward(q, positions=pos, cache=cache), warmup, iters)
            yield {"mode": "cached", "prompt": prompt, "gen": gen, "query_tokens": lanes * block,
                   "lanes": lanes, "block": block, "ms": round(ms, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="llada,dream")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gens", default="256,512,1024")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--lanes", default="1,2,3,4")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_forward_cost.py needs a CUDA device (it times 8B-shape forwards)")
    rows = []
    for family in args.families.split(","):
        if family not in SHAPES:
            raise SystemExit(f"unknown family {family!r}; valid choices: {', '.join(SHAPES)}")
        t0 = time.time()
        bb = build(family, "cuda")
        meta = {"family": family, "params": bb.count_params(), "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "dtype": "bfloat16", "build_s": round(time.time() - t0, 1)}
        print(json.dumps(meta), flush=True)
        with torch.no_grad():
            for r in measure(bb, args.prompt, [int(g) for g in args.gens.split(",")], args.block,
                             [int(x) for x in args.lanes.split(",")], args.warmup, args.iters):
                r = {**meta, **r}
                rows.append(r)
                print(json.dumps(r), flush=True)
        del bb
        torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python scripts/gpu_forward_cost.py "
                                        + " ".join(argv if argv is not None else sys.argv[1:]),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
