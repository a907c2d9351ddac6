"""
model/tuning.py: levers chosen by measurement. The timings are injected (a fake clock that each candidate
advances by its own cost), so these tests check the choosing, never this machine's speed.
"""

import json

import pytest
import torch

from model.tuning import Fixed, Tuner, machine_name


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def candidate(clock, seconds, value=1.0, calls=None, name=None, fail=False):
    """A candidate that 'takes' `seconds` on the fake clock and returns a tensor of `value`; counts its calls."""
    def run():
        if calls is not None:
            calls[name] = calls.get(name, 0) + 1
        clock.now += seconds
        if fail:
            raise RuntimeError("no such primitive")
        return torch.full((4,), value)
    return run


def tuner(clock, **kw):
    return Tuner(cache=None, clock=clock, **kw)


def test_the_faster_candidate_wins_and_is_remembered():
    clock, calls = FakeClock(), {}
    t = tuner(clock)
    cands = {"plain": candidate(clock, 0.010, calls=calls, name="plain"),
             "prepacked": candidate(clock, 0.004, calls=calls, name="prepacked")}
    name, out = t.run("conv a", cands)
    assert name == "prepacked" and torch.equal(out, torch.ones(4))
    assert t.timings["conv a"] == {"plain": pytest.approx(0.010), "prepacked": pytest.approx(0.004)}
    measured = dict(calls)
    assert measured["plain"] >= 2 and measured["prepacked"] >= 2        # a warm-up, then timed calls
    assert t.run("conv a", cands)[0] == "prepacked"                      # later calls: the winner only
    assert calls == {**measured, "prepacked": measured["prepacked"] + 1}
    assert t.spent_s == pytest.approx(sum(n * s for n, s in ((measured["plain"], 0.010),
                                                              (measured["prepacked"], 0.004))))


@pytest.mark.parametrize("other_s", [0.020, 0.010, 0.0099])   # slower, equal, faster within the 3% margin
def test_plain_keeps_it_unless_another_is_clearly_faster(other_s):
    clock = FakeClock()
    t = tuner(clock)
    name, _ = t.run("k", {"plain": candidate(clock, 0.010), "prepacked": candidate(clock, other_s)})
    assert name == "plain"


def test_a_candidate_that_fails_its_probe_falls_back_to_plain():
    clock = FakeClock()
    t = tuner(clock)
    # raises: dropped, plain runs
    name, out = t.run("raises", {"plain": candidate(clock, 0.01, value=2.0),
                                 "prepacked": candidate(clock, 0.001, fail=True)})
    assert name == "plain" and torch.equal(out, torch.full((4,), 2.0))
    # faster but computes something else: dropped
    name, out = t.run("wrong", {"plain": candidate(clock, 0.01, value=2.0),
                                "prepacked": candidate(clock, 0.001, value=2.1)})
    assert name == "plain" and torch.equal(out, torch.full((4,), 2.0))
    # round-off only (1e-6 relative): kept
    assert t.run("close", {"plain": candidate(clock, 0.01, value=2.0),
                           "prepacked": candidate(clock, 0.001, value=2.0 + 2e-6)})[0] == "prepacked"
    # wrong in the last column of a 4-d output only (a border bug): still caught
    ref = torch.randn(2, 3, 200, 131)
    bad = ref.clone()
    bad[..., -1] += 1
    def timed(seconds, value):
        def run():
            clock.now += seconds
            return value.clone()
        return run
    assert t.run("border", {"plain": timed(0.01, ref), "prepacked": timed(0.001, bad)})[0] == "plain"
    assert t.run("border ok", {"plain": timed(0.01, ref), "prepacked": timed(0.001, ref)})[0] == "prepacked"
    with pytest.raises(RuntimeError, match="no such primitive"):      # the reference itself must work
        t.run("broken", {"plain": candidate(clock, 0.01, fail=True), "prepacked": candidate(clock, 0.001)})


def test_a_hopeless_candidate_is_timed_once():
    clock, calls = FakeClock(), {}
    t = tuner(clock, give_up=4.0)
    t.run("k", {"plain": candidate(clock, 0.001, calls=calls, name="plain"),
                "prepacked": candidate(clock, 0.050, calls=calls, name="prepacked")})
    assert calls["prepacked"] == 2          # the warm-up and one timed call, 50x the best: no more
    assert calls["plain"] == 7              # cheap: a warm-up, `repeats` timed calls, then once for the output


def test_measuring_stops_at_its_budget_and_later_shapes_run_plain_unmeasured():
    clock, calls = FakeClock(), {}
    t = tuner(clock, budget_s=0.1)
    slow, fast = candidate(clock, 0.03, calls=calls, name="plain"), candidate(clock, 0.01, calls=calls, name="fast")
    assert t.run("first", {"plain": slow, "fast": fast})[0] == "fast"
    assert t.spent_s >= 0.1
    calls.clear()
    assert t.run("second", {"plain": slow, "fast": fast})[0] == "plain"
    assert calls == {"plain": 1}            # nothing measured: just the reference, once
    assert t.unmeasured == {"second"}


def test_choices_are_kept_in_the_cache_for_this_machine_only(tmp_path):
    path = tmp_path / "tuning.json"
    clock = FakeClock()
    first = Tuner(cache=path, clock=clock)
    first.run("k1", {"plain": candidate(clock, 0.01), "prepacked": candidate(clock, 0.002)})
    first.run("k2", {"plain": candidate(clock, 0.002), "prepacked": candidate(clock, 0.01)})
    data = json.loads(path.read_text())
    assert data == {machine_name(): {"k1": "prepacked", "k2": "plain"}}

    calls = {}
    second = Tuner(cache=path, clock=clock)            # a restart: nothing measured again
    name, _ = second.run("k1", {"plain": candidate(clock, 0.01, calls=calls, name="plain"),
                                "prepacked": candidate(clock, 0.002, calls=calls, name="prepacked")})
    assert name == "prepacked" and calls == {"prepacked": 1} and second.spent_s == 0

    # another machine's section is not believed here, and is kept when this machine writes
    path.write_text(json.dumps({"Other CPU | AVX2 | torch 2.13.0 | 2 threads": {"k3": "prepacked"}}))
    third = Tuner(cache=path, clock=clock)
    assert third.run("k3", {"plain": candidate(clock, 0.01), "prepacked": candidate(clock, 0.011)})[0] == "plain"
    assert set(json.loads(path.read_text())) == {"Other CPU | AVX2 | torch 2.13.0 | 2 threads", machine_name()}


def test_a_broken_or_unwritable_cache_costs_a_measurement_nothing_else(tmp_path):
    clock = FakeClock()
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    t = Tuner(cache=path, clock=clock)
    assert t.run("k", {"plain": candidate(clock, 0.01), "prepacked": candidate(clock, 0.001)})[0] == "prepacked"
    assert json.loads(path.read_text()) == {machine_name(): {"k": "prepacked"}}   # rewritten whole
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    t = Tuner(cache=blocked / "tuning.json", clock=clock)    # its folder cannot be made
    assert t.run("k", {"plain": candidate(clock, 0.01), "prepacked": candidate(clock, 0.001)})[0] == "prepacked"


def test_the_cache_location_follows_sd_tune_cache(monkeypatch, tmp_path):
    from model.tuning import default_cache_path

    monkeypatch.setenv("SD_TUNE_CACHE", str(tmp_path / "t.json"))
    assert default_cache_path() == tmp_path / "t.json"
    monkeypatch.setenv("SD_TUNE_CACHE", "off")
    assert default_cache_path() is None and Tuner().cache is None
    monkeypatch.delenv("SD_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "sd-from-scratch" / "tuning.json"


def test_fixed_answers_without_measuring():
    clock, calls = FakeClock(), {}
    f = Fixed("prepacked")
    assert f.run("k", {"plain": candidate(clock, 1, calls=calls, name="plain"),
                       "prepacked": candidate(clock, 1, calls=calls, name="prepacked")})[0] == "prepacked"
    assert calls == {"prepacked": 1}
    assert f.run("k", {"plain": candidate(clock, 1)})[0] == "plain"     # no such candidate: the reference
