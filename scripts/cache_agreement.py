"""How far Fast-dLLM's approximate caches drift from exact decoding, and what they save.

    python scripts/cache_agreement.py                      # the embedded tiny model, arith prompts
    python scripts/cache_agreement.py --model DIR --n 50   # a checkpoint directory (or hub id)
    python scripts/cache_agreement.py --random             # tiny random LLaDA + Dream backbones (smoke)

For each prompt, runs ``fast_dllm`` one prompt per call (batch 1, as the reference) with
cache = none, prefix and dual (refreshed at each block start only, the reference's reuse), all
else equal, and compares each cached output with the no-cache output of the same settings:

* ``tok agree``: fraction of the ``gen_length`` positions with the same token;
* ``ans agree``: fraction of prompts whose answer (up to and including the first EOS-like
  token, :func:`asynclane.sampler.first_eos_cut`) is identical;
* ``NFE``: mean forwards per prompt, and its ratio to no cache (the commit trajectory can
  change, so cached runs need not take the same number of steps);
* ``tok-fwd``: mean token-forwards (sum of query lengths: the compute that caching saves), and
  its ratio to no cache.

On Dream-family models every mode commits each block's first token from the block-start
forward (``commit_first_after_refresh=true``), so the comparison isolates the cache; one more
row, ``none (rule off)``, shows what that rule alone changes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import baselines  # noqa: E402,F401  (registers fast_dllm)
from asynclane import TINY_DIR, load_backbone  # noqa: E402
from asynclane.counting import CountingBackbone  # noqa: E402
from asynclane.sampler import build_sampler, first_eos_cut  # noqa: E402
from asynclane.testing import random_backbone, random_prompts  # noqa: E402


def _prompts(bb, n: int, task: str, seed: int) -> list[list[int]]:
    if bb.tokenizer is None:  # random backbones: random ids of a few lengths
        return random_prompts(bb, lengths=[6 + (i * 5) % 11 for i in range(n)], seed=seed)
    from eval.tasks import build_task
    t = build_task(task)
    return [t.build_prompt(bb.tokenizer, ex) for ex in t.examples(limit=n, seed=seed)]


def _decode_all(bb, prompts, opts) -> tuple[list[torch.Tensor], float, float]:
    outs, nfe, tf = [], 0, 0
    for p in prompts:
        counting = CountingBackbone(bb)
        out = build_sampler("fast_dllm", **opts).generate(counting, [p], torch.Generator().manual_seed(0))
        outs.append(out.tokens[0].cpu())
        nfe, tf = nfe + counting.nfe, tf + counting.token_forwards
    return outs, nfe / len(prompts), tf / len(prompts)


def measure(bb, prompts, gen_length: int, block_length: int, threshold: float) -> list[tuple]:
    """Rows (mode, tok agree, ans agree, NFE, NFE ratio, token-forwards, ratio) against cache=none."""
    eos = bb.spec.eos_ids
    first = bb.spec.family == "dream"
    base = dict(gen_length=gen_length, block_length=block_length, threshold=threshold)
    modes = [("none", dict(cache="none", commit_first_after_refresh=first)),
             ("prefix", dict(cache="prefix", commit_first_after_refresh=first)),
             ("dual", dict(cache="dual", commit_first_after_refresh=first))]
    if first:
        modes.append(("none (rule off)", dict(cache="none", commit_first_after_refresh=False)))
    results = {name: _decode_all(bb, prompts, {**base, **opts}) for name, opts in modes}
    ref, ref_nfe, ref_tf = results["none"]
    rows = []
    for name, (outs, nfe, tf) in results.items():
        tok = sum(float((a == b).float().mean()) for a, b in zip(outs, ref)) / len(ref)
        ans = sum(first_eos_cut(a[None], eos) == first_eos_cut(b[None], eos) for a, b in zip(outs, ref)) / len(ref)
        rows.append((name, tok, ans, nfe, nfe / ref_nfe, tf, tf / ref_tf))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded tiny model)")
    ap.add_argument("--random", action="store_true", help="tiny random LLaDA and Dream backbones instead (smoke test)")
    ap.add_argument("--n", type=int, default=20, help="prompts per backbone")
    ap.add_argument("--task", default="arith", help="task whose prompts to use with a real model (default arith)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.random:
        backbones = [random_backbone("llada"), random_backbone("dream")]
        for bb in backbones:
            bb.model.to(args.device)
    else:
        backbones = [load_backbone(args.model or TINY_DIR, dtype=args.dtype, device=args.device)]
    print(f"fast_dllm, gen_length {args.gen_length}, block {args.block_length}, threshold {args.threshold}, "
          f"T = 0, batch 1, {args.n} prompts; agreement and ratios vs cache=none")
    head = ("backbone", "mode", "tok agree", "ans agree", "NFE", "NFE/none", "tok-fwd", "tok-fwd/none")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for bb in backbones:
        prompts = _prompts(bb, args.n, args.task, args.seed)
        for name, tok, ans, nfe, r_nfe, tf, r_tf in measure(bb, prompts, args.gen_length, args.block_length,
                                                           args.threshold):
            print(f"| {bb.spec.name} | {name} | {tok:.3f} | {ans:.3f} | {nfe:.1f} | {r_nfe:.2f} | {tf:.0f} | {r_tf:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
