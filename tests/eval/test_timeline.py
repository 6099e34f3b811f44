"""The lane-timeline picture from a trace (synthetic records, no model)."""
from __future__ import annotations

import json

import pytest

from eval.timeline import load_trace, plot_lane_timeline

TRACE = [
    {"iteration": 0, "lanes": [{"id": 0, "kind": "GEN", "block": [10, 18], "committed": [10, 11, 12]}],
     "forks": [], "kills": []},
    {"iteration": 1, "lanes": [{"id": 0, "kind": "GEN", "block": [10, 18], "committed": [13]}],
     "forks": [{"parent": 0, "at": 13, "ref": 1, "gen": 2}], "kills": []},
    {"iteration": 2, "lanes": [{"id": 1, "kind": "REF", "block": [10, 14], "committed": []},
                               {"id": 2, "kind": "GEN", "block": [14, 22], "committed": [14, 15]}],
     "forks": [], "kills": [3]},
]


def test_timeline_png_is_written(tmp_path):
    out = plot_lane_timeline(TRACE, tmp_path / "t.png", title="x")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_load_trace_picks_the_example_and_names_the_choices(tmp_path):
    recs = [{"example_ids": ["a"], "trace": TRACE, "info": {}}, {"example_ids": ["b"], "trace": [], "info": {}}]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_trace(tmp_path)[0] == "a"
    assert load_trace(tmp_path, "b")[1] == []
    with pytest.raises(KeyError, match="traced examples: a, b"):
        load_trace(tmp_path, "zz")
    with pytest.raises(FileNotFoundError, match="save_traces=true"):
        load_trace(tmp_path / "nowhere")
    # a pooled batch (asynclane.rowpool): one trace and one info per example
    pooled = {"example_ids": ["c", "d"], "trace": [[], TRACE], "info": {"rows": [{"n": 0}, {"n": 1}]}}
    (tmp_path / "traces.jsonl").write_text(json.dumps(pooled) + "\n")
    assert load_trace(tmp_path, "d") == ("d", TRACE, {"n": 1}) and load_trace(tmp_path)[0] == "c"
    (tmp_path / "traces.jsonl").write_text(json.dumps({"example_ids": ["c", "d"], "trace": TRACE, "info": {}}) + "\n")
    with pytest.raises(ValueError, match="natively batched"):
        load_trace(tmp_path, "d")
    with pytest.raises(ValueError, match="no lane records"):
        plot_lane_timeline([{"iteration": 0, "lanes": []}], tmp_path / "e.png")
