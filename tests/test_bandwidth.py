"""The STREAM-style memory bandwidth probe (profiling.bandwidth): positive, cached, marked."""

import json
import math

import pytest

from profiling import bandwidth, cpu
from profiling.load import Load

SMALL = 1 << 20  # one MiB arrays: cache-resident, so no bandwidth figure, but quick


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache for the test; the once-per-process warnings forgotten before."""
    monkeypatch.setenv("MINISTACK_CACHE", str(tmp_path))
    bandwidth._said.clear()
    cpu._said.clear()
    return tmp_path


def test_the_probe_is_positive_and_cached_with_its_load(cache, monkeypatch):
    bw = bandwidth.device_bandwidth("cpu", array_bytes=SMALL)
    assert bw.bytes_per_s > 1e8 and set(bw.kernels) == {"copy", "add"} and bw.bytes_per_s == max(bw.kernels.values())
    assert bw.array_bytes == SMALL and bw.load.others_cores is not None and " thread" in bw.device
    stored = json.loads(next(cache.glob("bandwidth-*.json")).read_text())
    assert stored["bytes_per_s"] == bw.bytes_per_s and stored["load"]["contended"] == bw.load.contended

    def no_probe(*args, **kwargs):
        raise AssertionError("the second call must read the cache")

    monkeypatch.setattr(bandwidth, "probe_bandwidth", no_probe)
    assert bandwidth.device_bandwidth("cpu").to_dict() == bw.to_dict()  # read back from the file, not probed
    assert bandwidth.cached_bandwidth(bw.device).to_dict() == bw.to_dict()
    assert bandwidth.cached_bandwidth("some other device") is None


def _fake(bytes_per_s: float, contended: bool, at: float) -> bandwidth.Bandwidth:
    load = Load(1.0, (0.0, 0.0, 0.0), 1.5 if contended else 0.0)
    return bandwidth.Bandwidth(bandwidth.device_name("cpu"), bytes_per_s, {"copy": bytes_per_s}, SMALL, at, load)


def test_a_contended_probe_is_said_redone_when_old_and_keeps_the_higher_figure(cache, monkeypatch, capsys):
    bandwidth._store(_fake(9e9, contended=True, at=0.0))  # old and contended: probed again
    monkeypatch.setattr(bandwidth, "probe_bandwidth", lambda device, array_bytes: _fake(5e9, contended=True, at=1e9))
    bw = bandwidth.device_bandwidth("cpu")
    assert bw.bytes_per_s == 9e9 and bw.measured_at == 1e9  # the higher figure stands; the new probe's time
    assert "probed while the machine was contended" in capsys.readouterr().err
    monkeypatch.setattr(bandwidth, "probe_bandwidth", lambda device, array_bytes: _fake(7e9, contended=False, at=2e9))
    assert bandwidth.device_bandwidth("cpu", reprobe=True).bytes_per_s == 7e9  # a quiet probe replaces it


def test_mbu_and_units():
    assert bandwidth.mbu(5e9, 1.0, 10e9) == 0.5
    assert math.isnan(bandwidth.mbu(5e9, 1.0, 0.0))
    assert bandwidth.format_bandwidth(3.35e12) == "3.35 TB/s" and bandwidth.format_bandwidth(11.6e9) == "11.6 GB/s"
    assert bandwidth.default_array_bytes("cpu") >= 4 * bandwidth.last_level_cache_bytes("cpu")
