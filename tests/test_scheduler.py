"""The step scheduler: a pure function over plain data (table-driven)."""

import pytest

from faasmoe.router.engine.scheduler import Limits, SeqView, plan_step

L = Limits(max_running=3, max_step_tokens=10, prefill_chunk=4)
CASES = [
    ("idle", [], [], L, [], []),
    ("one waiting short prompt joins whole", [], [(1, 3)], L, [(1, 3)], [1]),
    ("a long prompt is chunked", [], [(1, 9)], L, [(1, 4)], [1]),
    ("decodes first, then prefill chunks within budget", [(1, 0), (2, 0)], [(3, 20), (4, 20)], L,
     [(1, 1), (2, 1), (3, 4)], [3]),
    ("batch full: nobody joins", [(1, 0), (2, 0), (3, 0)], [(4, 2)], L, [(1, 1), (2, 1), (3, 1)], []),
    ("running prefill continues before newcomers", [(1, 5), (2, 0)], [(3, 2)], L,
     [(2, 1), (1, 4), (3, 2)], [3]),
    ("budget cuts a newcomer's first chunk", [], [(1, 4), (2, 4), (3, 4)], L, [(1, 4), (2, 4), (3, 2)], [1, 2, 3]),
    ("no budget left: waiting stays waiting", [(1, 4), (2, 4)], [(3, 1)],
     Limits(max_running=4, max_step_tokens=8, prefill_chunk=4), [(1, 4), (2, 4)], []),
    ("waiting order is kept", [], [(7, 1), (5, 1), (6, 1)], L, [(7, 1), (5, 1), (6, 1)], [7, 5, 6]),
    ("decodes run even when prefills use the budget", [(1, 0), (2, 9)], [],
     Limits(max_running=2, max_step_tokens=2, prefill_chunk=8), [(1, 1), (2, 1)], []),
    ("a newcomer joins while the KV cache has room", [(1, 0, 60)], [(2, 5, 40)],
     Limits(max_running=4, max_step_tokens=16, prefill_chunk=8, cache_tokens=100), [(1, 1), (2, 5)], [2]),
    ("a newcomer that does not fit the KV cache waits, and so do the ones behind it", [(1, 0, 60)],
     [(2, 5, 50), (3, 1, 10)], Limits(max_running=4, max_step_tokens=16, prefill_chunk=8, cache_tokens=100),
     [(1, 1)], []),
    ("two newcomers fill the cache exactly", [], [(2, 5, 50), (3, 1, 50), (4, 1, 1)],
     Limits(max_running=4, max_step_tokens=16, prefill_chunk=8, cache_tokens=100), [(2, 5), (3, 1)], [2, 3]),
]


@pytest.mark.parametrize("name, running, waiting, limits, runs, admitted", CASES, ids=[c[0] for c in CASES])
def test_plan_step(name, running, waiting, limits, runs, admitted):
    plan = plan_step([SeqView(*r) for r in running], [SeqView(*w) for w in waiting], limits)
    assert list(plan.runs) == runs
    assert list(plan.admitted) == admitted
    assert plan.tokens <= limits.max_step_tokens and not plan.urgent


R = Limits(max_running=4, max_step_tokens=32, prefill_chunk=8, reserved_slots=1)
URGENT_CASES = [
    # name, running, waiting (id, prompt_left, reserve, urgent), last_urgent, runs, admitted, urgent step
    ("an urgent newcomer prefills alone; decodes wait one step", [(1, 0), (2, 0)], [(3, 5, 0, True)], False,
     [(3, 5)], [3], True),
    ("never two urgent steps in a row", [(1, 0), (2, 0)], [(3, 5, 0, True)], True,
     [(1, 1), (2, 1), (3, 5)], [3], False),
    ("the reserved place is not for the flooding tenant", [(1, 0), (2, 0), (3, 0)], [(4, 2), (5, 2)], False,
     [(1, 1), (2, 1), (3, 1)], [], False),
    ("... but an urgent one takes it", [(1, 0), (2, 0), (3, 0)], [(4, 2), (5, 2, 0, True)], False,
     [(5, 2)], [5], True),
    ("a full batch: the urgent one waits for a place", [(1, 0), (2, 0), (3, 0), (4, 0)], [(5, 2, 0, True)], False,
     [(1, 1), (2, 1), (3, 1), (4, 1)], [], False),
    ("no urgent ones: an ordinary step", [(1, 0)], [(2, 3), (3, 3)], False, [(1, 1), (2, 3), (3, 3)], [2, 3], False),
]


@pytest.mark.parametrize("name, running, waiting, last, runs, admitted, urgent", URGENT_CASES,
                         ids=[c[0] for c in URGENT_CASES])
def test_urgent_newcomers(name, running, waiting, last, runs, admitted, urgent):
    plan = plan_step([SeqView(*r) for r in running], [SeqView(*w) for w in waiting], R, last_urgent=last)
    assert (list(plan.runs), list(plan.admitted), plan.urgent) == (runs, admitted, urgent)


@pytest.mark.parametrize("kw", [dict(max_running=0), dict(max_step_tokens=4, max_running=8), dict(prefill_chunk=0)])
def test_bad_limits(kw):
    with pytest.raises(ValueError):
        Limits(**kw)
