"""`tandem bench soak` on the tiny fixtures: a short soak with faults against a real `tandem serve` process, one
request at a time and batched, and the soak's checks themselves."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter

import pytest

from tandem.benchmarks.soak import SoakOptions, run_soak, table
from tandem.benchmarks.soak_checks import ProcSample, accounting, metrics, resources
from tandem.benchmarks.soak_plan import ABANDON, BAD_INPUTS, DISCONNECT, Outcome, make_plan


@pytest.mark.parametrize("parallel", [1, 4])
def test_short_soak_loses_nothing_leaks_nothing_and_metrics_agree(tiny, tmp_path, parallel):
    opts = SoakOptions(requests=60, concurrency=4, parallel=parallel, model=str(tiny["main"]),
                       draft=str(tiny["draft_close"]), warmup=12, settle=20.0, rss_growth=-1.0,
                       out=str(tmp_path / "soak.json"))
    result = run_soak(opts)
    failed = [c for c in result.checks if not c["ok"]]
    assert not failed, table(result)
    names = {c["name"] for c in result.checks}
    assert {"every request answered once", "greedy and seeded texts under load equal the request alone",
            "open fds back to baseline", "threads back to baseline",
            "tandem_requests_total by endpoint and status = the client's"} <= names
    assert not any(n.startswith("RSS") for n in names)  # too noisy over 60 requests
    total = Counter()
    for row in result.counts.values():
        total.update(row)
    assert total["sent"] == 60 == total["completed"] + total["disconnected"] + total["abandoned"] + sum(
        v for k, v in total.items() if k.startswith("HTTP"))
    # the plan of seed 0 holds every kind of traffic, so each check above had something to check
    assert total["disconnected"] > 0 and total["seeded"] > 0 and total["greedy"] > 0
    assert any(k.startswith("bad: ") for k in result.counts) and "chat stream" in result.counts
    assert result.after["fds"] <= result.baseline["fds"] and result.after["threads"] <= result.baseline["threads"]
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["counts"] == result.counts and saved["server"][-1] == "--exact"
    assert f"--parallel {parallel}" in " ".join(saved["server"])


def test_the_plan_is_drawn_from_the_seed_and_mixes_every_fault():
    a = make_plan(2000, 7, max_tokens=24, bad_share=0.1, disconnect_share=0.1)
    assert a == make_plan(2000, 7, max_tokens=24, bad_share=0.1, disconnect_share=0.1)
    assert a != make_plan(2000, 8, max_tokens=24, bad_share=0.1, disconnect_share=0.1)
    faults = Counter(s.fault for s in a)
    assert set(faults) == {None, DISCONNECT, ABANDON, *BAD_INPUTS}
    assert all(s.max_tokens == 256 and not s.stream for s in a if s.fault == ABANDON)
    assert 150 < sum(n for f, n in faults.items() if f in BAD_INPUTS) < 250 and 120 < faults[DISCONNECT] < 280
    assert all(1 <= s.cut <= s.max_tokens // 2 for s in a if s.fault == DISCONNECT)
    assert {s.draft for s in a} == {"default", "named", "none"} and {s.endpoint for s in a} == {"chat", "completion"}


def _done(shot, **kw) -> Outcome:
    return Outcome(shot, "completed", 200, shot.path, "text", "length", 3, shot.max_tokens,
                   response_id=f"id{shot.index}", **kw)


def test_the_checks_catch_lost_duplicated_and_miscounted_requests():
    shots = [s for s in make_plan(40, 0, max_tokens=6, bad_share=0.0, disconnect_share=0.0) if not s.stream][:3]
    shots = [dataclasses.replace(s, index=i) for i, s in enumerate(shots)]
    good = [_done(s) for s in shots]
    assert all(c.ok for c in accounting(good, 3))
    lost = [good[0], good[1], Outcome(shots[2], "lost", None, shots[2].path, detail="ReadError")]
    assert [c.ok for c in accounting(lost, 3)][:2] == [False, False]
    twice = [good[0], good[1], good[1]]
    assert not accounting(twice, 3)[0].ok
    same_id = [good[0], good[1], dataclasses.replace(good[2], response_id="id0")]
    assert not accounting(same_id, 3)[0].ok
    before = {("tandem_requests_total", (("endpoint", shots[0].path), ("status", "200"))): 5.0}
    after = {("tandem_requests_total", (("endpoint", shots[0].path), ("status", "200"))): 7.0}
    counted = {c.name.split()[0]: c.ok for c in metrics(good, before, after, {})}
    assert not counted["tandem_requests_total"]  # 2 counted, 3 answered
    assert not counted["tandem_generations_total"]  # none counted
    grown = resources(ProcSample(1000, 10, 4), ProcSample(1100, 11, 5), 0.05)
    assert [c.ok for c in grown] == [False, False, False]
    assert all(c.ok for c in resources(ProcSample(1000, 10, 4), ProcSample(1040, 9, 4), 0.05))


def test_soak_options_are_checked():
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "soak", "--requests", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--requests must be at least 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tandem", "bench", "soak", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--disconnect-share" in r.stdout and "--parallel" in r.stdout
