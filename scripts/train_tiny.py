"""Train the embedded tiny dLLM (LLaDA family) on the synthetic tasks with the LLaDA SFT objective.

The shipped weights (``src/asynclane/tiny``) came from one run on an NVIDIA H200 (torch 2.11,
bf16 autocast, 14 data-worker processes, 32,768-token batches): 15,486 steps in 360 s of
training, stopped by ``--time-budget`` at 80% of the 19,278-step schedule it calibrated from its
measured step rate.  Its log is ``results/tiny_training/log.jsonl``; ``training.json`` beside the
weights holds the exact command and the one that reproduces the schedule without calibration::

    python scripts/train_tiny.py --device cuda --amp --workers 14 --batch-tokens 32768 \
        --steps 19278 --stop-after 15486 --lr 2e-3 --warmup 300 --probe-every 1000 --probe-n 100

The run resumes from ``--state`` (default ``scripts/tiny_state/``, not committed) when present.
On a CPU (the defaults: fp32, 4,096-token batches, inline data) a run is bit-exact across
interruptions, because every step's data and noise come from ``seed`` and the step number alone;
batches built by ``--workers`` processes are identical to inline ones.  On a GPU, kernels are not
bit-deterministic, so a rerun reproduces the recipe, not the last bit of the weights.

Objective (LLaDA SFT, GUIDELINES): the prompt stays clean; the answer, padded with EOS to the
generation length, has each position masked with probability t ~ U(eps, 1] per row; loss is
cross-entropy on masked positions weighted 1/t, divided by the row's answer length (EOS pads
included, as LLaDA does), averaged over rows.  Each step draws its generation length from
{64, 128, 256} so the model learns to fill any of the swept budgets with EOS, and sizes the
batch to a fixed token budget.

Model: native ``asynclane.backbone.Transformer`` in LLaDA form, d 256, 4 layers, 4 heads,
SwiGLU 768, word-level vocabulary (about 3.4M parameters).  AdamW (0.9, 0.95), wd 0.1,
linear warm-up then cosine decay to 10%, grad-norm clip 1.0, fp32, 2 threads.

Step time: 0.8 s for a 4,096-token batch on the project's 2-core CPU (fp32, 2 threads; 7,000
steps there reached only 15% / 0% exact match on arith / listops), 23 ms for a 32,768-token batch
on the H200 (43 steps/s, data workers included).  The log records, every 50 steps, the loss,
masked-token accuracy and cumulative training seconds, and at every probe the exact match of
greedy decoding and the fill-in accuracy (one answer token masked; numbers vs structure).
``src/asynclane/tiny/training.json`` states the step and seconds of the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from asynclane.backbone import ModelConfig, Transformer  # noqa: E402
from asynclane.checkpoint import native_views  # noqa: E402
from asynclane.tiny_tokenizer import build_tokenizer, chat_prompt_ids  # noqa: E402
from asynclane.tinymodel import export_checkpoint  # noqa: E402
from eval.tasks import synthetic  # noqa: E402

GEN_LENGTHS = (64, 128, 256)
GEN_WEIGHTS = (0.6, 0.25, 0.15)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10000,
                    help="length of the lr schedule; 0 = calibrate it to --time-budget (see below)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of training: stop (resumably) once spent; with --steps 0 the schedule "
                         "length is set from the step rate measured over steps 20-60 (recorded in the log "
                         "and training.json, so a rerun with that --steps reproduces the schedule)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (cuda)")
    ap.add_argument("--workers", type=int, default=0, help="processes building batches (0: inline)")
    ap.add_argument("--log", type=Path, default=None, help="log file (default: STATE/log.jsonl)")
    ap.add_argument("--weights-only", action="store_true",
                    help="export weights, config and training.json but not the tokenizer files")
    ap.add_argument("--probe-n", type=int, default=20, help="held-out problems per task per probe")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (resumably) at this step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--probe-every", type=int, default=500)
    ap.add_argument("--state", type=Path, default=ROOT / "scripts" / "tiny_state")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "asynclane" / "tiny")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=768)
    return ap.parse_args(argv)


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(family="llada", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.heads, mlp_hidden=args.mlp, vocab_size=vocab_size,
                       rope_theta=10000.0, norm_eps=1e-5, qkv_bias=False, max_length=512)


def make_batch(step: int, seed: int, tok, batch_tokens: int):
    """Deterministic batch for ``step``: ids (B, T), key mask, answer mask, gen length."""
    rng = random.Random(seed * 1_000_003 + step)
    gen = rng.choices(GEN_LENGTHS, GEN_WEIGHTS)[0]
    rows = max(4, batch_tokens // (gen + 40))
    eos = tok.eos_token_id
    seqs, prompt_lens = [], []
    for i in range(rows):
        task = synthetic.TASKS[i % len(synthetic.TASKS)]
        p = synthetic.train_problem(task, rng)
        prompt = chat_prompt_ids(tok, p.prompt)
        answer = tok.encode(p.answer, add_special_tokens=False)[: gen - 1]
        seqs.append(prompt + answer + [eos] * (gen - len(answer)))
        prompt_lens.append(len(prompt))
    T = max(map(len, seqs))
    ids = torch.full((rows, T), eos, dtype=torch.long)
    key_mask = torch.zeros(rows, T, dtype=torch.bool)
    answer_mask = torch.zeros(rows, T, dtype=torch.bool)
    for r, (s, pl) in enumerate(zip(seqs, prompt_lens)):
        ids[r, : len(s)] = torch.tensor(s)
        key_mask[r, : len(s)] = True
        answer_mask[r, pl: len(s)] = True
    return ids, key_mask, answer_mask, gen


def make_noise(step: int, seed: int, answer_mask: torch.Tensor, eps=1e-3):
    """Per-row mask ratio t ~ U(eps, 1] and the masked answer positions for ``step``."""
    B, T = answer_mask.shape
    g = torch.Generator().manual_seed(seed * 7919 + step)
    t = (1 - eps) * torch.rand(B, 1, generator=g) + eps
    masked = (torch.rand(B, T, generator=g) < t) & answer_mask
    return t, masked


_TOK = None


def prepare_step(job):
    """Everything step ``step`` trains on (runs in a data worker when --workers > 0)."""
    global _TOK
    step, seed, batch_tokens = job
    if _TOK is None:
        _TOK = build_tokenizer(synthetic.VOCAB_WORDS)
    ids, key_mask, answer_mask, gen = make_batch(step, seed, _TOK, batch_tokens)
    t, masked = make_noise(step, seed, answer_mask)
    return ids, key_mask, gen, t, masked


def sft_loss(model, ids, key_mask, gen: int, mask_id: int, t, masked):
    B, T = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    positions = torch.arange(T, device=ids.device).expand(B, T)
    hidden = model(noisy, positions, key_mask)
    logits = model.head(hidden[masked])
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    weight = 1.0 / (t.expand(B, T)[masked] * gen)
    loss = (ce * weight).sum() / B
    acc = (logits.argmax(-1) == ids[masked]).float().mean()
    return loss, acc


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def greedy_blockwise(model, prompts, gen, block, mask_id, eos_id):
    """LLaDA low-confidence remasking, one token per step, temperature 0, left-padded batch.

    Kept inside the trainer (not the project's ``blockwise`` sampler) so the training loop never
    imports code that may change while a long run is in flight.
    """
    B, P = len(prompts), max(map(len, prompts))
    T = P + gen
    ids = torch.full((B, T), mask_id, dtype=torch.long)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    for r, pr in enumerate(prompts):
        ids[r, : P - len(pr)] = eos_id
        key_mask[r, : P - len(pr)] = False
        ids[r, P - len(pr): P] = torch.tensor(pr)
    dev = model.head.weight.device
    ids, key_mask = ids.to(dev), key_mask.to(dev)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    for b0 in range(P, T, block):
        for _ in range(block):
            logits = model.head(model(ids, positions, key_mask)).float()
            conf, pred = logits.softmax(-1).max(-1)
            still = ids == mask_id
            still[:, b0 + block:] = False
            conf = torch.where(still, conf, torch.full_like(conf, -1.0))
            j = conf.argmax(-1)
            rows = still.any(-1)
            ids[rows, j[rows]] = pred[rows, j[rows]]
    return [row[P:].tolist() for row in ids]


def probe(model, tok, n=20, gen=64, block=32):
    """Exact match of greedy one-token-per-step decoding on the first n held-out problems."""
    model.eval()
    out = {}
    for task in synthetic.TASKS:
        probs = synthetic.test_problems(task, n)
        prompts = [chat_prompt_ids(tok, p.prompt) for p in probs]
        comps = greedy_blockwise(model, prompts, gen, block, tok.mask_token_id, tok.eos_token_id)
        texts = [tok.decode(c[: c.index(tok.eos_token_id)] if tok.eos_token_id in c else c)
                 for c in comps]
        out[task] = sum(synthetic.score(p, t) for p, t in zip(probs, texts)) / n
    model.train()
    return out


@torch.no_grad()
def fill_in_accuracy(model, tok, n=40):
    """Accuracy on one masked answer token with everything else visible, numbers vs the rest.

    Numbers can only be right by copying from the prompt or computing; structure (keys, signs,
    newlines) is learned first.  This shows copying emerge long before exact match moves.
    """
    model.eval()
    numbers = set(tok.convert_tokens_to_ids([str(i) for i in range(synthetic.MAX_VALUE + 1)]))
    out = {}
    for task in synthetic.TASKS:
        hit = {"number": [0, 0], "other": [0, 0]}
        for p in synthetic.test_problems(task, n):
            prompt = chat_prompt_ids(tok, p.prompt)
            answer = tok.encode(p.answer, add_special_tokens=False)
            seq = torch.tensor(prompt + answer + [tok.eos_token_id])
            rows = seq.repeat(len(answer), 1)
            cols = torch.arange(len(answer)) + len(prompt)
            rows[torch.arange(len(answer)), cols] = tok.mask_token_id
            T = rows.shape[1]
            dev = model.head.weight.device
            hidden = model(rows.to(dev), torch.arange(T, device=dev).expand(len(answer), T))
            pred = model.head(hidden[torch.arange(len(answer), device=dev), cols.to(dev)]).argmax(-1).cpu()
            for t, ok in zip(answer, (pred == torch.tensor(answer)).tolist()):
                h = hit["number" if t in numbers else "other"]
                h[0] += ok
                h[1] += 1
        out[task] = {k: round(a / max(1, b), 3) for k, (a, b) in hit.items()}
    model.train()
    return out


def save_state(path: Path, step, model, opt, elapsed, schedule_steps):
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "elapsed": elapsed,
                "schedule_steps": schedule_steps}, tmp)
    os.replace(tmp, path / "state.pt")


def _worker_init():
    torch.set_num_threads(1)


def data_pool(args):
    """``--workers`` batch-building processes, forked before any CUDA context exists (or None)."""
    if args.workers <= 0:
        return None
    import multiprocessing as mp
    return mp.get_context("fork").Pool(args.workers, initializer=_worker_init)


def _to_numpy(batch):
    ids, key_mask, gen, t, masked = batch
    return ids.numpy(), key_mask.numpy(), gen, t.numpy(), masked.numpy()


def _prepare_numpy(job):
    # plain arrays travel by pickle: torch tensors would go through shared-memory file descriptors
    return _to_numpy(prepare_step(job))


def batches(args, pool, start: int):
    """Step batches in order from ``start``, built inline or by ``pool`` (same content either way).

    At most ``4 * workers`` batches are in flight, so memory stays bounded however long the run.
    """
    if pool is None:
        step = start
        while True:
            yield prepare_step((step, args.seed, args.batch_tokens))
            step += 1
    from collections import deque
    pending, nxt = deque(), start
    while True:
        while len(pending) < 4 * args.workers:
            pending.append(pool.apply_async(_prepare_numpy, ((nxt, args.seed, args.batch_tokens),)))
            nxt += 1
        ids, key_mask, gen, t, masked = pending.popleft().get()
        yield torch.from_numpy(ids), torch.from_numpy(key_mask), gen, torch.from_numpy(t), torch.from_numpy(masked)


def main(argv=None):
    args = parse_args(argv)
    command = "python scripts/train_tiny.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pool = data_pool(args)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok = build_tokenizer(synthetic.VOCAB_WORDS)
    cfg = model_config(args, len(tok))
    model = Transformer(cfg)
    for name, p in native_views(model).items():  # the official matrices, in their original order
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.to(args.device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    state_file = args.state / "state.pt"
    if state_file.exists():
        st = torch.load(state_file, weights_only=False, map_location=args.device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        args.steps = st.get("schedule_steps", args.steps) if args.steps == 0 else args.steps
        print(f"resumed at step {step} ({elapsed:.0f} s of training so far)", flush=True)
    if args.steps == 0 and args.time_budget is None:
        raise SystemExit("--steps 0 (calibrated schedule) needs --time-budget SECONDS")
    calibrating = args.steps == 0
    horizon = 10 ** 9 if calibrating else args.steps
    stop = min(horizon, args.stop_after or horizon)
    args.state.mkdir(parents=True, exist_ok=True)
    log = open(args.log or args.state / "log.jsonl", "a")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp else torch.autocast("cpu", enabled=False)
    model.train()
    t0 = time.time()
    run_loss = run_acc = 0.0
    for ids, key_mask, gen, t, masked in batches(args, pool, step):
        if step >= stop:
            break
        if calibrating and step == 20:
            t_cal = time.time()
        if calibrating and step == 60:
            rate = 40 / (time.time() - t_cal)
            args.steps = max(args.warmup + 100, int(rate * args.time_budget))
            stop = min(args.steps, args.stop_after or args.steps)
            calibrating = False
            print(json.dumps({"calibrated_steps_per_s": round(rate, 2), "schedule_steps": args.steps}), flush=True)
            log.write(json.dumps({"step": step, "calibrated_steps_per_s": round(rate, 2),
                                  "schedule_steps": args.steps}) + "\n")
        dev = args.device
        ids, key_mask, t, masked = (x.to(dev, non_blocking=True) for x in (ids, key_mask, t, masked))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with amp:
            loss, acc = sft_loss(model, ids, key_mask, gen, tok.mask_token_id, t, masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_acc += acc.item()
        over_budget = args.time_budget is not None and elapsed + (time.time() - t0) >= args.time_budget
        if step % 50 == 0:
            now = time.time()
            elapsed += now - t0
            t0 = now
            rec = {"step": step, "loss": round(run_loss / 50, 4), "masked_acc": round(run_acc / 50, 4),
                   "lr": lr_at(step, args), "seconds": round(elapsed, 1)}
            run_loss = run_acc = 0.0
            if step % args.probe_every == 0:
                with amp:
                    rec["probe_gen64"] = probe(model, tok, n=args.probe_n)
                    rec["fill_in_acc"] = fill_in_accuracy(model, tok)
                t0 = time.time()
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == stop or over_budget:
            elapsed += time.time() - t0
            t0 = time.time()
            save_state(args.state, step, model, opt, elapsed, args.steps)
            export_checkpoint(model, tok, args.out, meta={"step": step, "schedule_steps": args.steps,
                                                          "train_seconds": round(elapsed),
                                                          "device": args.device, "command": command},
                              with_tokenizer=not args.weights_only)
        if over_budget:
            break
    if pool is not None:
        pool.terminate()
    print(f"stopped at step {step}, {elapsed:.0f} s of training", flush=True)


if __name__ == "__main__":
    main()
