"""Table-driven tests of the pure per-layer grouping decision."""

import numpy as np
import pytest

from faasmoe.proto.errors import FunctionNotFound
from faasmoe.router.mesh.grouping import LayerFunctions, plan_layer

FUNCS = LayerFunctions({"fA": (0, 1), "fB": (2, 3), "fC": (4, 5)})


def pairs_of(batches):
    """(expert, token, slot) triples a plan covers, with the row each is read from."""
    seen = []
    for b in batches:
        for seg in b.segments:
            call = b.calls[seg.call_index]
            rows = np.asarray(call.rows)[seg.start:seg.start + len(seg.tokens)]
            assert np.array_equal(b.token_rows[rows], seg.tokens)     # rows point at the right tokens
            seen += [(seg.expert_id, int(t), int(s)) for t, s in zip(seg.tokens, seg.slots)]
    return sorted(seen)


CASES = [
    # id, top_k_index, node_of, expected rpc count, expected rows per node
    ("one-token-one-node", [[0, 1]], {"fA": "n1", "fB": "n1", "fC": "n1"}, 1, {"n1": 1}),
    ("one-token-two-nodes", [[0, 2]], {"fA": "n1", "fB": "n2", "fC": "n1"}, 2, {"n1": 1, "n2": 1}),
    ("dedupe-rows-per-node", [[0, 1], [1, 4]], {"fA": "n1", "fB": "n2", "fC": "n1"}, 1, {"n1": 2}),
    ("three-nodes", [[0, 2], [4, 3], [5, 1]], {"fA": "n1", "fB": "n2", "fC": "n3"}, 3,
     {"n1": 2, "n2": 2, "n3": 2}),
]


@pytest.mark.parametrize("idx,node_of,rpcs,rows", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_covers_every_pair_once(idx, node_of, rpcs, rows):
    idx = np.array(idx)
    batches = plan_layer(idx, FUNCS, node_of)
    assert len(batches) == rpcs
    assert {b.node_id: len(b.token_rows) for b in batches} == rows
    expected = sorted((int(e), t, s) for t in range(idx.shape[0]) for s, e in enumerate(idx[t]))
    assert pairs_of(batches) == expected


def test_counts_follow_function_expert_order_and_slot_token_order():
    idx = np.array([[1, 0], [0, 1], [1, 0]])
    (batch,) = plan_layer(idx, FUNCS, {"fA": "n", "fB": "n", "fC": "n"})
    (call,) = batch.calls
    assert call.function_id == "fA" and tuple(call.expert_row_counts) == (3, 3)
    seg0 = batch.segments[0]
    assert seg0.expert_id == 0
    # expert 0 is in slot 1 for tokens 0 and 2, slot 0 for token 1: (slot, token) order
    assert list(zip(seg0.slots.tolist(), seg0.tokens.tolist())) == [(0, 1), (1, 0), (1, 2)]


def test_pair_mask_limits_the_plan():
    idx = np.array([[0, 2], [4, 3]])
    mask = np.array([[False, True], [False, False]])
    batches = plan_layer(idx, FUNCS, {"fA": "n1", "fB": "n2", "fC": "n3"}, pair_mask=mask)
    assert pairs_of(batches) == [(2, 0, 1)]


def test_unknown_expert_is_a_clear_error():
    with pytest.raises(FunctionNotFound, match="expert 7"):
        plan_layer(np.array([[7, 0]]), FUNCS, {"fA": "n1", "fB": "n1", "fC": "n1"}, layer=3)


REPLICA_CASES = [
    # id, needed, replicas, turn, compact, expected
    ("single-replicas-forced", ["a", "b"], {"a": ["n1"], "b": ["n2"]}, 0, True, {"a": "n1", "b": "n2"}),
    ("compact-one-node-covers-all", ["a", "b", "c"], {"a": ["n1", "n2"], "b": ["n2", "n3"], "c": ["n2"]}, 0, True,
     {"a": "n2", "b": "n2", "c": "n2"}),
    ("compact-two-nodes", ["a", "b", "c"], {"a": ["n1"], "b": ["n1", "n2"], "c": ["n2", "n3"]}, 0, True,
     {"a": "n1", "b": "n1", "c": "n2"}),
    ("compact-ties-rotate", ["a"], {"a": ["n1", "n2"]}, 1, True, {"a": "n2"}),
    ("spread-rotates", ["a", "b"], {"a": ["n1", "n2"], "b": ["n2", "n3"]}, 1, False, {"a": "n2", "b": "n3"}),
    ("no-replica-left-out", ["a", "b"], {"a": ["n1"], "b": []}, 0, True, {"a": "n1"}),
]


@pytest.mark.parametrize("needed,replicas,turn,compact,expected", [c[1:] for c in REPLICA_CASES],
                         ids=[c[0] for c in REPLICA_CASES])
def test_choose_replicas(needed, replicas, turn, compact, expected):
    from faasmoe.router.mesh.grouping import choose_replicas
    assert choose_replicas(needed, replicas, turn, compact) == expected


def _as_tuple(batches):
    return [(b.node_id, b.token_rows.tolist(),
             [(c.function_id, np.asarray(c.rows).tolist(), tuple(c.expert_row_counts)) for c in b.calls],
             [(s.expert_id, s.call_index, s.start, s.tokens.tolist(), s.slots.tolist()) for s in b.segments])
            for b in batches]


@pytest.mark.parametrize("seed", range(12))
def test_small_step_path_plans_exactly_like_the_numpy_path(seed, monkeypatch):
    """Decode-sized steps take a plain-Python path; it must give the very same batches."""
    import faasmoe.router.mesh.grouping as grouping
    rng = np.random.default_rng(seed)
    funcs = LayerFunctions({f"f{i}": tuple(range(3 * i, 3 * i + 3)) for i in range(5)})     # 15 experts
    nodes = ["n1", "n2", "n3"]
    node_of = {f"f{i}": nodes[int(rng.integers(3))] for i in range(5)}
    n_tokens = int(rng.integers(1, 9))
    idx = np.stack([rng.choice(15, size=4, replace=False) for _ in range(n_tokens)])
    mask = rng.random(idx.shape) < 0.7 if seed % 2 else None
    small = plan_layer(idx, funcs, node_of, pair_mask=mask)
    monkeypatch.setattr(grouping, "SMALL_STEP_PAIRS", 0)
    assert _as_tuple(small) == _as_tuple(plan_layer(idx, funcs, node_of, pair_mask=mask))


@pytest.mark.parametrize("small", [True, False])
def test_unknown_expert_fails_the_same_on_both_paths(small, monkeypatch):
    import faasmoe.router.mesh.grouping as grouping
    if not small:
        monkeypatch.setattr(grouping, "SMALL_STEP_PAIRS", 0)
    with pytest.raises(FunctionNotFound, match="layer 2: no function holds expert 9"):
        plan_layer(np.array([[9, 0]]), FUNCS, {"fA": "n1", "fB": "n1", "fC": "n1"}, layer=2)
