"""pip inside an image build as pip on this machine: its settings as build arguments, its local wheels in the context.

A ``docker build`` sees neither this machine's pip configuration (files, ``PIP_*`` variables) nor its local
wheel folders. This script asks pip itself (``pip config list``: every file and variable pip reads, merged the
way pip merges them) and prints the settings that mean the same inside a build, one ``KEY=VALUE`` line per
build argument (``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, ``PIP_TRUSTED_HOST``, ``PIP_DEFAULT_TIMEOUT``,
``PIP_RETRIES``, ``PIP_CERT``, proxies). Settings that point into this machine's file system cannot be passed as
they are: a local index or find-links folder is dropped, and the wheels the images need from it are put in
``compose/local/wheels`` (``pip download`` of each ``--wheel`` spec, resolved with this machine's settings, so
the CPU torch wheel comes from wherever pip finds it here); a CA bundle is copied to ``compose/local/pip-cert.pem``.
``compose/local/`` is git-ignored; nothing about this machine is written into the repository.

    python3 compose/base/pip_context.py --wheel torch==2.13.0      # prints KEY=VALUE lines
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

LOCAL = Path(__file__).resolve().parents[1] / "local"   # compose/local, copied into the images' build stage
IN_IMAGE = "/tmp/faasmoe-local"                          # where Dockerfile.* copy it
SCALARS = {"index-url": "PIP_INDEX_URL", "default-timeout": "PIP_DEFAULT_TIMEOUT", "timeout": "PIP_DEFAULT_TIMEOUT",
           "retries": "PIP_RETRIES", "proxy": "PIP_PROXY"}
LISTS = {"extra-index-url": "PIP_EXTRA_INDEX_URL", "trusted-host": "PIP_TRUSTED_HOST"}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def pip_settings(python: str) -> dict[str, str]:
    """Effective install settings: ``:env:`` (PIP_* variables) over ``install.`` over ``global.``."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, "download": 1, ":env:": 2}
    for line in out.splitlines():
        match = re.fullmatch(r"([^.=]*|:env:)\.([a-z0-9-]+)='(.*)'", line.strip())
        if not match or match.group(1) not in rank:
            continue
        section, key, value = match.groups()
        if key not in ranked or rank[section] >= ranked[key][0]:
            ranked[key] = (rank[section], value)
    return {key: value for key, (_, value) in ranked.items()}


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def build_args(settings: dict[str, str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for key, var in SCALARS.items():
        value = settings.get(key, "")
        if not value:
            continue
        if key == "index-url" and not is_remote(value):
            print(f"pip_context: index-url {value} is on this machine; the build uses PyPI instead", file=sys.stderr)
            continue
        args[var] = value
    for key, var in LISTS.items():
        values = settings.get(key, "").split()
        kept = [v for v in values if key != "extra-index-url" or is_remote(v)]
        for dropped in sorted(set(values) - set(kept)):
            print(f"pip_context: {key} {dropped} is on this machine: not passed to the build", file=sys.stderr)
        if kept:
            args[var] = " ".join(kept)
    for key in ("constraint", "requirement", "no-index"):
        if settings.get(key):
            print(f"pip_context: {key} {settings[key]} is this machine's: not passed to the build", file=sys.stderr)
    remote_links = [v for v in settings.get("find-links", "").split() if is_remote(v)]
    if remote_links:
        args["PIP_FIND_LINKS"] = " ".join(remote_links)
    cert = settings.get("cert", "")
    if cert and Path(cert).is_file():
        shutil.copyfile(cert, LOCAL / "pip-cert.pem")
        args["PIP_CERT"] = f"{IN_IMAGE}/pip-cert.pem"
    for var in PROXY_VARS:
        if os.environ.get(var):
            args[var] = os.environ[var]
    return args


def fetch_wheels(python: str, specs: list[str]) -> None:
    """The wheels the images need, as pip on this machine resolves them (local folders included)."""
    wheels = LOCAL / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", str(wheels), spec], check=True, stdout=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", action="append", default=[],
                        help="a requirement whose wheel goes into compose/local/wheels (repeatable)")
    parser.add_argument("--python", default=sys.executable, help="the Python whose pip to ask (default: this one)")
    args = parser.parse_args()
    LOCAL.mkdir(exist_ok=True)
    try:
        settings = pip_settings(args.python)
        fetch_wheels(args.python, args.wheel)
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd[:4])} failed (exit {exc.returncode})", file=sys.stderr)
        return 3
    for key, value in build_args(settings).items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
