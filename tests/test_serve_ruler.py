"""The RULER-style harness (serve/ruler.py): every task's prompt holds what its answer is scored
against, placed from the depth on, and the harness runs end to end over HTTP."""

from __future__ import annotations

import random

import pytest

from serve.needle import Client
from serve.ruler import TASKS, WORDS, Case, _insert, main, make_case
from test_serve_api import API_KEY, client, model_name, server, smollm2, tiny_model  # noqa: F401  (fixtures)


def test_a_case_scores_the_fraction_of_expected_items_as_whole_words():
    case = Case("multivalue", 512, 0.0, ["1234567", "7654321"], answer="The numbers are 1234567 and 76543210.")
    assert case.score == 0.5  # 76543210 is not 7654321


def test_items_are_placed_at_their_depths_in_order():
    filler = [f"s{i}." for i in range(10)]
    text = _insert(filler, [(1.0, "END."), (0.0, "START."), (0.5, "MID.")])
    assert text.split() == ["START.", *filler[:5], "MID.", *filler[5:], "END."]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_fills_its_length_and_holds_its_answer(server, task):
    live = Client(server.url, API_KEY, None, 60)
    case = make_case(live, task, 240, 0.5, random.Random(1))
    text = case.messages[-1]["content"]
    assert 0.7 * 240 < case.prompt_tokens <= 240 and all(e in text for e in case.expected)
    if task == "vartrack":  # the chain, in order, from the depth on
        first = text.index(f"VAR {case.expected[0]} =")
        assert first > len(text) // 3 and all(text.index(f"VAR {v} =") > first for v in case.expected[1:])
    if task == "commonwords":  # the expected words are the five most frequent
        counts = {w: text.split().count(w) for w in WORDS}
        assert set(case.expected) == set(sorted(counts, key=counts.get, reverse=True)[:5])


def test_the_harness_runs_end_to_end_and_draws_a_heatmap_per_task(server, tmp_path, capsys):
    assert (
        main(
            [
                "--url",
                server.url,
                "--api-key",
                API_KEY,
                "--lengths",
                "160,240",
                "--depths",
                "0,1",
                "--max-tokens",
                "4",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert all(f"### {t}" in out for t in TASKS) and "| 240 |" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{t}.png" for t in TASKS)
    with pytest.raises(SystemExit):
        main(["--url", server.url, "--api-key", API_KEY, "--tasks", "qa"])
