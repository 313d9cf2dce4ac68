"""Table-driven tests of the pure placement function (router/placement.py) and its plan formatter."""

from __future__ import annotations

import json
import random
import time

import pytest

from faasmoe.proto.errors import ConfigError, PlacementError
from faasmoe.router.store.manifest import FunctionEntry
from faasmoe.router.control.placement import (MIB, FunctionSpec, NodeSpec, PlacementOptions, diff, layer_shares,
                                      place)
from faasmoe.router.control.placement_format import compact_names, format_plan, plan_to_dict

NO_REPLICAS = PlacementOptions(replicate=False)


def fns(layers: int, per_layer: int, size_mib: float = 10, loads: list[float] | None = None) -> list[FunctionSpec]:
    """``per_layer`` functions for each of ``layers`` layers, named like L03.E08-11 (group of 4)."""
    return [FunctionSpec(f"f{l:02d}{e:02d}", l, int(size_mib * MIB), loads[e] if loads else 0.0,
                         f"L{l:02d}.E{4 * e:02d}-{4 * e + 3:02d}")
            for l in range(layers) for e in range(per_layer)]


def nodes(*caps_mib: float, threads: list[int] | None = None) -> list[NodeSpec]:
    return [NodeSpec(f"n{i}", int(c * MIB), threads[i] if threads else 1) for i, c in enumerate(caps_mib)]


def check_valid(placement, functions, node_list, max_replicas: int = 2) -> None:
    """Hard constraints: every function on >= 1 known node, no duplicate copy, budgets hold."""
    by_id = {f.function_id: f for f in functions}
    assert set(placement) == set(by_id)
    known = {n.node_id for n in node_list}
    used = dict.fromkeys(known, 0)
    for fid, holders in placement.items():
        assert 1 <= len(holders) <= max_replicas
        assert len(set(holders)) == len(holders)
        assert set(holders) <= known
        for n in holders:
            used[n] += by_id[fid].bytes
    for n in node_list:
        assert used[n.node_id] <= n.capacity_bytes, n.node_id


def layer_counts(placement, functions, node_list) -> dict[int, list[int]]:
    counts: dict[int, list[int]] = {}
    for f in functions:
        row = counts.setdefault(f.layer, [0] * len(node_list))
        for i, n in enumerate(node_list):
            row[i] += n.node_id in placement[f.function_id]
    return counts


def node_loads(placement, functions, node_list) -> list[float]:
    shares = dict(zip((f.function_id for f in functions), layer_shares(functions)))
    return [round(sum(shares[f] / len(ns) for f, ns in placement.items() if n.node_id in ns) / n.threads, 9)
            for n in node_list]


# ------------------------------------------------------------------------------------------- feasibility

@pytest.mark.parametrize("functions,node_list", [
    pytest.param(fns(1, 4, 20), nodes(40, 40), id="fits-exactly-two-equal-nodes"),
    pytest.param(fns(2, 4, 20), nodes(120, 20, 20), id="fits-exactly-uneven-nodes"),
    pytest.param(fns(1, 3, 0), nodes(0, 5), id="zero-byte-functions"),
    pytest.param(fns(3, 5, 7), nodes(105), id="one-node-exactly"),
])
def test_fits(functions, node_list):
    placement = place(functions, node_list)
    check_valid(placement, functions, node_list)
    if sum(f.bytes for f in functions) == sum(n.capacity_bytes for n in node_list) > 0:
        assert all(len(ns) == 1 for ns in placement.values())      # no room for replicas


def test_no_functions_gives_empty_placement():
    assert place([], nodes(10)) == {}


@pytest.mark.parametrize("functions,node_list,error,expected", [
    pytest.param([FunctionSpec("a", 0, 812 * MIB)], nodes(200, 200, 200), PlacementError,
                 ["functions need 812.0 MiB", "the 3 nodes can hold 600.0 MiB", ">= 212.0 MiB",
                  "--memory-budget-mb"], id="shortfall"),
    pytest.param(fns(1, 1, 300) + fns(2, 1, 10)[1:], nodes(200, 200), PlacementError,
                 ["L00.E00-03", "300.0 MiB", "largest node (n1)", "200.0 MiB", "--group-size"],
                 id="one-function-bigger-than-every-node"),
    pytest.param(fns(1, 3, 60), nodes(100, 100), PlacementError,
                 ["cannot pack function L00.E", "60.0 MiB", "largest free space left is 40.0 MiB",
                  "add a node with >= 60.0 MiB"], id="bin-packing-fails"),
    pytest.param(fns(1, 2), [], PlacementError, ["no nodes", "--nodes"], id="no-nodes"),
    pytest.param(fns(1, 1) * 2, nodes(100), PlacementError, ["listed twice"], id="duplicate-function"),
    pytest.param(fns(1, 1), [NodeSpec("x", 10), NodeSpec("x", 10)], PlacementError, ["node x is listed twice"],
                 id="duplicate-node"),
    pytest.param([FunctionSpec("a", 0, 1, -0.5)], nodes(1), PlacementError, ["expected_load must be >= 0"],
                 id="negative-load"),
    pytest.param(fns(1, 1), [NodeSpec("x", 10 * MIB, threads=0)], PlacementError, ["threads >= 1"],
                 id="zero-threads"),
])
def test_errors_say_what_is_wrong(functions, node_list, error, expected):
    with pytest.raises(error) as info:
        place(functions, node_list)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("options,expected", [
    pytest.param(PlacementOptions(max_replicas=0), "max_replicas", id="zero-replicas"),
    pytest.param(PlacementOptions(replica_headroom_fraction=1.0), "replica_headroom_fraction", id="headroom-1"),
])
def test_bad_options_are_config_errors(options, expected):
    with pytest.raises(ConfigError, match=expected):
        place(fns(1, 1), nodes(100), options=options)


# ------------------------------------------------------------------------------------------- spread and load

@pytest.mark.parametrize("layers,per_layer,node_list", [
    pytest.param(1, 8, nodes(100, 100, 100, 100), id="1-layer-8-fns-4-nodes"),
    pytest.param(3, 7, nodes(100, 100, 100), id="3-layers-7-fns-3-nodes-uneven-split"),
    pytest.param(4, 6, nodes(200, 100, 300, threads=[4, 1, 2]), id="mixed-capacities-and-threads"),
    pytest.param(24, 60, nodes(*[1500] * 10), id="qwen-like-24x60-on-10"),
])
def test_spread_each_layer_evenly(layers, per_layer, node_list):
    functions = fns(layers, per_layer, 10)
    placement = place(functions, node_list, options=NO_REPLICAS)
    check_valid(placement, functions, node_list, max_replicas=1)
    for layer, row in layer_counts(placement, functions, node_list).items():
        assert max(row) - min(row) <= 1, (layer, row)


@pytest.mark.parametrize("loads,node_list,expected_loads", [
    pytest.param([.5, .2, .1, .1, .05, .05, 0, 0], nodes(100, 100), [0.55, 0.45], id="skewed-two-nodes"),
    pytest.param([.4, .3, .2, .1], nodes(100, 100, threads=[4, 1]), [0.7 / 4, 0.3],
                 id="hot-functions-go-to-the-4-thread-node"),
    pytest.param([1, 1, 1, 1], nodes(100, 100), [0.5, 0.5], id="uniform"),
    pytest.param([0, 0, 0, 0], nodes(100, 100), [0.5, 0.5], id="unknown-load-is-uniform"),
])
def test_load_balance_with_skewed_expected_load(loads, node_list, expected_loads):
    functions = fns(1, len(loads), 10, loads)
    placement = place(functions, node_list, options=NO_REPLICAS)
    assert node_loads(placement, functions, node_list) == pytest.approx(expected_loads)
    for row in layer_counts(placement, functions, node_list).values():
        assert max(row) - min(row) <= 1                          # balance never costs spread


@pytest.mark.parametrize("seed", range(5))
def test_load_balance_across_many_layers_is_near_ideal(seed):
    rng = random.Random(seed)
    functions = [FunctionSpec(f"{l:02d}-{e:02d}", l, MIB, rng.paretovariate(1.2))
                 for l in range(8) for e in range(16)]
    node_list = [NodeSpec(f"n{i}", 100 * MIB, rng.choice([1, 2, 4])) for i in range(4)]
    loads = node_loads(place(functions, node_list, options=NO_REPLICAS), functions, node_list)
    ideal = 8 / sum(n.threads for n in node_list)
    assert max(loads) <= ideal * 1.05


# ------------------------------------------------------------------------------------------- replication

@pytest.mark.parametrize("loads,node_list,options,hottest_copies,replicated", [
    pytest.param([.7, .1, .1, .1], nodes(100, 100), PlacementOptions(), 2, 4,
                 id="all-replicated-when-memory-allows"),
    pytest.param([.7, .1, .1, .1], nodes(30, 30), PlacementOptions(replica_headroom_fraction=0), 2, 2,
                 id="hottest-first-when-room-for-two"),
    pytest.param([.7, .1, .1, .1], nodes(20, 20), PlacementOptions(), 1, 0, id="none-when-memory-is-exact"),
    pytest.param([.7, .1, .1, .1], nodes(100, 100), NO_REPLICAS, 1, 0, id="none-when-disabled"),
    pytest.param([.7, .1, .1, .1], nodes(100, 100, 100), PlacementOptions(max_replicas=3), 3, 4,
                 id="three-copies-of-the-hottest"),
    pytest.param([.7, .3, 0, 0], nodes(100, 100), PlacementOptions(), 2, 2,
                 id="cold-functions-are-not-replicated"),
    pytest.param([.7, .1, .1, .1], nodes(30, 30), PlacementOptions(replica_headroom_fraction=0.1), 1, 0,
                 id="headroom-keeps-replicas-out"),
])
def test_replication(loads, node_list, options, hottest_copies, replicated):
    functions = fns(1, len(loads), 10, loads)
    placement = place(functions, node_list, options=options)
    check_valid(placement, functions, node_list, max_replicas=options.max_replicas)
    assert len(placement["f0000"]) == hottest_copies
    assert sum(len(ns) > 1 for ns in placement.values()) == replicated, placement


# ------------------------------------------------------------------------------------------- movement

MOVE_CASES = [
    pytest.param(fns(3, 8, 10), NO_REPLICAS, id="uniform-no-replicas"),
    pytest.param(fns(3, 8, 10, [.4, .2, .1, .1, .1, .05, .05, 0]), NO_REPLICAS, id="skewed-no-replicas"),
    pytest.param(fns(3, 8, 10, [.4, .2, .1, .1, .1, .05, .05, 0]), PlacementOptions(), id="skewed-replicas"),
]


@pytest.mark.parametrize("functions,options", MOVE_CASES)
def test_leave_moves_only_the_departed_nodes_functions(functions, options):
    node_list = nodes(150, 150, 150, 150)
    before = place(functions, node_list, options=options)
    after = place(functions, node_list[:2] + node_list[3:], before, options)
    check_valid(after, functions, node_list[:2] + node_list[3:])
    to_deploy, to_undeploy = diff(before, after)
    assert {n for _, n in to_undeploy} <= {"n2"}
    orphans = {f for f, ns in before.items() if ns == ("n2",)}
    if options.max_replicas == 1 or not options.replicate:
        assert {f for f, _ in to_deploy} == orphans                  # nothing else moved or was added


@pytest.mark.parametrize("functions,options", MOVE_CASES)
@pytest.mark.parametrize("rebalance", [True, False], ids=["rebalance", "no-rebalance"])
def test_join_moves_only_onto_the_new_node(functions, options, rebalance):
    old_nodes = nodes(150, 150)
    before = place(functions, old_nodes, options=options)
    options = PlacementOptions(options.max_replicas, options.replicate, options.replica_headroom_fraction,
                               rebalance_on_join=rebalance)
    grown = old_nodes + [NodeSpec("new", 150 * MIB)]
    after = place(functions, grown, before, options)
    check_valid(after, functions, grown)
    to_deploy, to_undeploy = diff(before, after)
    if not rebalance:
        assert to_undeploy == []
    assert all((f, "new") in to_deploy for f, _ in to_undeploy)          # every move lands on the new node
    if not options.replicate:
        assert {n for _, n in to_deploy} <= {"new"}
        assert {f for f, _ in to_undeploy} == {f for f, _ in to_deploy}   # moves, not copies
        if rebalance:
            for row in layer_counts(after, functions, grown).values():
                assert max(row) - min(row) <= 1
        else:
            assert after == before


def test_same_mesh_changes_nothing_and_stale_entries_are_dropped():
    functions, node_list = fns(4, 6, 10, [.3, .3, .1, .1, .1, .1]), nodes(100, 100, 100)
    placement = place(functions, node_list)
    assert place(functions, node_list, placement) == placement
    stale = dict(placement, gone=("n0",), f0000=placement["f0000"] + ("ghost",))
    assert place(functions, node_list, stale) == placement


def test_capacity_shrink_moves_only_what_no_longer_fits():
    functions, node_list = fns(1, 6, 10), nodes(30, 30, 30)
    before = place(functions, node_list, options=NO_REPLICAS)
    shrunk = [NodeSpec("n0", 20 * MIB), *node_list[1:]]
    after = place(functions, [*shrunk[:1], NodeSpec("n3", 30 * MIB), *shrunk[1:]], before, NO_REPLICAS)
    to_deploy, to_undeploy = diff(before, after)
    assert len(to_undeploy) == 1 and to_undeploy[0][1] == "n0"


# ------------------------------------------------------------------------------------------- determinism, diff

def test_deterministic_whatever_the_input_order():
    functions = fns(6, 10, 10, [random.Random(1).random() for _ in range(10)])
    node_list = nodes(200, 150, 150, 100, threads=[4, 2, 2, 1])
    first = place(functions, node_list)
    for seed in range(5):
        rng = random.Random(seed)
        shuffled_f, shuffled_n = functions[:], node_list[:]
        rng.shuffle(shuffled_f), rng.shuffle(shuffled_n)
        assert place(shuffled_f, shuffled_n) == first
    assert list(first) == sorted(first) and all(list(ns) == sorted(ns) for ns in first.values())


@pytest.mark.parametrize("old,new,to_deploy,to_undeploy", [
    pytest.param({}, {"a": ("n1",)}, [("a", "n1")], [], id="first-deploy"),
    pytest.param({"a": {"n1"}}, {"a": ("n1",)}, [], [], id="unchanged-set-vs-tuple"),
    pytest.param({"a": {"n1"}}, {"a": ("n2",)}, [("a", "n2")], [("a", "n1")], id="move"),
    pytest.param({"a": {"n1"}, "b": {"n2"}}, {"a": ("n1", "n3")}, [("a", "n3")], [("b", "n2")],
                 id="replicate-and-remove-function"),
    pytest.param({"b": {"n2", "n1"}}, {"b": ("n1",), "a": ("n2",)}, [("a", "n2")], [("b", "n2")],
                 id="sorted-output"),
])
def test_diff(old, new, to_deploy, to_undeploy):
    assert diff(old, new) == (to_deploy, to_undeploy)


# ------------------------------------------------------------------------------------------- property-style

@pytest.mark.parametrize("seed", range(40))
def test_random_instances_hold_budgets(seed):
    rng = random.Random(seed)
    functions = [FunctionSpec(f"f{i:03d}", rng.randrange(6), rng.randrange(1, 40) * MIB,
                              rng.choice([0.0, rng.random(), rng.paretovariate(1.5)]))
                 for i in range(rng.randrange(1, 80))]
    biggest = max(f.bytes for f in functions)
    need = sum(f.bytes for f in functions)
    ample = rng.random() < 0.7
    n_nodes = rng.randrange(1, 8)
    node_list = [NodeSpec(f"node-{i}", (biggest + rng.randrange(0, 2 * need // n_nodes + 1)
                                        if ample else rng.randrange(0, need)), rng.choice([1, 2, 4]))
                 for i in range(n_nodes)]
    if ample and sum(n.capacity_bytes for n in node_list) < 2 * need:
        node_list.append(NodeSpec("node-big", 2 * need))
    options = PlacementOptions(max_replicas=rng.choice([1, 2, 3]), replicate=rng.random() < 0.8)
    try:
        placement = place(functions, node_list, options=options)
    except PlacementError:
        assert not ample
        return
    check_valid(placement, functions, node_list, options.max_replicas)
    assert place(functions, node_list, placement, options) == placement       # stable
    joined = node_list + [NodeSpec("node-new", rng.randrange(0, need + 1), rng.choice([1, 2, 4]))]
    grown = place(functions, joined, placement, options)                        # one node joins
    check_valid(grown, functions, joined, options.max_replicas)
    if options.max_replicas == 1 or not options.replicate:
        to_deploy, to_undeploy = diff(placement, grown)
        assert {n for _, n in to_deploy} <= {"node-new"}
        assert sorted(f for f, _ in to_deploy) == sorted(f for f, _ in to_undeploy)
    if ample and len(node_list) > 1:                                            # one node leaves
        gone = node_list[rng.randrange(len(node_list))]
        rest = [n for n in node_list if n is not gone]
        try:
            after = place(functions, rest, placement, options)
        except PlacementError:
            return
        check_valid(after, functions, rest, options.max_replicas)
        orphans = [f.bytes for f in functions if placement[f.function_id] == (gone.node_id,)]
        free = sum(n.capacity_bytes for n in rest) - sum(f.bytes * len(placement[f.function_id]) for f in functions
                                                       if gone.node_id not in placement[f.function_id])
        fits_greedily = free >= sum(orphans) + len(rest) * max(orphans, default=0)   # any-fit cannot fail
        if fits_greedily and (options.max_replicas == 1 or not options.replicate):
            assert {n for _, n in diff(placement, after)[1]} <= {gone.node_id}


def test_fast_on_a_qwen_sized_mesh():
    rng = random.Random(0)
    functions = [FunctionSpec(f"{l:02d}-{e:02d}", l, 33 * MIB, rng.paretovariate(1.2))
                 for l in range(24) for e in range(60)]
    node_list = [NodeSpec(f"n{i}", 6000 * MIB, 4) for i in range(10)]
    start = time.perf_counter()
    placement = place(functions, node_list)
    place(functions, node_list[1:] + [NodeSpec("n10", 6000 * MIB, 4)], placement)
    assert time.perf_counter() - start < 1.0
    check_valid(placement, functions, node_list)


def test_manifest_entries_work_as_functions():
    entries = [FunctionEntry(f"{i:064x}", f"L00.E{i:02d}-{i:02d}", f"functions/{i}.onnx", 0, (i,), 5 * MIB,
                             f"{i:064x}", "float32", 17) for i in range(3)]
    placement = place(entries, nodes(10, 10))
    check_valid(placement, entries, nodes(10, 10))


# ------------------------------------------------------------------------------------------- plan formatting

def test_plan_table_and_dict():
    functions, node_list = fns(2, 4, 10, [.4, .3, .2, .1]), nodes(100, 60, threads=[4, 2])
    placement = place(functions, node_list)
    plan = plan_to_dict(placement, functions, node_list)
    assert json.loads(json.dumps(plan)) == plan
    rows = {r["node_id"]: r for r in plan["nodes"]}
    for n in node_list:
        row = rows[n.node_id]
        assert row["used_bytes"] == sum(f.bytes for f in functions if n.node_id in placement[f.function_id])
        assert row["used_bytes"] <= row["capacity_bytes"]
        assert row["functions"] == len(row["function_ids"])
    table = format_plan(placement, functions, node_list)
    lines = table.splitlines()
    assert len(lines) == 1 + len(node_list) + 1
    assert lines[1].startswith("n0") and "/ 100.0 MiB" in lines[1] and "%" in lines[1]
    assert "L00.E" in table and "8 functions (80.0 MiB)" in lines[-1]


@pytest.mark.parametrize("names,width,expected", [
    pytest.param(["L03.E00-03", "L03.E08-11", "L04.E00-03"], 80, "L03.E00-03,E08-11 L04.E00-03", id="grouped"),
    pytest.param(["L03.E00-03", "L03.E08-11", "L04.E00-03"], 20, "L03.E00-03,E08-11 ... (+1 more)", id="cut"),
    pytest.param(["L03.E00-03", "L03.E08-11"], 12, "L03.E00-03 ... (+1 more)", id="cut-in-a-layer"),
    pytest.param(["abc", "def"], 80, "abc def", id="plain-ids"),
    pytest.param([], 10, "", id="empty"),
])
def test_compact_names(names, width, expected):
    assert compact_names(names, width) == expected
