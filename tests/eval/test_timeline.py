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


# AsyncLane's one-row path (speculate=false) on arith, recorded: the continuation (lane 2) commits
# 59 at iteration 2 while refine lane 1 (opened at 0) still runs at 3, and 53 at 3, lane 1's last step
ONE_ROW = [
    {"iteration": 0, "lanes": [{"id": 0, "kind": "GEN", "block": [24, 56], "committed": [24, 25, 37, 51]}],
     "forks": [{"parent": 0, "at": 51, "ref": 1, "gen": 2}], "kills": []},
    {"iteration": 1, "lanes": [{"id": 1, "kind": "REF", "block": [24, 52], "committed": [36, 39]},
                               {"id": 2, "kind": "GEN", "block": [52, 84], "committed": []}], "forks": [], "kills": []},
    {"iteration": 2, "lanes": [{"id": 1, "kind": "REF", "block": [24, 52], "committed": [43]},
                               {"id": 2, "kind": "GEN", "block": [52, 69], "committed": [59]}], "forks": [], "kills": []},
    {"iteration": 3, "lanes": [{"id": 1, "kind": "REF", "block": [24, 52], "committed": [50]},
                               {"id": 2, "kind": "GEN", "block": [52, 69], "committed": [53]}],
     "forks": [{"parent": 2, "at": 65, "ref": 3, "gen": 4}], "kills": []},
    {"iteration": 4, "lanes": [{"id": 3, "kind": "REF", "block": [52, 66], "committed": [57]},
                               {"id": 4, "kind": "GEN", "block": [66, 69], "committed": [67]}], "forks": [], "kills": []},
]


def test_lane_shares_count_continuation_tokens_beside_open_refinement():
    from eval.timeline import lane_shares

    # committed: 24 25 37 51 36 39 43 59 50 53 57 67 (12); GEN: 24 25 37 51 59 53 67 (7)
    # async: 59 (lane 1 open after iteration 2); overlap: 59 and 53 (lane 1's last step is iteration 3);
    # 67 at iteration 4: refine lane 3 (opened at 3, starts at 52 < 67) ends at 4: overlap, not async;
    # iteration 0's commits past the fork at 51 came in the call that opened lane 1: neither
    assert lane_shares(ONE_ROW) == {"committed": 12, "gen": 7, "async": 1, "overlap": 3}
    # a position re-committed later is credited to the last lane (here the refine lane): not a GEN token
    again = ONE_ROW + [{"iteration": 5, "lanes": [{"id": 5, "kind": "REF", "block": [52, 60],
                                                   "committed": [59]}], "forks": [], "kills": []}]
    assert lane_shares(again) == {"committed": 12, "gen": 6, "async": 0, "overlap": 2}
    assert lane_shares([{"iteration": 0, "calls": 1}]) == {"committed": 0, "gen": 0, "async": 0, "overlap": 0}
    # positions seeded from the lookahead when the continuation's block advances are the continuation's:
    # 70 seeded at iteration 2 while lane 1 stays open after it is asynchronous
    seeded = [dict(rec, seeded=[70]) if rec["iteration"] == 2 else rec for rec in ONE_ROW]
    assert lane_shares(seeded) == {"committed": 13, "gen": 8, "async": 2, "overlap": 4}
    # an answer of 30 tokens from position 24 ends before 54: 59, 57 and 67 (EOS tail) are not counted
    assert lane_shares(ONE_ROW, answer_tokens=30) == {"committed": 9, "gen": 5, "async": 0, "overlap": 1}


def test_a_killed_refine_lane_is_open_until_its_kill():
    from eval.timeline import lane_shares

    trace = [
        {"iteration": 0, "lanes": [{"id": 0, "kind": "GEN", "block": [0, 8], "committed": [0, 3]}],
         "forks": [{"parent": 0, "at": 3, "ref": 1, "gen": 2}], "kills": []},
        {"iteration": 1, "lanes": [{"id": 1, "kind": "REF", "block": [0, 4], "committed": [1]},
                                   {"id": 2, "kind": "GEN", "block": [4, 12], "committed": [5]}], "forks": [], "kills": []},
        {"iteration": 2, "lanes": [{"id": 2, "kind": "GEN", "block": [4, 12], "committed": [6]}],
         "forks": [], "kills": [1]},
    ]
    # lane 1 did not run at 2 but was open until its kill there: 5 is async (open after 1), 6 overlaps
    assert lane_shares(trace) == {"committed": 5, "gen": 4, "async": 1, "overlap": 2}


def test_run_lane_shares_pools_single_and_pooled_records(tmp_path):
    from eval.timeline import run_lane_shares

    recs = [{"example_ids": ["a"], "trace": ONE_ROW, "info": {}},
            {"example_ids": ["b", "c"], "trace": [ONE_ROW, []], "info": {"rows": [{}, {}]}},
            {"example_ids": ["d", "e"], "trace": ONE_ROW, "info": {}}]  # natively batched: one trace, skipped
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = run_lane_shares(tmp_path)
    assert got == {"committed": 24, "gen": 14, "async": 2, "overlap": 6, "examples": 2,
                   "async_share": 2 / 24, "overlap_share": 6 / 24}
    recs[0]["info"] = {"stitched": [0] * 30}  # the answer's tokens: positions from 54 on are EOS tail
    (tmp_path / "traces.jsonl").write_text(json.dumps(recs[0]) + "\n")
    assert run_lane_shares(tmp_path)["committed"] == 9
    (tmp_path / "traces.jsonl").write_text(json.dumps({"example_ids": ["x"], "trace": [{"iteration": 0}]}) + "\n")
    assert run_lane_shares(tmp_path) is None
