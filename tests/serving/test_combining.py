"""serving.combining.Combiner: one group at a time, run by a caller, in queue order; errors per entry or per group."""

from __future__ import annotations

import threading
import time

import pytest

from serving.combining import Combiner


class Refused(Exception):
    pass


def test_a_lone_caller_runs_its_own_work_in_its_own_thread():
    threads = []

    def run_group(group):
        threads.append(threading.get_ident())
        for entry in group:
            entry.result = entry.payload * 2

    combiner = Combiner(run_group)
    assert [combiner.run(i) for i in range(3)] == [0, 2, 4]
    assert threads == [threading.get_ident()] * 3


def test_work_queued_during_a_group_runs_as_the_next_group_in_order():
    groups, order = [], []
    running = threading.Lock()

    def run_group(group):
        assert running.acquire(blocking=False), "two groups ran at once"
        groups.append(len(group))
        order.extend(entry.payload for entry in group)
        time.sleep(0.01)  # slow work: callers queue behind it
        for entry in group:
            entry.result = entry.payload
        running.release()

    combiner = Combiner(run_group)
    results = {}

    def caller(t):
        for i in range(10):
            results[(t, i)] = combiner.run((t, i))

    callers = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert results == {(t, i): (t, i) for t in range(8) for i in range(10)}
    assert sum(groups) == 80 and max(groups) > 3 and len(groups) < 40
    for t in range(8):  # each caller's work in its order
        assert [p for p in order if p[0] == t] == [(t, i) for i in range(10)]


def test_an_entry_error_fails_that_caller_alone_and_a_group_error_fails_the_group():
    gate = threading.Event()

    def run_group(group):
        gate.wait(5)
        if any(entry.payload == "break the group" for entry in group):
            raise Refused("the whole group")
        for entry in group:
            if entry.payload == "bad":
                entry.error = Refused("this one")
            else:
                entry.result = entry.payload

    combiner = Combiner(run_group)
    outcomes = {}

    def caller(payload):
        try:
            outcomes[payload] = combiner.run(payload)
        except Refused as exc:
            outcomes[payload] = str(exc)

    leader = threading.Thread(target=caller, args=("first",))
    leader.start()
    time.sleep(0.1)  # "first" leads and waits on the gate; the rest queue as one group
    others = [threading.Thread(target=caller, args=(p,)) for p in ("ok", "bad")]
    for t in others:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in [leader, *others]:
        t.join()
    assert outcomes == {"first": "first", "ok": "ok", "bad": "this one"}
    with pytest.raises(Refused, match="the whole group"):
        combiner.run("break the group")
    assert combiner.run("after") == "after"  # the combiner is free again


def test_a_caller_not_taken_within_the_timeout_gets_the_timeout_error():
    release = threading.Event()

    def run_group(group):
        release.wait(5)
        for entry in group:
            entry.result = entry.payload

    combiner = Combiner(run_group, timeout_s=0.2, on_timeout=lambda: Refused("no turn"))
    leader = threading.Thread(target=combiner.run, args=("slow",))
    leader.start()
    time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(Refused, match="no turn"):
        combiner.run("waits")
    assert 0.1 < time.monotonic() - start < 2
    release.set()
    leader.join()
    assert combiner.run("next") == "next"  # the timed-out entry left no trace in the queue
