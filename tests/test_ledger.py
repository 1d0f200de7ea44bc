"""The ledger: round trip, derived fields, concurrent appends, damaged lines."""

import json
import multiprocessing as mp

import pytest

from profiling.hardware import DevicePeak
from profiling.ledger import Ledger, Record, make_record, read_ledgers, supersede_lines
from profiling.measure import FlopCount


def _record(i: int = 0, **kw) -> Record:
    base = dict(
        kind="train",
        count=FlopCount({"dense": 600, "attention": 60 + i}),
        params={"dense": 10, "embedding": 5},
        tokens=10,
        wall_s=2.0,
        peak=DevicePeak("cpu", "fp32", 1000.0, "test"),
        shape="B=1 T=1 H=4 W=4",
        step=i,
    )
    return make_record(**(base | kw))


def test_round_trip_and_derived_fields(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.jsonl")
    rec = _record()
    ledger.append(rec)
    ledger.append(_record(1, kind="infer", request_id="req-1"))
    data = read_ledgers([ledger.path])
    assert data.skipped == 0 and len(data.records) == 2
    back = data.records[0]
    assert back == rec
    # law = 6 * N * D with N = 10 (embedding excluded), D = 10 -> 600; measured 660
    assert back.law_flops == 600 and back.ratio == pytest.approx(1.1)
    assert back.flops_per_s == 330 and back.mfu == pytest.approx(0.33)
    assert data.records[1].law_flops == 2 * 10 * 10 and data.records[1].request_id == "req-1"
    raw = json.loads(ledger.path.read_text().splitlines()[0])
    assert {
        "measured_flops",
        "law_flops",
        "ratio",
        "tokens",
        "wall_s",
        "flops_per_s",
        "mfu",
        "device",
        "dtype",
        "shape",
    } <= raw.keys()


def _writer(path: str, worker: int, n: int) -> None:
    ledger = Ledger(path)
    for i in range(n):
        ledger.append(_record(worker * 1000 + i, shape="x" * 3000))  # long lines: > PIPE_BUF


def test_concurrent_appends_from_processes(tmp_path):
    path = str(tmp_path / "ledger.jsonl")
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = read_ledgers([path])
    assert data.skipped == 0
    assert sorted(r.step for r in data.records) == sorted(w * 1000 + i for w in range(4) for i in range(150))


def test_damaged_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(_record(0))
    with open(path, "a") as f:
        f.write('{"kind": "train", "measured_fl\n')  # a writer killed mid-line
        f.write("not json\n\n")
    ledger.append(_record(1))
    data = read_ledgers([path])
    assert [r.step for r in data.records] == [0, 1] and data.skipped == 2


def test_supersede_lines_moves_what_a_restart_redoes_and_loses_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for i in range(1, 6):
        ledger.append(_record(i))
    ledger.append(_record(9, kind="infer", request_id="r"))
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 5, "meas')  # cut by a kill mid-write: no newline
    moved = supersede_lines(path, lambda r: r["kind"] == "train" and r["step"] > 3)
    assert moved == 2
    data = read_ledgers([path])
    assert [(r.kind, r.step) for r in data.records] == [("train", 1), ("train", 2), ("train", 3), ("infer", 9)]
    assert data.skipped == 1  # the cut line stays, counted, and ends in a newline: the next append is intact
    ledger.append(_record(4))
    assert read_ledgers([path]).records[-1].step == 4
    aside = read_ledgers([tmp_path / "ledger.superseded.jsonl"])
    assert [r.step for r in aside.records] == [4, 5] and aside.skipped == 0
    assert supersede_lines(tmp_path / "absent.jsonl", lambda r: True) == 0
