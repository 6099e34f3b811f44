"""Our samplers inside lm-evaluation-harness 0.4.13 (eval.lmeval): the model class, offline.

The central check (issue 18's "done"): lm-eval runs gsm8k (limit 5) through ``AsyncLaneLM`` on the
embedded tiny model, offline, and every generation equals what our own runner (``eval.runner``)
generates for the same prompt and sampler: the same prompt token ids, the same NFE, the same
completion, and lm-eval's response is that completion cut at the task's stop strings exactly as
lm-eval's own ``postprocess_generated_text`` cuts it.  lm-eval's two gsm8k scores of each
response equal the runner's ``strict`` / ``flexible`` flags of the same example.
"""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval and datasets read these at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by CI (.ci/run); pip install -e '.[lm-eval]'")

import eval.lmeval as L  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.utils import postprocess_generated_text  # noqa: E402

GEN = 64
LIMIT = 5


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def request(context, doc_id=0, task="gsm8k", until=("Question:",), doc=None, **gen):
    return Instance(request_type="generate_until", doc=doc or {}, arguments=(context, {"until": list(until), **gen}),
                    idx=0, metadata=(task, doc_id, 1))


@pytest.fixture(scope="module")
def tiny_lm():
    return L.AsyncLaneLM(model="tiny", sampler="fast_dllm", gen_length=GEN)


@pytest.fixture(scope="module", params=[1, 2], ids=["bs1", "bs2"])
def both(request, tmp_path_factory):
    """lm-eval's gsm8k (0-shot, chat template, limit 5) through AsyncLaneLM, and our runner on the
    same task, sampler, canvas and batch size."""
    from eval.runner import run

    bs = request.param
    lm = L.AsyncLaneLM(model="tiny", sampler="fast_dllm", gen_length=GEN, batch_size=bs, warmup=0)
    results = L.simple_evaluate(lm, ["gsm8k"], num_fewshot=0, limit=LIMIT, bootstrap_iters=0, log_samples=True)
    out = tmp_path_factory.mktemp(f"runner-bs{bs}")
    run(compose("task=gsm8k", "task.num_fewshot=0", "sampler=fast_dllm", f"gen_length={GEN}", f"limit={LIMIT}",
                f"batch_size={bs}", "warmup=0"), out)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return lm, results, {r["example_id"]: r for r in rows}


def test_import_registers_the_model_under_asynclane():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("asynclane") is L.AsyncLaneLM
    assert {"hf", "vllm", "dummy"} <= set(model_registry.keys())  # lm-eval's own models are still there


def test_gsm8k_generations_equal_the_runners(both):
    lm, results, rows = both
    samples = {s["doc_id"]: s for s in results["samples"]["gsm8k"] if s["filter"] == "strict-match"}
    flexible = {s["doc_id"]: s for s in results["samples"]["gsm8k"] if s["filter"] == "flexible-extract"}
    assert sorted(samples) == list(range(LIMIT)) and len(lm.records) == LIMIT
    for rec in lm.records:
        row = rows[rec["example_id"]]
        sample = samples[rec["doc_id"]]
        assert rec["example_id"] == f"gsm8k-{rec['doc_id']:04d}"
        assert (rec["prompt_tokens"], rec["gen_tokens"], rec["nfe"], rec["token_forwards"], rec["completion"]) == \
            (row["prompt_tokens"], row["gen_tokens"], row["nfe"], row["token_forwards"], row["completion"])
        until = sample["arguments"][0][1]["until"]
        assert until == ["Question:", "</s>", "<|im_end|>"]
        # the response lm-eval scored: the runner's completion cut as lm-eval cuts HF generations
        want = postprocess_generated_text(row["completion"], until + [lm.eos_text], None)
        assert sample["resps"] == [[want]] and rec["response"] == want
        assert bool(sample["exact_match"]) == row["strict"]
        assert bool(flexible[rec["doc_id"]]["exact_match"]) == row["flexible"]
    # the prompt lm-eval rendered is the runner's: chat template, one user turn (0-shot)
    context = samples[0]["arguments"][0][0]
    assert context.startswith("<|bos|><|user|> Question: ") and context.endswith("Answer: <|eot|> <|assistant|>")


def test_our_summary_and_lm_evals_config(both):
    lm, results, rows = both
    s = results["asynclane"]
    assert s["n"] == LIMIT and s["nfe_mean"] == sum(r["nfe"] for r in rows.values()) / LIMIT
    assert s["tps"] > 0 and s["tokens_per_nfe"] == sum(r["gen_tokens"] for r in rows.values()) / \
        sum(r["nfe"] for r in rows.values())
    assert s["lm_eval_results"]["gsm8k"]["sample_len"] == LIMIT
    cfg = results["config"]
    assert cfg["asynclane_batch_size"] == lm.settings.batch_size and cfg["asynclane_sampler"] == "fast_dllm"
    assert cfg["asynclane_fingerprint"] == lm.fingerprint
    if lm.settings.batch_size == 2:  # fixed chunks of consecutive requests (2, 2, 1), one timing per chunk
        batches = [r["batch"] for r in lm.records]
        assert batches[0] == batches[1] != batches[2] == batches[3] != batches[4]


def test_generations_ignore_lm_evals_global_seeds_and_repeats_get_their_own(tiny_lm):
    import random

    import torch

    lm = L.AsyncLaneLM(model="tiny", sampler="blockwise", gen_length=16, temperature=1.0, block_length=16, steps=16)
    reqs = [request("<|bos|><|user|> start 3 <|eot|> <|assistant|>", doc_id=7)] * 3  # one doc, repeats=3
    with torch.random.fork_rng(devices=[]):
        state = random.getstate()
        torch.manual_seed(1)
        random.seed(1)
        first = lm.generate_until(reqs)
        torch.manual_seed(2)
        random.seed(2)
        second = lm.generate_until(reqs)
        random.setstate(state)
    assert first == second  # only (seed, example id, repeat) decide
    keys = [r["seed_key"] for r in lm.records[:3]]
    assert keys == ["gsm8k-0007", "gsm8k-0007#1", "gsm8k-0007#2"]
    other = L.AsyncLaneLM(model="tiny", sampler="blockwise", gen_length=16, temperature=1.0, block_length=16,
                          steps=16, seed=5)
    assert other.fingerprint != lm.fingerprint


def test_stop_strings_and_eos_are_applied_after_generation(tiny_lm):
    ctx = "<|bos|><|user|> start 3 <|eot|> <|assistant|>"
    out = tiny_lm.generate_until([request(ctx, until=["\n"]), request(ctx, until=[])])
    recs = tiny_lm.records[-2:]
    assert recs[0]["until"] == ["\n", tiny_lm.eos_text] and recs[1]["until"] == [tiny_lm.eos_text]
    assert recs[0]["completion"] == recs[1]["completion"]  # stop strings never change the generation
    assert out[0] == recs[1]["completion"].split("\n")[0] and out[1] == recs[1]["completion"]


def test_long_prompts_are_left_cut_as_lm_evals_hf_model(tiny_lm):
    max_len = tiny_lm.backbone.spec.max_length
    long_ctx = "<|bos|><|user|>" + " start 3" * max_len + " <|eot|> <|assistant|>"
    tiny_lm.generate_until([request(long_ctx)])
    rec = tiny_lm.records[-1]
    assert rec["truncated_from"] > max_len and rec["prompt_tokens"] == max_len - GEN


def test_loglikelihood_is_refused_naming_what_to_run(tiny_lm):
    for fn in (tiny_lm.loglikelihood, tiny_lm.loglikelihood_rolling):
        with pytest.raises(NotImplementedError, match="not supported.*generate_until tasks"):
            fn([])


@pytest.mark.parametrize("args, msg", [
    ({"model": "gpt2"}, "unknown model 'gpt2'; valid choices: tiny, tiny_long, llada, dream"),
    ({"sampler": "nope"}, "unknown sampler 'nope'; valid choices: .*blockwise"),
    ({"sampler": "fast_dllm", "treshold": 0.9}, "no option.*treshold.*valid options"),
    ({"batch_size": "auto"}, "batch_size='auto' is not supported.*valid: an integer >= 1"),
    ({"add_bos_token": "maybe"}, "add_bos_token='maybe'; valid choices: true, false"),
    ({"device": "tpu"}, "unknown device 'tpu'; valid choices"),
])
def test_bad_model_args_fail_in_one_line_naming_the_choices(args, msg):
    with pytest.raises(ValueError, match=msg) as e:
        L.resolve_settings(**args)
    assert "\n" not in str(e.value)


def test_response_cache_is_keyed_on_the_sampler_config(tiny_lm, tmp_path):
    from lm_eval.api.model import CachingLM

    db = str(tmp_path / "cache.db")
    CachingLM(tiny_lm, db)  # stamps the empty database with this config
    CachingLM(tiny_lm, db)  # the same config: accepted
    other = L.AsyncLaneLM(model="tiny", sampler="fast_dllm", gen_length=GEN, threshold=0.5)
    with pytest.raises(ValueError, match="another sampler config"):
        CachingLM(other, db)
    # the command line gives each config its own database
    argv = ["--model", "asynclane", "--tasks", "gsm8k", "--use_cache", str(tmp_path / "c")]
    a = L.prepare_argv(argv[:1] + ["asynclane", "--model_args", f"sampler=fast_dllm,gen_length={GEN}"] + argv[2:])
    b = L.prepare_argv(argv[:1] + ["asynclane", "--model_args", f"sampler=fast_dllm,gen_length={GEN},threshold=0.5"]
                       + argv[2:])
    ca, cb = L._option(a, "--use_cache"), L._option(b, "--use_cache")
    assert ca == f"{tmp_path / 'c'}-asynclane-{tiny_lm.fingerprint}" and cb == f"{tmp_path / 'c'}-asynclane-" \
        f"{other.fingerprint}" and ca != cb
    assert L._option(a, "--device") == "auto"


def test_command_line_runs_lm_evals_cli_offline(tmp_path, capsys):
    """The issue's command (5-shot gsm8k at gen_length 256, so prompts are left-cut), limit 2."""
    out = tmp_path / "out"
    rc = L.main(["--model", "asynclane", "--model_args", "model=tiny,sampler=fast_dllm,gen_length=256",
                 "--tasks", "gsm8k", "--limit", "2", "--output_path", str(out), "--log_samples"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "asynclane summary (fast_dllm, 2 requests): TPS" in err
    summary = json.loads((out / L.SUMMARY_FILE).read_text())
    records = [json.loads(x) for x in (out / L.REQUESTS_FILE).read_text().splitlines()]
    assert summary["n"] == 2 and len(records) == 2 and all(r["truncated_from"] for r in records)
    assert all(r["prompt_tokens"] == 512 - 256 for r in records)
    assert list(out.rglob("results_*.json")) and list(out.rglob("samples_gsm8k_*.jsonl"))


def test_command_line_reports_bad_arguments_in_one_line(capsys):
    assert L.main(["--model", "asynclane", "--model_args", "sampler=nope", "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: asynclane: unknown sampler 'nope'; valid choices:")
