"""Edge profiles: every shipped profile loads; every broken one is a one-line ConfigError naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from faasmoe.node.profiles import MIB, Profile, list_profiles, load_profile
from faasmoe.proto.errors import ConfigError

REQUIRED = ["jetson-orin-nano-8gb", "rpi4-4gb", "rpi5-8gb", "x86-minipc-16gb"]

GOOD = """\
name = "test-board"
description = "a board for tests"
memory_budget_mb = 1024
threads = 2
keep_alive_s = 30
disk_budget_mb = 4096

[container]
mem_limit = "1536m"
cpus = 2.0
"""


def test_required_profiles_are_shipped():
    assert set(REQUIRED) <= set(list_profiles())
    assert list_profiles() == sorted(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_loads_and_is_sane(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile.description
    assert 0 < profile.memory_budget_bytes < _bytes(profile.container_mem_limit)
    assert 1 <= profile.threads <= profile.container_cpus
    assert profile.keep_alive_s > 0
    assert profile.disk_budget_bytes >= profile.memory_budget_bytes


@pytest.mark.parametrize("name,budget_mb,threads,mem_limit", [
    pytest.param("rpi4-4gb", 2560, 3, "3g", id="rpi4"),
    pytest.param("rpi5-8gb", 5632, 3, "6g", id="rpi5"),
])
def test_profile_values_are_converted_to_bytes(name, budget_mb, threads, mem_limit):
    profile = load_profile(name)
    assert profile.memory_budget_bytes == budget_mb * MIB
    assert (profile.threads, profile.container_mem_limit) == (threads, mem_limit)
    assert isinstance(profile.keep_alive_s, float) and isinstance(profile.container_cpus, float)


def test_load_by_path(tmp_path, monkeypatch):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    profile = load_profile(str(path))
    assert profile == Profile("test-board", "a board for tests", 1024 * MIB, 4096 * MIB, 2, 30.0, "1536m", 2.0)
    monkeypatch.chdir(tmp_path)
    assert load_profile("board.toml") == profile            # ends in .toml: a path, not a name
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "board").write_text(GOOD)
    assert load_profile("sub/board") == profile             # contains "/": a path


@pytest.mark.parametrize("text,expected", [
    pytest.param("name = ", ["not valid TOML"], id="invalid-toml"),
    pytest.param(GOOD.replace("threads = 2\n", ""), ["missing field threads"], id="missing-field"),
    pytest.param(GOOD.replace("[container]\n", "[box]\n"), ["missing table [container]"], id="missing-container"),
    pytest.param(GOOD.replace('cpus = 2.0', ''), ["missing field container.cpus"], id="missing-container-field"),
    pytest.param(GOOD.replace("threads = 2", 'threads = "2"'), ["threads must be an integer", "'2'"],
                 id="threads-as-string"),
    pytest.param(GOOD.replace("threads = 2", "threads = true"), ["threads must be an integer"], id="bool"),
    pytest.param(GOOD.replace("memory_budget_mb = 1024", "memory_budget_mb = 1024.5"),
                 ["memory_budget_mb must be an integer"], id="float-budget"),
    pytest.param(GOOD.replace("memory_budget_mb = 1024", "memory_budget_mb = -1"),
                 ["memory_budget_mb must be an integer >= 1", "-1"], id="negative-budget"),
    pytest.param(GOOD.replace("keep_alive_s = 30", "keep_alive_s = -5"), ["keep_alive_s must be a number >= 0"],
                 id="negative-keep-alive"),
    pytest.param(GOOD.replace("disk_budget_mb = 4096", "disk_budget_mb = -4096"), ["disk_budget_mb"],
                 id="negative-disk"),
    pytest.param(GOOD.replace("threads = 2", "threads = 0"), ["threads must be an integer >= 1"],
                 id="zero-threads"),
    pytest.param(GOOD.replace("cpus = 2.0", "cpus = -1.0"), ["container.cpus must be a number > 0"],
                 id="negative-cpus"),
    pytest.param(GOOD.replace('"1536m"', '"1.5 GB"'), ["container.mem_limit must be a docker byte value"],
                 id="bad-mem-limit"),
    pytest.param(GOOD.replace('"1536m"', '"1g"'), ["must exceed memory_budget_mb", "1024 MiB"],
                 id="mem-limit-below-budget"),
    pytest.param(GOOD.replace("threads = 2", "threads = 2\nthread = 4"), ["unknown field thread"], id="typo"),
    pytest.param(GOOD.replace('name = "test-board"', 'name = " "'), ["name must be a non-empty string"],
                 id="blank-name"),
])
def test_bad_profile_is_one_line_config_error_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message


def test_unknown_name_lists_the_known_profiles():
    with pytest.raises(ConfigError) as info:
        load_profile("rpi3-1gb")
    message = str(info.value)
    assert "'rpi3-1gb'" in message and "\n" not in message
    for name in REQUIRED:
        assert name in message


@pytest.mark.parametrize("path", ["/nonexistent/board.toml", "missing.toml"])
def test_unreadable_file_is_config_error(path):
    with pytest.raises(ConfigError, match="cannot read profile"):
        load_profile(path)


def test_unreadable_encoding_is_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"description = '\xe9'\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_profile(str(path))


def test_profiles_module_needs_no_torch_and_no_router():
    code = ("import sys, faasmoe.node.profiles as p; p.load_profile('rpi4-4gb'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy') "
            "or m.startswith('faasmoe.router')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_files_explain_their_numbers():
    root = Path(__import__("faasmoe.edge_profiles", fromlist=["x"]).__file__).parent
    for name in REQUIRED:
        text = (root / f"{name}.toml").read_text()
        assert text.lstrip().startswith("#") and "Why these numbers" in text


def _bytes(mem_limit: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(mem_limit[:-1]) * units[mem_limit[-1]]
