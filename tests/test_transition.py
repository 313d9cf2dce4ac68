"""Make-before-break transitions (pure, table-driven)."""

import pytest

from faasmoe.router.control.transition import transition

CASES = [
    # name, routed, leased, plan, drop, deploy, release, routes_during
    ("first placement", {}, {}, {"f": ["a"], "g": ["b"]},
     [], [("f", "a"), ("g", "b")], [], {}),
    ("nothing changes", {"f": ["a"]}, {"f": ["a"]}, {"f": ["a"]}, [], [], [], {"f": ("a",)}),
    ("a move deploys first, releases after", {"f": ["a"]}, {"f": ["a"]}, {"f": ["b"]},
     [], [("f", "b")], [("f", "a")], {"f": ("a",)}),
    ("a dropped replica goes first and stops being routed", {"f": ["a", "b"]}, {"f": ["a", "b"]}, {"f": ["a"]},
     [("f", "b")], [], [], {"f": ("a",)}),
    ("replica dropped while the function also moves", {"f": ["a", "b"]}, {"f": ["a", "b"]}, {"f": ["b", "c"]},
     [("f", "a")], [("f", "c")], [], {"f": ("b",)}),
    ("a copy held by another router only needs a lease", {"f": []}, {}, {"f": ["a"]},
     [], [("f", "a")], [], {}),
    ("a staying copy is routed while a dropped one goes, even if it was not routed before",
     {"f": ["a"]}, {"f": ["a", "b"]}, {"f": ["b"]}, [("f", "a")], [], [], {"f": ("b",)}),
    ("a function no longer in the plan is released after", {"f": ["a"], "g": ["a"]}, {"f": ["a"], "g": ["a"]},
     {"f": ["a"]}, [], [], [("g", "a")], {"f": ("a",), "g": ("a",)}),
]


@pytest.mark.parametrize("name, routed, leased, plan, drop, deploy, release, during", CASES,
                         ids=[c[0] for c in CASES])
def test_transition(name, routed, leased, plan, drop, deploy, release, during):
    t = transition(routed, leased, plan)
    assert list(t.drop) == drop
    assert list(t.deploy) == deploy
    assert list(t.release) == release
    assert t.routes_during == during
    assert t.routes_after == {fid: tuple(sorted(n)) for fid, n in plan.items()}
    assert t.changes == bool(drop or deploy or release)
