"""``faasmoe bench --quick``: the harness's own measurement holds up (not the speed): every process of each
deployment is sampled and only those, outputs are identical across deployments, the integrals add up, and the
JSON, markdown table and plots are written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faasmoe.router.evaluation.scenario import load_scenario
from faasmoe.proto.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_quick_bench(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "faasmoe.router.cli.umbrella", "bench",
                           str(REPO / "bench" / "scenarios" / "quick.toml"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[4/4]" in proc.stderr                                       # progress shown
    result = json.loads((out / "result.json").read_text())
    assert result["requests"] > 4
    expected_roles = {"full-per-tenant": {"full-coder", "full-writer"}, "full-shared": {"full"},
                      "mesh-shared-G4-kainf": {"router", "node-0", "node-1", "node-2"},
                      "mesh-private-G4-ka2s-r2": {"router-coder", "router-writer", "node-0", "node-1", "node-2"}}
    for d in result["deployments"]:
        assert set(d["roles"]) == set(d["sampled_roles"]) == expected_roles[d["label"]]
        assert d["errors"] == 0 and d["identical"] == result["requests"]       # outputs identical to (a)'s
        f = d["figures"]
        assert f["samples"] >= 2 * f["duration_s"] >= 2 * result["duration_s"]    # >= 2 Hz, the whole window
        assert f["gb_s"] == pytest.approx(sum(p["gb_s"] for p in f["processes"].values()))
        assert f["core_s"] == pytest.approx(sum(p["core_s"] for p in f["processes"].values()))
        assert f["mean_gb"] * f["duration_s"] == pytest.approx(f["gb_s"])
        assert 0 < f["mean_gb"] <= f["peak_gb"]
        assert all(p["gb_s"] > 0 for p in f["processes"].values())
    copies = {d["label"]: d["copies"] for d in result["deployments"]}
    assert copies["full-shared"] == {} and copies["mesh-shared-G4-kainf"]["max"] >= 4    # the tiny model: 4 functions
    assert copies["mesh-private-G4-ka2s-r2"]["max"] > copies["mesh-shared-G4-kainf"]["max"]   # --replicas 2
    table = (out / "report.md").read_text()
    assert all(d["label"] in table for d in result["deployments"]) and "gb_s_vs_a" in table and "copies" in table
    for png in ("memory_over_time.png", "gb_s_core_s.png", "ttft_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text, needle", [
    ('model = "random:tiny"\n[[deployments]]\nkind = "mesh"\n', "no [[tenants]]"),
    ('model = "random:nope"\n', "unknown random model"),
    ('model = "random:tiny"\n[[tenants]]\ncorpus = "latin"\n', "corpus"),
    ('model = "random:tiny"\n[[tenants]]\ncorpus = "prose"\narrival = {process = "gamma", rate_per_s = -1}\n',
     "rate_per_s"),
    ('model = "random:tiny"\n[[tenants]]\ncorpus = "prose"\narrival = {process = "poisson"}\n'
     '[[deployments]]\nkind = "mesh"\nkeep_alive_s = "soon"\n', "keep_alive_s"),
    ('model = "random:tiny"\n[[tenants]]\ncorpus = "prose"\narrival = {process = "poisson"}\n'
     '[[deployments]]\nkind = "mesh"\nreplicas = "3"\n', "replicas must be one of 1, 2, auto"),
    ('model = "random:tiny"\npopularity_from = "x"\n[[tenants]]\ncorpus = "prose"\n'
     'arrival = {process = "poisson"}\n[[deployments]]\nkind = "mesh"\n', "popularity_from"),
])
def test_bad_scenarios_are_one_line_errors(tmp_path, text, needle):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_scenario(path)
