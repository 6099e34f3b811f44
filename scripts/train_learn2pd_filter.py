"""Train the Learn2PD filter of a backbone and write it beside the model (``learn2pd_filter.json``).

Labels come from the backbone's own decodes, as ``llada/generate_training_data.py`` makes them
(docs/research/baselines_core.md §5.3) [C]:

1. *Reference*: the ``blockwise`` sampler, one token per step (steps = gen_length, low confidence,
   temperature 0): its answer is the "final token" of every position.
2. *Extremely Greedy Parallel* rerun from scratch, block by block: each step one forward; for every
   block position record the top-1 confidence of its proposal (the filter's feature) and whether that
   proposal already equals the final token (the label), then commit exactly the masked positions
   whose proposal is right; a block whose proposals did not change since the previous step gets the
   reference copied in (the reference's guard against a stall).  One row (L features, L labels) per
   step of a block.
3. Train ``Linear(L, H) -> ReLU -> Linear(H, L)`` (H = L, the reference's ``LogisticRegression``)
   with BCE-with-logits, full-batch AdamW, lr 3e-3 (``train.ipynb``) [C], on the rows of 80% of the
   prompts; 10% are held out for validation and 10% for the test numbers (the split is by prompt,
   not by row as in the notebook, so no held-out row shares a decode with a training row).

Prompts for the embedded model: the synthetic tasks' *training* pool
(``eval.tasks.synthetic.train_problem``, which rejects every held-out evaluation prompt), drawn from
``--seed`` (not the evaluation seeds ``synthetic.TEST_SEED``), chat template applied as the harness
does.  For another backbone: ``--prompts FILE.jsonl`` (one ``{"prompt": "..."}`` a line), chat
template applied (the reference feeds raw FLAN inputs without it).

    python scripts/train_learn2pd_filter.py                       # the embedded model (results/learn2pd_filter/)
    python scripts/train_learn2pd_filter.py --model /data/LLaDA-8B-Instruct --prompts flan.jsonl \\
        --device cuda --dtype bf16 --gen-length 256               # writes /data/LLaDA-8B-Instruct/learn2pd_filter.json

The file format is documented in docs/samplers/learn2pd.md (``baselines.learn2pd.save_filter``).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from asynclane import rules
from asynclane.loading import TINY_DIR, load_backbone
from asynclane.sampler import build_sampler, init_buffer, padding_mask
from baselines.learn2pd import FILTER_NAME, THRESHOLD, model_signature, save_filter

TASKS = ("arith", "listops")
STATES = ("egp", "vanilla")
SEED = 7_000_001  # the prompts' seed: not synthetic.TEST_SEED, not the tiny model's training streams


def training_prompts(tokenizer, tasks=TASKS, per_task: int = 128, seed: int = SEED) -> list[list[int]]:
    """Chat-templated prompt ids of ``per_task`` training-pool problems of each synthetic task."""
    from asynclane.tiny_tokenizer import chat_prompt_ids
    from eval.tasks import synthetic

    out = []
    for i, task in enumerate(tasks):
        rng = random.Random(seed + i)
        out += [chat_prompt_ids(tokenizer, synthetic.train_problem(task, rng).prompt) for _ in range(per_task)]
    return out


def file_prompts(tokenizer, path) -> list[list[int]]:
    """Chat-templated prompt ids of the ``prompt`` field of each line of a JSONL file."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            ids = tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["prompt"]}],
                                                tokenize=True, add_generation_prompt=True, return_dict=False)
            out.append(list(ids))
    return out


class _Recorder:
    """Delegating backbone that keeps, for every forward of the ``blockwise`` sampler, the block's
    top-1 confidences and proposals (as the sampler computes its features) and which positions were
    masked.  blockwise gives every block ``steps_per_block`` forwards, so call ``c`` is in block
    ``c // steps_per_block``."""

    def __init__(self, bb, P: int, block_length: int, steps_per_block: int):
        self._bb, self.P, self.L, self.spb = bb, P, block_length, steps_per_block
        self.steps = []  # (block index, conf (B, L), proposal (B, L), masked (B, L))

    def forward(self, ids, *args, **kwargs):
        logits = self._bb.forward(ids, *args, **kwargs)
        k = len(self.steps) // self.spb
        lo = self.P + k * self.L
        x0 = rules.propose(logits[:, lo:lo + self.L], self._bb.spec.mask_id, 0.0)
        conf = rules.confidence_prob(logits[:, lo:lo + self.L], x0)
        self.steps.append((k, conf.float().cpu(), x0.cpu(), (ids[:, lo:lo + self.L] == self._bb.spec.mask_id).cpu()))
        return logits

    def __getattr__(self, name):
        return getattr(self._bb, name)


def reference_answers(backbone, prompts, gen_length: int, block_length: int, batch: int) -> tuple[list, dict]:
    """The one-token-per-step ``blockwise`` answer (gen_length tokens) of every prompt, and the
    filter rows of that decode's own states (one row per step of a block, labelled against its
    final answer; same fields as :func:`egp_rows`)."""
    sampler = build_sampler("blockwise", gen_length=gen_length, block_length=block_length)
    answers, feats, labels, masked, owner = [], [], [], [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        rec = _Recorder(backbone, max(len(p) for p in chunk), block_length, sampler.cfg.steps_per_block)
        gen = sampler.generate(rec, chunk, torch.Generator().manual_seed(0))
        final = gen.tokens.cpu()
        answers += final.tolist()
        for k, conf, x0, m in rec.steps:
            feats.append(conf)
            labels.append(x0 == final[:, k * block_length:(k + 1) * block_length])
            masked.append(m)
            owner.append(torch.arange(i, i + len(chunk)))
    return answers, {"features": torch.cat(feats), "labels": torch.cat(labels), "masked": torch.cat(masked),
                     "prompt": torch.cat(owner)}


@torch.no_grad()
def egp_rows(backbone, prompts, answers, gen_length: int, block_length: int, batch: int) -> dict:
    """Filter training rows of the Extremely Greedy Parallel rerun (module docstring, step 2).

    Returns ``features`` (N, L) float32, ``labels`` (N, L) bool, ``masked`` (N, L) bool (the position
    was still masked at that step) and ``prompt`` (N,) the index of the row's prompt.
    """
    spec, L = backbone.spec, block_length
    feats, labels, masked, owner = [], [], [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        x, key_mask, positions, P = init_buffer(backbone, chunk, gen_length)
        pad = padding_mask(key_mask, chunk)
        ref = x.clone()
        ref[:, P:] = torch.tensor(answers[i:i + len(chunk)], device=x.device)
        ids = torch.arange(i, i + len(chunk), device=x.device)
        for lo in range(P, P + gen_length, L):
            hi = lo + L
            prev = torch.full_like(x[:, lo:hi], -1)
            while bool((blk_masked := x[:, lo:hi] == spec.mask_id).any()):
                active = blk_masked.any(-1)
                logits = backbone.forward(x, positions=positions, key_mask=pad,
                                          predict=torch.arange(lo, hi, device=x.device).expand(len(chunk), -1))
                x0 = rules.propose(logits, spec.mask_id, 0.0)
                conf = rules.confidence_prob(logits, x0)  # as the sampler computes its features
                right = x0 == ref[:, lo:hi]
                feats.append(conf[active].float().cpu())
                labels.append(right[active].cpu())
                masked.append(blk_masked[active].cpu())
                owner.append(ids[active].cpu())
                stall = active & (x0 == prev).all(-1)
                new = torch.where(blk_masked & right, x0, x[:, lo:hi])
                x[:, lo:hi] = torch.where(stall[:, None], ref[:, lo:hi], new)
                prev = torch.where(active[:, None], x0, prev)
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "masked": torch.cat(masked),
            "prompt": torch.cat(owner)}


def filter_logits(weights, features):
    w1, b1, w2, b2 = weights
    return torch.relu(features @ w1.T + b1) @ w2.T + b2


def train_filter(features, labels, hidden: int, epochs: int, lr: float, seed: int,
                 validation: Optional[dict] = None) -> tuple[list, list]:
    """Full-batch AdamW on BCE-with-logits; returns the weights (w1, b1, w2, b2) and the loss curve
    ``[epoch, train loss, validation loss]`` every 500 epochs.  Initialised like ``nn.Linear``
    (uniform +-1/sqrt(fan_in)) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    L = features.shape[1]

    def uniform(*shape, fan_in):
        return ((torch.rand(shape, generator=g) * 2 - 1) / fan_in ** 0.5).requires_grad_()

    params = [uniform(hidden, L, fan_in=L), uniform(hidden, fan_in=L), uniform(L, hidden, fan_in=hidden),
              uniform(L, fan_in=hidden)]
    opt = torch.optim.AdamW(params, lr=lr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    y = labels.float()
    curve = []
    for epoch in range(epochs):
        opt.zero_grad()
        loss = bce(filter_logits(params, features), y)
        loss.backward()
        opt.step()
        if epoch % 500 == 0 or epoch == epochs - 1:
            point = [epoch, round(loss.item(), 6)]
            if validation is not None:
                with torch.no_grad():
                    point.append(round(bce(filter_logits(params, validation["features"]),
                                           validation["labels"].float()).item(), 6))
            curve.append(point)
    return [p.detach() for p in params], curve


def label_metrics(prob: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Label accuracy at 0.5 and at ``threshold`` (the sampler's accept rule ``p > threshold``), the
    precision / recall of that rule, and the accuracy of the best constant filter (all accept or
    none: the majority label); the log loss of the filter and of the best constant probability (this
    set's own positive rate, which favours the constant)."""
    y = labels.bool()
    acc = lambda pred: (pred == y).float().mean().item()  # noqa: E731
    accept = prob > threshold
    pos = y.float().mean().item()
    bce = torch.nn.functional.binary_cross_entropy
    const = torch.full_like(prob, min(max(pos, 1e-6), 1 - 1e-6))
    return {"n": y.numel(), "positive_rate": round(pos, 4), "log_loss": round(bce(prob, y.float()).item(), 4),
            "constant_log_loss": round(bce(const, y.float()).item(), 4), "accuracy_at_0.5": round(acc(prob > 0.5), 4),
            f"accuracy_at_{threshold}": round(acc(accept), 4),
            f"precision_at_{threshold}": round((accept & y).sum().item() / max(accept.sum().item(), 1), 4),
            f"recall_at_{threshold}": round((accept & y).sum().item() / max(y.sum().item(), 1), 4),
            "constant_accuracy": round(max(pos, 1 - pos), 4)}


def evaluate(weights, rows: dict, threshold: float) -> dict:
    """:func:`label_metrics` on every block position and on the still-masked ones only."""
    with torch.no_grad():
        prob = torch.sigmoid(filter_logits(weights, rows["features"]))
    m = rows["masked"]
    return {"all_positions": label_metrics(prob, rows["labels"], threshold),
            "masked_positions": label_metrics(prob[m], rows["labels"][m], threshold)}


def split_prompts(n: int, seed: int) -> tuple[set, set, set]:
    """Prompt indices for train / validation / test: a seeded 80/10/10 shuffle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    a, b = int(0.8 * n), int(0.9 * n)
    return set(order[:a]), set(order[a:b]), set(order[b:])


def subset(rows: dict, keep: set) -> dict:
    sel = torch.tensor([int(p) in keep for p in rows["prompt"]], dtype=torch.bool)
    return {k: v[sel] for k, v in rows.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TINY_DIR), help="checkpoint directory or hub id (default: the embedded model)")
    ap.add_argument("--prompts", help="JSONL with a 'prompt' field per line (default: the synthetic tasks' training pool)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="synthetic tasks when --prompts is not given")
    ap.add_argument("--per-task", type=int, default=128, help="training-pool problems per synthetic task")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the prompts, the split and the initialisation")
    ap.add_argument("--states", default="egp,vanilla", help="whose decoding states give rows: egp (the "
                    "reference's oracle rerun), vanilla (the one-token-per-step decode itself), or both")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default: block length, the reference)")
    ap.add_argument("--epochs", type=int, default=10000, help="full-batch AdamW epochs (train.ipynb: 40000; the "
                    "validation loss of the embedded model's rows is flat after ~5000)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16, help="prompts per decode call")
    ap.add_argument("--threshold", type=float, default=None, help="accept threshold for the reported metrics "
                    "(default: the sampler's family default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default fp32)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", help=f"filter file (default: MODEL_DIR/{FILTER_NAME})")
    ap.add_argument("--summary", help="also write the run's summary JSON here")
    args = ap.parse_args(argv)

    states = args.states.split(",")
    if not states or set(states) - set(STATES):
        ap.error(f"--states {args.states!r}: a comma-separated subset of {', '.join(STATES)}")
    if not args.out and not Path(args.model).is_dir():
        ap.error(f"--model {args.model} is not a local directory: pass --out")
    out = Path(args.out) if args.out else Path(args.model) / FILTER_NAME
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bb = load_backbone(args.model, dtype=args.dtype, device=args.device)
    if args.prompts:
        prompts = file_prompts(bb.tokenizer, args.prompts)
    else:
        prompts = training_prompts(bb.tokenizer, tuple(args.tasks.split(",")), args.per_task, args.seed)
    answers, vanilla = reference_answers(bb, prompts, args.gen_length, args.block_length, args.batch)
    parts = {"vanilla": vanilla} if "vanilla" in states else {}
    if "egp" in states:
        parts["egp"] = egp_rows(bb, prompts, answers, args.gen_length, args.block_length, args.batch)
    rows = {k: torch.cat([part[k] for part in parts.values()]) for k in vanilla}
    t_labels = time.perf_counter() - t0
    train_ids, val_ids, test_ids = split_prompts(len(prompts), args.seed)
    train, val = subset(rows, train_ids), subset(rows, val_ids)
    weights, curve = train_filter(train["features"], train["labels"], args.hidden or args.block_length,
                                  args.epochs, args.lr, args.seed, validation=val)
    t_total = time.perf_counter() - t0
    threshold = args.threshold if args.threshold is not None else THRESHOLD[bb.spec.family]
    command = "python scripts/train_learn2pd_filter.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    summary = {
        "command": command, "model": model_signature(bb)["name"],
        "prompts": (f"{args.prompts}" if args.prompts else
                    f"{args.per_task} per task of {args.tasks}, synthetic training pool, seed {args.seed}"),
        "n_prompts": len(prompts), "states": states,
        "rows_by_states": {k: len(v["labels"]) for k, v in parts.items()}, "gen_length": args.gen_length, "block_length": args.block_length,
        "rows": {"train": len(train["labels"]), "validation": len(val["labels"]),
                 "test": len(subset(rows, test_ids)["labels"])},
        "epochs": args.epochs, "lr": args.lr, "threshold": threshold,
        "seconds": {"labels": round(t_labels, 1), "total": round(t_total, 1)}, "threads": args.threads,
        "torch": torch.__version__, "loss_curve": curve[::max(1, len(curve) // 8)] + curve[-1:],
        "train": evaluate(weights, train, threshold),
        "validation": evaluate(weights, val, threshold),
        "test": evaluate(weights, subset(rows, test_ids), threshold),
    }
    save_filter(out, *weights, model=model_signature(bb), training=summary)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
