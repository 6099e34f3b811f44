"""Per-call cost of the backbone's model calls: latency, kernels, syncs, and the memory floor.

For each family shape, prompt length and generation length it builds a buffer of prompt + gen
tokens, fills a cache once, and times (median of ``--iters`` calls after ``--warmup``):

* ``full``: a cache-free call over the whole buffer (the reference samplers' every step);
* ``prefix``: a prefix-cache block step, the block and everything after it (Fast-dLLM prefix);
* ``dual``: a dual-cache block step, the block only (Fast-dLLM dual);
* ``subset``: ``block`` scattered columns (AsyncLane's one-row dual call);
* ``lanes=k``: k differing rows, each from the first answer column to the buffer's end, on a lane
  cache (AsyncLane's speculative call), k in ``--lanes``.

Each row also records the kernels (aten ops that compute; views excluded) and host-device syncs
of one call, counted with a dispatch mode (:class:`asynclane.counting.OpCounter`), and the call's
ratio to the *memory floor*: weight bytes / the device's measured copy bandwidth (a batch-1 call
must read every weight once).  ``--compile`` adds the same calls under ``torch.compile``
(``Backbone.compile``, mode reduce-overhead); ``--baseline SRC`` times an older commit's backbone
(its ``src`` directory, e.g. a ``git worktree``) on the same calls, interleaved call by call.

    python scripts/bench_forward.py --shape llada-8b,dream-7b --compile --out results/bench_forward/h100.json
    python scripts/bench_forward.py --shape llada-tiny32 --device cpu --dtype bf16 --baseline /tmp/old/src

``scripts/benchmark.py --gpu-costs FILE`` fits its projected GPU TPS to the rows of FILE.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from asynclane.backbone import Backbone, BackboneSpec, ModelConfig, Transformer  # noqa: E402
from asynclane.checkpoint import native_views  # noqa: E402
from asynclane.counting import OpCounter  # noqa: E402

SHAPES = {
    # docs/research/backbones.md §1 (LLaDA-8B-Instruct config.json) and §2 (Dream-v0-Instruct-7B)
    "llada-8b": ModelConfig(family="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                            mlp_hidden=12288, vocab_size=126464, rope_theta=500000.0, norm_eps=1e-5,
                            qkv_bias=False, max_length=4096),
    "dream-7b": ModelConfig(family="dream", d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                            mlp_hidden=18944, vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6,
                            qkv_bias=True, max_length=4096),
    # LLaDA's 32 layers at a tiny width: compute is negligible, the host work per call shows
    "llada-tiny32": ModelConfig(family="llada", d_model=64, n_layers=32, n_heads=4, n_kv_heads=4,
                                mlp_hidden=128, vocab_size=512, rope_theta=500000.0, norm_eps=1e-5,
                                qkv_bias=False, max_length=4096),
    "dream-tiny28": ModelConfig(family="dream", d_model=64, n_layers=28, n_heads=4, n_kv_heads=2,
                                mlp_hidden=128, vocab_size=512, rope_theta=1000000.0, norm_eps=1e-6,
                                qkv_bias=True, max_length=4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> Backbone:
    cfg = SHAPES[shape]
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Transformer(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # random weights of a sane scale (the cost does not depend on the values)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=g)
    spec = BackboneSpec(name=shape, family=cfg.family, mask_id=0, eos_ids=(1,), pad_id=1,
                        vocab_size=cfg.vocab_size, max_length=cfg.max_length)
    return Backbone(model, spec)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted once: a read of the weights)."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    # a copy reads nbytes and writes nbytes: 2 * nbytes of traffic
    return 2 * nbytes / min(times)


def timed(fns: dict, device, warmup: int, iters: int) -> dict:
    """Median ms of each callable, calls interleaved round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def counted(fn) -> tuple[int, int]:
    with OpCounter() as c:
        fn()
    return c.kernels, c.syncs


def load_baseline(src: Path):
    """An older commit's ``asynclane.backbone`` (from its ``src`` directory), imported apart."""
    path = Path(src) / "asynclane" / "backbone.py"
    spec = importlib.util.spec_from_file_location("_baseline_backbone", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def baseline_twin(mod, bb: Backbone):
    """The baseline module's backbone holding ``bb``'s weights (unfused names: native_views)."""
    cfg = mod.ModelConfig(**{k: getattr(bb.cfg, k) for k in bb.cfg.__dataclass_fields__})
    with torch.device("meta"):
        model = mod.Transformer(cfg)
    model = model.to(dtype=bb.dtype).to_empty(device=bb.device)
    ours = native_views(bb.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ours[name])
    spec = mod.BackboneSpec(**{k: getattr(bb.spec, k) for k in bb.spec.__dataclass_fields__})
    return mod.Backbone(model.eval(), spec)


def calls(bb: Backbone, prompt: int, gen: int, block: int, lanes_list, old=None) -> dict:
    """{name: (new_fn, old_fn or None, query_tokens, rows)} for one buffer of prompt + gen tokens."""
    dev, V, S = bb.device, bb.cfg.vocab_size, prompt + gen
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(2, V, (1, S), generator=g).to(dev)
    lo = prompt + (gen // 2 // block) * block  # a block in the middle of the answer
    cache = bb.new_cache(1, S)
    bb.step(x, cache, (0, S))
    subset = sorted(range(prompt, S, max(1, gen // block)))[:block]
    out = {
        "full": (lambda: bb.forward(x), S, 1),
        "prefix": (lambda: bb.step(x, cache, (lo, S), predict=(lo, lo + block)), S - lo, 1),
        "dual": (lambda: bb.step(x, cache, (lo, lo + block)), block, 1),
        "subset": (lambda: bb.step(x, cache, subset), len(subset), 1),
    }
    for k in lanes_list:
        lc = bb.new_cache(1, S, lanes=k)
        bb.step(x, lc, (0, S))
        rows = x.expand(k, -1).clone()
        rows[1:, prompt:] = torch.randint(2, V, (k - 1, gen), generator=g).to(dev)
        out[f"lanes={k}"] = ((lambda r=rows, c=lc: bb.step(r, c, (prompt, S), predict=(prompt, prompt + block))),
                             k * gen, k)
    ofns = {}
    if old is not None:
        oc = old.new_cache(1, S)
        old.forward(x, cache=oc, write=True)
        ar = torch.arange(S, device=dev)[None]
        ofns.update({
            "full": lambda: old.forward(x),
            "prefix": lambda: old.forward(x[:, lo:], positions=ar[:, lo:], cache=oc,
                                          predict=torch.arange(block, device=dev)[None]),
            "dual": lambda: old.forward(x[:, lo:lo + block], positions=ar[:, lo:lo + block], cache=oc, write=True),
            "subset": lambda: old.forward(x[:, subset], positions=ar[:, subset], cache=oc),
        })
        for k in lanes_list:
            rows = x.expand(k, -1).clone()
            pos = ar[:, prompt:].expand(k, -1)
            ofns[f"lanes={k}"] = (lambda r=rows, p=pos, kk=k: old.forward(
                r[:, prompt:], positions=p, cache=oc, write=kk == 1, write_row=None if kk == 1 else 0,
                predict=torch.arange(block, device=dev)[None].expand(kk, -1)))
    return {name: (fn, ofns.get(name), q, r) for name, (fn, q, r) in out.items()}


def run(shapes, device, dtype, prompts, gens, block, lanes_list, warmup, iters, compile_too, baseline):
    device = torch.device(device)
    rows = []
    old_mod = load_baseline(baseline) if baseline else None
    for shape in shapes:
        t0 = time.time()
        bb = build(shape, str(device), dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in bb.model.parameters())
        bw = copy_bandwidth(device, min(1 << 30, max(64 << 20, weight_bytes)))
        floor_ms = weight_bytes / bw * 1e3
        old = baseline_twin(old_mod, bb) if old_mod else None
        meta = {"shape": shape, "family": bb.cfg.family, "layers": bb.cfg.n_layers, "params": bb.count_params(),
                "weight_bytes": weight_bytes, "copy_GBps": round(bw / 1e9, 2), "floor_ms": round(floor_ms, 4),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "dtype": str(dtype).replace("torch.", ""), "build_s": round(time.time() - t0, 1)}
        print(json.dumps(meta), flush=True)
        variants = [("eager", None)] + ([("compiled", "compile")] if compile_too else [])
        for label, how in variants:
            if how:
                torch._dynamo.reset()
                bb.compile()
            for prompt in prompts:
                for gen in gens:
                    if prompt + gen > bb.cfg.max_length:
                        continue
                    with torch.no_grad():
                        cs = calls(bb, prompt, gen, block, lanes_list, old if label == "eager" else None)
                        fns = {n: f for n, (f, _, _, _) in cs.items()}
                        fns.update({f"{n}@baseline": o for n, (_, o, _, _) in cs.items() if o is not None})
                        ms = timed(fns, device, warmup, iters)
                        for name, (fn, ofn, q, nrows) in cs.items():
                            # a dispatch mode sees the eager ops; under it a compiled call does not replay its
                            # graph, so compiled rows carry no op counts
                            kernels, syncs = counted(fn) if label == "eager" else (None, None)
                            r = {**meta, "variant": label, "mode": name, "prompt": prompt, "gen": gen, "rows": nrows,
                                 "query_tokens": q, "ms": round(ms[name], 4), "x_floor": round(ms[name] / floor_ms, 3),
                                 "kernels": kernels,
                                 "kernels_per_layer": None if kernels is None else round(kernels / bb.cfg.n_layers, 2),
                                 "syncs": syncs, "compiled": label == "compiled"}
                            if ofn is not None:
                                ok, osy = counted(ofn)
                                r.update(baseline_ms=round(ms[f"{name}@baseline"], 4),
                                         ratio_to_baseline=round(ms[name] / ms[f"{name}@baseline"], 3),
                                         baseline_kernels_per_layer=round(ok / bb.cfg.n_layers, 2),
                                         baseline_syncs=osy)
                            rows.append(r)
                            print(json.dumps({k: v for k, v in r.items() if k not in meta}), flush=True)
            bb.uncompile()
        del bb, old
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["shape"], r["variant"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (shape, variant) in zip(axes[0], keys):
        sel = [r for r in rows if r["shape"] == shape and r["variant"] == variant]
        modes = list(dict.fromkeys(r["mode"] for r in sel))
        for (p, gn) in sorted({(r["prompt"], r["gen"]) for r in sel}):
            ys = [next(r["x_floor"] for r in sel if r["mode"] == m and r["prompt"] == p and r["gen"] == gn)
                  for m in modes]
            line, = ax.plot(modes, ys, marker="o", label=f"prompt {p}, gen {gn}")
            base = [next((r["baseline_ms"] / r["floor_ms"] for r in sel if r["mode"] == m and r["prompt"] == p
                          and r["gen"] == gn and "baseline_ms" in r), None) for m in modes]
            if any(b is not None for b in base):  # the older commit, same calls, dashed
                ax.plot(modes, base, marker="x", ls="--", color=line.get_color(), lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        dashed = " (dashed: --baseline)" if any("baseline_ms" in r for r in sel) else ""
        ax.set_title(f"{shape} ({variant}, {sel[0]['device']}){dashed}", fontsize=9)
        ax.set_ylabel("call time / memory floor")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llada-8b,dream-7b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--prompts", default="256,1024")
    ap.add_argument("--gens", default="256,1024")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--lanes", default="1,2,4,8")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--sdpa", default="default", choices=["default", "math"],
                    help="math: force SDPA's math kernel (on a CPU at tiny width the flash kernel's fixed cost "
                         "of ~90 us per call is CPU compute, not host work)")
    ap.add_argument("--compile", action="store_true", help="also time every call under torch.compile")
    ap.add_argument("--baseline", type=Path, default=None, help="an older commit's src/ to time interleaved")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="only redraw --plot from this JSON")
    a = ap.parse_args(argv)
    if a.replot:
        rows = json.loads(a.replot.read_text())["rows"]
        plot(rows, a.plot or a.replot.with_suffix(".png"))
        return rows
    shapes = a.shape.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"error: unknown shape {bad[0]!r}; valid choices: {', '.join(SHAPES)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available here; valid here: cpu")
    if a.baseline and not (a.baseline / "asynclane" / "backbone.py").exists():
        raise SystemExit(f"error: --baseline {a.baseline} holds no asynclane/backbone.py (give an old commit's src/)")
    if a.threads:
        torch.set_num_threads(a.threads)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = sdpa_kernel(SDPBackend.MATH) if a.sdpa == "math" else contextlib.nullcontext()
    with ctx:
        rows = run(shapes, a.device, DTYPES[a.dtype], ints(a.prompts), ints(a.gens), a.block, ints(a.lanes),
                   a.warmup, a.iters, a.compile, a.baseline)
    for r in rows:
        r["sdpa"] = a.sdpa
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python scripts/bench_forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
        a.out.write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    if a.plot:
        plot(rows, a.plot)
    return rows


if __name__ == "__main__":
    main()
