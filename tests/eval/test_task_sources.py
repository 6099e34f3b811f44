"""Benchmark data from Hugging Face ``datasets`` (``task.source=hf``) against the shipped files.

The hub cannot be reached here, so the hub path is tested for its offline message only; the
loading itself runs on local copies of the shipped files in each form ``datasets`` reads offline:
a builder with data files (``json``), a directory written by ``save_to_disk``, and a plain
directory of data files (what a clone of the dataset repository is).
"""
from __future__ import annotations

import json

import pytest

from eval.tasks import build_task
from eval.tasks.datafiles import DATA_DIR, DataFileError

datasets = pytest.importorskip("datasets", reason="task.source=hf needs `datasets` (pip install -e '.[hf]')")

try:  # datasets imports it lazily (through scipy) on the first load, and importing it sets an environment
    import threadpoolctl  # noqa: F401  variable (KMP_DUPLICATE_LIB_OK) for the process: do it at collection,
except ImportError:  # not inside a test that the state guard watches
    pass

GSM8K_FILES = {"test": str(DATA_DIR / "gsm8k/test.jsonl"), "train": str(DATA_DIR / "gsm8k/train.jsonl")}


@pytest.fixture(autouse=True)
def _offline_private_cache(tmp_path, monkeypatch):
    """No network, and a datasets cache of the test's own (never the user's)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


class CharTokenizer:
    """Renders chat messages readably and encodes one id per character (prompt equality only)."""

    bos_token_id = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, continue_final_message=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" * add_generation_prompt)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def same_prompts(a, b, n=5):
    ea, eb = a.examples(n), b.examples(n)
    assert [e.id for e in ea] == [e.id for e in eb] and [e.answer for e in ea] == [e.answer for e in eb]
    tok = CharTokenizer()
    assert [a.build_prompt(tok, e) for e in ea] == [b.build_prompt(tok, e) for e in eb]


def test_json_builder_with_data_files_gives_the_shipped_examples_and_few_shot_prompts():
    shipped = build_task("gsm8k")
    hf = build_task("gsm8k", source="hf", hf_path="json", hf_data_files=GSM8K_FILES)
    same_prompts(shipped, hf)  # 5-shot: the shots come from the `train` file, drawn as for the shipped data
    assert len(hf.examples()) == 1319
    prov = hf.provenance()
    assert prov["source"] == "hf" and prov["hf_path"] == "json" and prov["resolved_revision"] is None
    assert prov["splits"] == {"test": {"config": None, "split": "test", "records": 1319},
                              "fewshot": {"config": None, "split": "train", "records": 7473}}
    assert prov["hf_data_files"] == GSM8K_FILES and len(prov["sha256"]) == 16
    assert shipped.provenance() == {"source": "shipped", "files": ["gsm8k/test.jsonl", "gsm8k/train.jsonl"],
                                    "sha256": shipped.provenance()["sha256"]}


def test_zero_shot_reads_no_few_shot_split_and_one_file_is_the_evaluated_split():
    hf = build_task("gsm8k", variant="cot_zeroshot", source="hf", hf_path="json",
                    hf_data_files=GSM8K_FILES["test"])
    same_prompts(build_task("gsm8k", variant="cot_zeroshot"), hf)
    assert list(hf.provenance()["splits"]) == ["test"]


def test_few_shot_from_one_file_says_how_to_give_the_split():
    hf = build_task("gsm8k", source="hf", hf_path="json", hf_data_files=GSM8K_FILES["test"])
    with pytest.raises(DataFileError, match=r"few-shot examples need a mapping, e\.g\. task\.hf_data_files="):
        hf.build_prompt(CharTokenizer(), hf.examples(1)[0])


def test_save_to_disk_directory(tmp_path):
    rows = [json.loads(line) for line in (DATA_DIR / "math500/test.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "math"))
    for variant in ("zeroshot", "minerva"):
        hf = build_task("math500", variant=variant, source="hf", hf_path=str(tmp_path / "math"))
        same_prompts(build_task("math500", variant=variant), hf)
    assert hf.provenance()["splits"]["test"]["records"] == 500
    with pytest.raises(DataFileError, match=r"no split 'validation' in .* \(it has test\)"):
        build_task("math500", source="hf", hf_path=str(tmp_path / "math"), hf_split="validation").examples(1)


def test_directory_of_data_files_like_a_repository_clone(tmp_path):
    """The hub's mbpp repository layout: a README whose YAML names each configuration's split files."""
    repo = tmp_path / "mbpp"
    (repo / "full").mkdir(parents=True)
    rows = [json.loads(line) for line in (DATA_DIR / "mbpp/mbpp.jsonl").read_text().splitlines()]
    for split, ids in {"test": range(11, 511), "prompt": range(1, 11)}.items():
        with open(repo / "full" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["task_id"] in ids)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: full\n  data_files:\n  - split: test\n"
                                    "    path: full/test.jsonl\n  - split: prompt\n    path: full/prompt.jsonl\n---\n")
    hf = build_task("mbpp", source="hf", hf_path=str(repo), hf_name="full", hf_fewshot_split="prompt")
    same_prompts(build_task("mbpp"), hf)  # 3 shots (tasks 2-4) from the `prompt` split
    assert hf.provenance()["splits"]["fewshot"] == {"config": "full", "split": "prompt", "records": 10}
    t = build_task("mbpp", source="hf", hf_path=str(repo), hf_name="full", hf_fewshot_split="test")
    with pytest.raises(ValueError, match=r"few-shot records lack task_id\(s\) \[2, 3, 4\]"):
        t.build_prompt(CharTokenizer(), t.examples(1)[0])


def test_hub_id_offline_without_a_copy_says_how_to_provide_the_data():
    with pytest.raises(DataFileError) as e:
        build_task("gsm8k", source="hf").examples(1)
    line = str(e.value)
    assert "\n" not in line and line.startswith("gsm8k: cannot load the Hugging Face dataset openai/gsm8k, "
                                                "config main, split test")
    for hint in ("task.hf_path=<directory>", "task.hf_path=json task.hf_data_files=<file>", "task.source=shipped"):
        assert hint in line


def test_records_without_the_task_fields_are_named(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(DataFileError, match=r"record 0 of Hugging Face dataset json, split test lacks field\(s\) "
                                            r"answer"):
        build_task("gsm8k", variant="cot_zeroshot", source="hf", hf_path="json", hf_data_files=str(f)).examples(1)


@pytest.mark.parametrize("options, says", [
    ({"source": "hub"}, "source='hub'; valid choices: shipped, hf"),
    ({"hf_path": "json"}, "hf_path: only with source=hf"),
    ({"hf_pth": "json"}, "unknown option(s) hf_pth; valid options: variant, num_fewshot"),
    ({"source": "hf", "hf_fewshot_split": "train"}, "hf_fewshot_split: this task takes no few-shot examples"),
    ({"source": "hf", "hf_data_files": 3}, "hf_data_files must be a path, a list of paths or a mapping"),
])
def test_bad_source_options_are_one_line(options, says):
    task = "math500" if "hf_fewshot_split" in options else "gsm8k"
    with pytest.raises(ValueError) as e:
        build_task(task, **options)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_runner_rows_record_the_source_and_hf_rows_never_resume_shipped_ones(tmp_path):
    """End to end on the embedded model: the same completions from either source; rows say which."""
    from hydra import compose, initialize_config_module

    from eval.rows import read_rows
    from eval.runner import run

    def go(*extra):
        with initialize_config_module(config_module="eval.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "task=gsm8k", "task.variant=cot_zeroshot", "task.chat_template=false", "limit=2", "gen_length=32",
                "sampler=fast_dllm", "threads=1", "warmup=0", *extra])
        run(cfg, tmp_path)
        return read_rows(tmp_path / "samples.jsonl")

    shipped = go()
    hf = go("task.source=hf", "task.hf_path=json", f"task.hf_data_files={GSM8K_FILES['test']}")
    assert len(shipped) == 2 and len(hf) == 4  # the hf run did not resume the shipped rows: new fingerprint
    new = hf[2:]
    assert [r["completion"] for r in new] == [r["completion"] for r in shipped]
    assert shipped[0]["data_source"]["source"] == "shipped" and new[0]["data_source"]["source"] == "hf"
    assert new[0]["fingerprint"] != shipped[0]["fingerprint"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data_source"] == new[0]["data_source"]


def test_shipped_rows_keep_their_fingerprint():
    """Results written before the source options existed still resume."""
    from eval.runner import _fingerprint

    conf = {"model": {"name": "tiny"}, "sampler": {"name": "blockwise"}, "task": {"name": "gsm8k", "variant": "x"},
            "seed": 0, "batch_size": 1, "dtype": "float32", "device": "cpu"}
    with_keys = json.loads(json.dumps(conf))
    with_keys["task"].update(source="shipped", hf_path=None, hf_name=None, hf_split=None, hf_revision=None,
                             hf_data_files=None, hf_fewshot_split=None)
    shipped = build_task("gsm8k").provenance()
    assert _fingerprint(with_keys, shipped) == _fingerprint(conf) == _fingerprint(conf, None)
