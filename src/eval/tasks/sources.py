"""Where a benchmark task's records come from: the shipped files (default) or Hugging Face datasets.

``source=shipped`` (default, offline)
    the checksummed files in ``src/eval/data`` (:mod:`eval.tasks.datafiles`, PROVENANCE.md).
``source=hf``
    :func:`datasets.load_dataset` (``pip install -e ".[hf]"``), with the task options

    ``hf_path``           a hub id (``openai/gsm8k``), a local directory (a clone of the dataset
                          repository, or one written by ``Dataset(Dict).save_to_disk``), or a
                          packaged builder (``json``, ``parquet``, ``csv``) with ``hf_data_files``;
                          null: the task's canonical hub dataset (:data:`HF_DEFAULTS`)
    ``hf_name``           the dataset configuration (``main`` for gsm8k); null: the task's default
    ``hf_split``          the evaluated split; null: the task's default (``test``)
    ``hf_revision``       a hub commit, tag or branch; null: the hub's default branch
    ``hf_data_files``     files for a builder path: one file / a list (the evaluated split) or a
                          mapping split -> file(s) (``{test: a.jsonl, train: b.jsonl}``)
    ``hf_fewshot_split``  where few-shot examples come from (gsm8k: ``train``; mbpp: ``prompt``)

Records must carry the fields the task reads, as in the shipped files (which are copies of the
same datasets, so ``source=hf`` on the canonical datasets gives the same examples and prompts).
Offline without a local copy, loading fails with one line that says how to provide the data.

Every row records where its data came from (:meth:`TaskData.provenance`): the source, the hub
id / configuration / split / requested and resolved revision for ``hf``, and the sha256 of the
records' content, which also enters the run's fingerprint, so rows of other data never resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .datafiles import FILES, DataFileError, load_records

__all__ = ["SOURCES", "HFLocation", "HF_DEFAULTS", "TaskData", "SOURCE_OPTIONS"]

SOURCES = ("shipped", "hf")
SOURCE_OPTIONS = ("source", "hf_path", "hf_name", "hf_split", "hf_revision", "hf_data_files", "hf_fewshot_split")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HFLocation:
    """A task's canonical Hugging Face dataset: hub id, configuration, evaluated and few-shot splits
    (``fewshot_name``: the few-shot split's configuration when it differs, as for mbpp-sanitized)."""

    path: str
    name: Optional[str]
    split: str
    fewshot_split: Optional[str] = None
    fewshot_name: Optional[str] = None


HF_DEFAULTS: dict[str, HFLocation] = {
    "gsm8k": HFLocation("openai/gsm8k", "main", "test", "train"),
    "math500": HFLocation("HuggingFaceH4/MATH-500", None, "test"),
    "humaneval": HFLocation("openai/openai_humaneval", None, "test"),
    "mbpp": HFLocation("google-research-datasets/mbpp", "full", "test", "prompt"),
    "mbpp-sanitized": HFLocation("google-research-datasets/mbpp", "sanitized", "test", "prompt", "full"),
}


def _content_sha(records: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


class TaskData:
    """The records a task reads, by role (``"test"``: the evaluated examples, ``"fewshot"``: shots).

    ``shipped`` maps each role to a file of :data:`~eval.tasks.datafiles.FILES`; ``hf`` is the
    task's :class:`HFLocation`; ``options`` are the task's ``source`` / ``hf_*`` options (an unknown
    key is an error naming the valid ones).
    """

    def __init__(self, task: str, shipped: Mapping[str, str], hf: HFLocation, options: Mapping,
                 task_options: Sequence[str] = ()):
        unknown = sorted(set(options) - set(SOURCE_OPTIONS))
        if unknown:
            raise ValueError(f"{task}: unknown option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(list(task_options) + list(SOURCE_OPTIONS))}")
        source = options.get("source") or "shipped"
        if source not in SOURCES:
            raise ValueError(f"{task}: source={source!r}; valid choices: {', '.join(SOURCES)}")
        given = [k for k in SOURCE_OPTIONS[1:] if options.get(k) is not None]
        if source == "shipped" and given:
            raise ValueError(f"{task}: {', '.join(given)}: only with source=hf (source=shipped reads the "
                             f"shipped files); add task.source=hf")
        if options.get("hf_fewshot_split") is not None and "fewshot" not in shipped:
            raise ValueError(f"{task}: hf_fewshot_split: this task takes no few-shot examples from its data")
        self.task, self.source, self.shipped = task, source, dict(shipped)
        self.path = options.get("hf_path") or hf.path
        canonical = self.path == hf.path  # the task's own hub dataset: its configurations apply
        self.name = options.get("hf_name") if options.get("hf_name") is not None else (hf.name if canonical else None)
        self.split = options.get("hf_split") or hf.split
        self.fewshot_split = options.get("hf_fewshot_split") or hf.fewshot_split
        self.fewshot_name = hf.fewshot_name if canonical else None
        self.revision = options.get("hf_revision")
        data_files = options.get("hf_data_files")
        if data_files is not None and not isinstance(data_files, (str, list, tuple, Mapping)):
            raise ValueError(f"{task}: hf_data_files must be a path, a list of paths or a mapping split -> "
                             f"path(s), got {type(data_files).__name__}")
        if isinstance(data_files, Mapping):
            data_files = {str(k): (v if isinstance(v, str) else list(v)) for k, v in data_files.items()}
        elif isinstance(data_files, (list, tuple)):
            data_files = list(data_files)
        self.data_files = data_files
        self._cache: dict[str, tuple[list[dict], dict]] = {}
        self._checked: set = set()  # (role, fields) already verified on every record

    # ---- records ----------------------------------------------------------------------------------
    def records(self, role: str, required: Iterable[str] = ()) -> list[dict]:
        """The records of ``role``, each with the fields ``required`` (else a one-line error)."""
        required = tuple(required)
        if self.source == "shipped":
            return load_records(self.shipped[role], required)
        rows = self._loaded(role)[0]
        if (role, required) in self._checked:  # tasks ask per prompt (the shots): check each set once
            return rows
        for i, r in enumerate(rows):
            missing = [k for k in required if k not in r]
            if missing:
                where = self._describe(role)
                raise DataFileError(f"{self.task}: record {i} of {where} lacks field(s) {', '.join(missing)} "
                                    f"(the task reads {', '.join(required)}); point task.hf_path / hf_name at the "
                                    f"task's dataset")
        self._checked.add((role, required))
        return rows

    def _loaded(self, role: str) -> tuple[list[dict], dict]:
        """(records, load info) of ``role`` from the Hugging Face source, loaded once."""
        if role not in self._cache:
            self._cache[role] = self._load_hf(role)
        return self._cache[role]

    def _split_of(self, role: str) -> str:
        if role == "test":
            return self.split
        if not self.fewshot_split:
            raise ValueError(f"{self.task}: few-shot examples need a split: set task.hf_fewshot_split "
                             f"(or num_fewshot=0)")
        return self.fewshot_split

    def _describe(self, role: str) -> str:
        bits = [self.path] + ([f"config {self._name_of(role)}"] if self._name_of(role) else [])
        bits.append(f"split {self._split_of(role)}")
        if self.revision:
            bits.append(f"revision {self.revision}")
        return "Hugging Face dataset " + ", ".join(bits)

    def _name_of(self, role: str) -> Optional[str]:
        return self.fewshot_name if role == "fewshot" and self.fewshot_name else self.name

    def _load_hf(self, role: str) -> tuple[list[dict], dict]:
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{self.task}: task.source=hf needs the `datasets` package: "
                             f"pip install -e \".[hf]\" (or use the shipped data: task.source=shipped)") from None
        split, name = self._split_of(role), self._name_of(role)
        local = Path(os.path.expanduser(self.path))
        try:
            if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise ValueError(f"no split {split!r} in {local} (it has {', '.join(ds)})")
                    ds = ds[split]
            else:
                data_files = self.data_files
                if data_files is not None and not isinstance(data_files, dict):
                    if role != "test":
                        raise ValueError(f"hf_data_files gives the evaluated split only; few-shot examples need "
                                         f"a mapping, e.g. task.hf_data_files={{{self.split}:<file>,{split}:<file>}}")
                    data_files = {split: data_files}
                ds = datasets.load_dataset(self.path, name, split=split, revision=self.revision,
                                           data_files=data_files)
        except (ConnectionError, FileNotFoundError) as e:
            raise DataFileError(f"{self.task}: cannot load the {self._describe(role)} ({_first_line(e)}). Offline, "
                                f"give a local copy: task.hf_path=<directory> (a clone of the dataset repository, "
                                f"or one written by save_to_disk), or task.hf_path=json task.hf_data_files=<file>, or "
                                f"fill the Hugging Face cache on a machine with network first; or use the shipped "
                                f"data: task.source=shipped") from None
        except Exception as e:  # datasets raises many types (DatasetNotFoundError, ValueError, ...)
            raise DataFileError(f"{self.task}: cannot load the {self._describe(role)}: {_first_line(e)}") from None
        rows = ds.to_list()
        info = {"split": split, "config": name, "resolved_revision": _resolved_revision(ds, self.path),
                "records": len(rows), "sha256": _content_sha(rows)}
        return rows, info

    # ---- provenance -------------------------------------------------------------------------------
    def provenance(self, roles: Iterable[str] = ("test",)) -> dict:
        """Where the data of ``roles`` came from (for every row).  ``sha256``: of the shipped files
        (their recorded hashes) or of the loaded records' content."""
        roles = tuple(roles)
        if self.source == "shipped":
            files = sorted({self.shipped[r] for r in roles})
            digest = hashlib.sha256("".join(FILES[f][0] for f in files).encode()).hexdigest()
            return {"source": "shipped", "files": files, "sha256": digest[:16]}
        infos = {r: self._loaded(r)[1] for r in roles}
        out = {"source": "hf", "hf_path": self.path, "hf_revision": self.revision,
               "resolved_revision": infos["test"]["resolved_revision"] if "test" in infos else None,
               "splits": {r: {"config": i["config"], "split": i["split"], "records": i["records"]}
                          for r, i in infos.items()},
               "sha256": hashlib.sha256("".join(i["sha256"] for i in infos.values()).encode()).hexdigest()[:16]}
        if self.data_files is not None:
            out["hf_data_files"] = self.data_files
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _resolved_revision(ds, path: str) -> Optional[str]:
    """The hub commit a hub dataset was read at: the 40-hex directory of its cache files (where the
    `datasets` cache keeps one directory per commit); None for local data and builders."""
    if "/" not in path or Path(os.path.expanduser(path)).exists():
        return None
    for f in getattr(ds, "cache_files", None) or []:
        for part in Path(f.get("filename", "")).parts:
            if _HEX40.match(part):
                return part
    return None
