"""Learn2PD: a learned filter decides which block predictions to commit, plus End-of-Text Prediction.

Sources: "Learning to Parallel" (Learn2PD), arXiv 2509.25188 (abstract, project page [P]; authors
uncertain, docs/research/baselines_core.md §5.1); ims-kdks/Learning-to-Parallel-Decoding
``llada/generate.py`` at 342293c (``generate_l2p_eot``, ``generate_learn2parallel``),
``generate_training_data.py``, ``train.ipynb`` [C]; the filter class in a vendored copy [M] (§5).
LLaDA's one-token-per-step block loop without cache, plus: a 2-layer MLP over the block's top-1
confidences accepts every masked block position with sigmoid output > ``accept_threshold`` (the
quota's top-1 is committed anyway); EoTP cuts the answer after the first filter-accepted EOS, else
after the most confident EOS proposal among the masked positions, and the model never sees the cut
tail again.  The filter is a JSON file (:func:`save_filter`) made by
``scripts/train_learn2pd_filter.py``; the embedded model's sits beside its weights.  Defaults per
family: threshold 0.96 (LLaDA, eval_llada.sh), 0.9 (Dream, dream/eval.sh).  Deviations, in brief:
batch > 1 (a cut tail hidden by the key mask); the cut tail reads as EOS; ``eotp_tail="eos"`` option
(ours); Dream runs the LLaDA loop; no KV-cache variants; the mask id is never proposed; the filter
records its model, a mismatch is an error (a test model without tokenizer runs without the filter).
Details: docs/samplers/learn2pd.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.loading import TINY_DIR
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, block_steps, check_block_length, finish, init_buffer, padding_mask, read_host, register
from baselines.blockwise import uniform_transfer_counts

FILTER_FORMAT = "learn2pd-filter/1"
FILTER_NAME = "learn2pd_filter.json"
DEFAULT_FILTER = TINY_DIR / FILTER_NAME  # the embedded model's, written by scripts/train_learn2pd_filter.py
FEATURES = "top-1 confidence of each block position, 0 past the answer's end"
THRESHOLD = {"llada": 0.96, "dream": 0.9}  # llada/eval_llada.sh (and generate.py main()); dream/eval.sh [C]
EOTP_TAILS = ("drop", "eos")
PROBE = 8  # weight values per probed row in a model signature
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- the filter and its file

@dataclass(frozen=True)
class Filter:
    """The learned filter: ``Linear(L, H) -> ReLU -> Linear(H, L)`` over a block's L confidences,
    one logit per block position (the reference's ``LogisticRegression``, H = L there)."""

    w1: torch.Tensor  # (H, L)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (L, H)
    b2: torch.Tensor  # (L,)
    model: dict  # the signature of the model it was trained on (model_signature)
    training: dict  # how it was made (free-form, from the training script)

    @property
    def block_length(self) -> int:
        return self.w1.shape[1]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L) accept logits of (B, L) float32 features."""
        return torch.relu(features @ self.w1.T + self.b1) @ self.w2.T + self.b2

    def to(self, device) -> "Filter":
        return Filter(*(t.to(device) for t in (self.w1, self.b1, self.w2, self.b2)), self.model, self.training)


def save_filter(path, w1, b1, w2, b2, model: dict, training: Optional[dict] = None) -> Path:
    """Write a filter file: JSON with ``format``, ``features``, ``block_length``, ``hidden``, the four
    weight tensors as nested float lists (float32 values, exact through JSON), the ``model`` signature
    and a free-form ``training`` record."""
    w1, b1, w2, b2 = (torch.as_tensor(t, dtype=torch.float32).detach().cpu() for t in (w1, b1, w2, b2))
    doc = {"format": FILTER_FORMAT, "features": FEATURES, "block_length": w1.shape[1], "hidden": w1.shape[0],
           "weights": {"w1": w1.tolist(), "b1": b1.tolist(), "w2": w2.tolist(), "b2": b2.tolist()},
           "model": model, "training": training or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def filter_file(filter_path: Optional[str]) -> Path:
    """The file a ``filter_path`` setting names (None: the embedded model's committed filter)."""
    return DEFAULT_FILTER if filter_path is None else Path(filter_path).expanduser()


def load_filter(filter_path: Optional[str]) -> Filter:
    """The filter of a ``filter_path`` setting; a missing, unreadable or inconsistent file is a
    one-line ValueError naming the option."""
    p = filter_file(filter_path)
    try:
        st = os.stat(p)
    except OSError:
        raise ValueError(f"filter_path={str(p)!r}: no such file; make one with `python scripts/"
                         f"train_learn2pd_filter.py --model DIR` (writes DIR/{FILTER_NAME}) or leave filter_path "
                         "null for the embedded model's") from None
    return _read_filter(str(p.resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _read_filter(path: str, mtime_ns: int, size: int) -> Filter:  # the stat fields key the cache
    where = f"filter_path={path!r}"
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a readable JSON filter file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FILTER_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{where}: format {got!r} is not {FILTER_FORMAT!r}; write it with "
                         "scripts/train_learn2pd_filter.py")
    try:
        L, H, w = int(doc["block_length"]), int(doc["hidden"]), doc["weights"]
        w1, b1, w2, b2 = (torch.tensor(w[k], dtype=torch.float32) for k in ("w1", "b1", "w2", "b2"))
        model = dict(doc["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed filter file (missing or bad field: {e})") from None
    shapes = {"w1": (tuple(w1.shape), (H, L)), "b1": (tuple(b1.shape), (H,)),
              "w2": (tuple(w2.shape), (L, H)), "b2": (tuple(b2.shape), (L,))}
    bad = [f"{k} {got} (expected {want})" for k, (got, want) in shapes.items() if got != want]
    if bad:
        raise ValueError(f"{where}: feature size does not match its block_length {L} / hidden {H}: {', '.join(bad)}")
    if not all(torch.isfinite(t).all() for t in (w1, b1, w2, b2)):
        raise ValueError(f"{where}: the weights hold NaN or inf")
    return Filter(w1, b1, w2, b2, model, dict(doc.get("training") or {}))


def model_signature(backbone) -> dict:
    """What a filter records about its model: family, sizes, token ids and a few weight values (the
    mask id's embedding row and the EOS id's head row), so another or a retrained model is told apart."""
    spec, cfg, m = backbone.spec, backbone.cfg, backbone.model
    probe = torch.cat([m.embed.weight[spec.mask_id, :PROBE], m.head.weight[spec.eos_id, :PROBE]])
    return {"name": Path(str(spec.name)).name, "family": spec.family, "vocab_size": spec.vocab_size,
            "mask_id": spec.mask_id, "eos_ids": list(spec.eos_ids), "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "probe": probe.double().cpu().tolist()}


def signature_mismatch(ours: dict, theirs: dict, rtol: float = 1e-2) -> Optional[str]:
    """None when two signatures describe the same model, else what differs.  Exact on ids and sizes;
    the probe within ``rtol`` of its largest value, so the same weights in bf16 still match."""
    for key in ("family", "vocab_size", "mask_id", "eos_ids", "d_model", "n_layers"):
        if ours.get(key) != theirs.get(key):
            return f"{key} {theirs.get(key)!r} (this backbone: {ours.get(key)!r})"
    a, b = ours.get("probe") or [], theirs.get("probe") or []
    if len(a) != len(b) or not b:
        return "no comparable weight probe"
    tol = rtol * max(abs(v) for v in b)
    if any(not abs(u - v) <= tol for u, v in zip(a, b)):
        return "its weights (probe values differ)"
    return None


def check_model(filt: Filter, backbone, where: str) -> Optional[str]:
    """None when ``filt`` was trained on ``backbone``; else a one-line ValueError, except for a
    backbone without a tokenizer (an in-memory test model, e.g. ``asynclane.testing.random_backbone``,
    which the harness cannot evaluate): there the reason is returned and the sampler runs without the
    filter (forced quota and EoTP only), so a filter never runs on a model it was not trained on."""
    why = signature_mismatch(model_signature(backbone), filt.model)
    if why is not None and getattr(backbone, "tokenizer", None) is not None:
        raise ValueError(f"{where}: this filter was trained on model {filt.model.get('name')!r}, not on "
                         f"{Path(str(backbone.spec.name)).name!r}: {why}; train one for it with `python scripts/"
                         "train_learn2pd_filter.py --model DIR` and pass sampler.filter_path")
    return why


# --------------------------------------------------------------------------- rules only learn2pd uses

def block_features(conf: torch.Tensor, live: torch.Tensor, lo: int, block_length: int) -> torch.Tensor:
    """(B, block_length) float32 filter input: ``conf[:, lo:lo + block_length]`` where ``live``, 0
    where not (the answer was cut before it) or past the last column (the reference zero-pads a block
    that EoTP shortened).  ``conf``/``live``: (B, n) over the columns a call saw."""
    B, n = conf.shape
    out = torch.zeros(B, block_length, dtype=torch.float32, device=conf.device)
    k = max(0, min(block_length, n - lo))
    out[:, :k] = torch.where(live[:, lo:lo + k], conf[:, lo:lo + k].float(), out[:, :k])
    return out


def eotp_end(x0: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, accepted: torch.Tensor,
             eos_id: int, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """End-of-Text Prediction: each row's new exclusive end and why, ``(end', kind)``, both (B,).

    ``generate_l2p_eot`` [C]: if the filter accepted an EOS proposal, cut right after the first one
    (kind 1); else if any masked position proposes EOS, cut right after the one with the highest
    confidence, ties to the lower column (kind 2); else keep ``end`` (kind 0).  x0/conf/masked/
    accepted: (B, n) proposals, their confidence, the masked columns, the filter's accepts.
    """
    n = x0.shape[1]
    col = torch.arange(n, device=x0.device)
    eos = x0 == eos_id
    by_filter = eos & accepted & masked
    first = torch.where(by_filter, col, n).amin(-1)
    cand = torch.where(eos & masked, conf, torch.full_like(conf, _NEG_INF))
    best = cand.argmax(-1)  # the first maximum
    has_f, has_c = by_filter.any(-1), eos.logical_and(masked).any(-1)
    new = torch.where(has_f, first + 1, torch.where(has_c, best + 1, end))
    kind = torch.where(has_f, 1, torch.where(has_c, 2, 0))
    return new, kind


# --------------------------------------------------------------------------- the sampler

@dataclass
class Learn2PDConfig(SamplerConfig):
    """Learn2PD settings; see the module docstring for sources."""

    block_length: int = 32
    steps: Optional[int] = None  # None = gen_length: the forced quota is one token per step
    accept_threshold: Optional[float] = None  # None: per family (THRESHOLD); 1 accepts nothing
    eotp: bool = True
    eotp_tail: str = "drop"  # drop: the cut tail leaves the sequence (reference); eos: it becomes EOS, still seen
    filter_path: Optional[str] = None  # None: the embedded model's committed filter

    def __post_init__(self):
        super().__post_init__()
        check_block_length(self.block_length, self.gen_length)
        block_steps(self.steps, self.block_length, self.gen_length)
        if self.eotp_tail not in EOTP_TAILS:
            raise ValueError(f"eotp_tail={self.eotp_tail!r} is not one of {', '.join(EOTP_TAILS)}")
        t = self.accept_threshold
        if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1):
            raise ValueError(f"accept_threshold={t!r} must be in [0, 1] (sigmoid > threshold accepts; 1 accepts "
                             "nothing), or null for the family default (0.96 LLaDA, 0.9 Dream)")
        filt = load_filter(self.filter_path)
        if filt.block_length != self.block_length:
            raise ValueError(f"filter_path={str(filter_file(self.filter_path))!r}: the filter takes "
                             f"{filt.block_length}-position features but block_length={self.block_length}; "
                             f"set block_length={filt.block_length} or train a filter with --block-length "
                             f"{self.block_length}")

    @property
    def steps_per_block(self) -> int:
        return block_steps(self.steps, self.block_length, self.gen_length)

    def threshold_for(self, family: str) -> float:
        return THRESHOLD[family] if self.accept_threshold is None else float(self.accept_threshold)


@register("learn2pd")
class Learn2PDSampler(BaseSampler):
    """``generate_l2p_eot`` (``eotp``) / ``generate_learn2parallel`` (``eotp=false``), batched."""

    Config = Learn2PDConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        filt = load_filter(cfg.filter_path)
        unfit = check_model(filt, backbone, f"filter_path={str(filter_file(cfg.filter_path))!r}")
        filt = filt.to(backbone.device)
        threshold = cfg.threshold_for(spec.family)
        drop = cfg.eotp_tail == "drop"
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None: no row is padded
        B, S = x.shape
        Lb = cfg.block_length
        col = torch.arange(S, device=x.device)
        end = torch.full((B,), S, dtype=torch.long, device=x.device)  # exclusive: EoTP cut every column >= end
        kind = torch.zeros(B, dtype=torch.long, device=x.device)
        ends, cuts, calls = [S] * B, [[] for _ in range(B)], 0

        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            todo = (x[:, lo:hi] == spec.mask_id) & (col[lo:hi] < end[:, None])
            quota = uniform_transfer_counts(todo, cfg.steps_per_block)  # LLaDA's schedule, from the block start
            step = 0
            while True:
                active = todo.any(-1)
                act_h, end_h, kind_h = read_host(active, end, kind)  # the iteration's one device read
                for r in range(B):  # EoTP events, for the trace (spec §5.8: log truncations)
                    if end_h[r] != ends[r]:
                        cuts[r].append({"call": calls, "answer_length": end_h[r] - P,
                                        "by": "filter" if kind_h[r] == 1 else "eos_proposal"})
                ends = end_h
                if not any(act_h):
                    break
                n = max(end_h) if drop else S  # the call sees columns [0, n): a dropped tail is never forwarded again
                live = col[:n] < end[:, None]
                if drop and not (pad is None and min(end_h) == n):
                    km = live if pad is None else live & pad[:, :n]
                else:
                    km = pad
                logits = backbone.forward(x[:, :n], positions=positions[:, :n], key_mask=km)
                calls += 1
                xs = x[:, :n]
                x0 = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                conf = rules.confidence_prob(logits, x0)  # softmax in the logits dtype (generate_l2p_eot)
                masked = (xs == spec.mask_id) & live & active[:, None]
                accept = torch.zeros_like(masked)
                if unfit is None:
                    accept_b = torch.sigmoid(filt.logits(block_features(conf, live, lo, Lb))) > threshold
                    k = min(hi, n) - lo
                    accept[:, lo:lo + k] = accept_b[:, :k] & masked[:, lo:lo + k]
                forced = rules.commit_topk(rules.restrict_confidence(conf, masked, lo, hi), quota[:, step])
                x[:, :n] = torch.where(accept | forced, x0, xs)
                if cfg.eotp:
                    end, why = eotp_end(x0, conf, masked, accept, spec.eos_id, end)
                    kind = torch.where(why > 0, why, kind)
                    if not drop:  # eotp_tail="eos": the tail becomes visible EOS padding
                        x = torch.where(col >= end[:, None], spec.eos_id, x)
                todo = (x[:, lo:hi] == spec.mask_id) & (col[lo:hi] < end[:, None])
                step += 1

        x = torch.where(col >= end[:, None], spec.eos_id, x)  # the cut tail reads as EOS (Deviations)
        return finish(x, P, spec, info={"eotp_cuts": cuts, "threshold": threshold,
                                        "filter": "applied" if unfit is None else f"not applied: trained on another model ({unfit})"})
