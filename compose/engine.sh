#!/usr/bin/env bash
# A docker engine for compose/ci-up on a machine without one running (CI): Debian's dockerd with a storage
# driver that works on this kernel.
#
#   compose/engine.sh start    # start dockerd unless one answers already; fails with the reason
#   compose/engine.sh stop     # stop the dockerd this script started (and only that one)
#
# The engine gets no default bridge (--bridge=none): images are built on the host's network (docker build
# --network host) and containers join only the compose file's own network (a fixed subnet in 10.231.0.0/16),
# so nothing lands on docker's default 172.17.0.0/16. FAASMOE_DOCKERD_STORAGE_DRIVER overrides vfs.
set -euo pipefail
state=${FAASMOE_DOCKERD_STATE:-/run/faasmoe-dockerd}
pidfile=$state/dockerd.pid
log=$state/dockerd.log

case "${1:-}" in
start)
  if docker info >/dev/null 2>&1; then
    echo "docker engine: already running ($(docker info --format '{{.ServerVersion}}, storage {{.Driver}}'))" >&2
    exit 0
  fi
  command -v dockerd >/dev/null || { echo "error: dockerd is missing: apt-get install docker.io" >&2; exit 3; }
  [ "$(id -u)" = 0 ] || { echo "error: starting dockerd needs root (or start a docker engine yourself)" >&2; exit 3; }
  mkdir -p "$state"
  command -v containerd >/dev/null || { echo "error: containerd is missing: apt-get install containerd" >&2; exit 3; }
  setsid dockerd --storage-driver="${FAASMOE_DOCKERD_STORAGE_DRIVER:-vfs}" --bridge=none \
    --pidfile "$pidfile" >"$log" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 1 120); do                # up to 60 s
    if docker info >/dev/null 2>&1; then
      echo "$pid" >"$state/started-by-faasmoe"
      echo "docker engine: dockerd $pid started ($(docker info --format '{{.ServerVersion}}, storage {{.Driver}}'); log $log)" >&2
      exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: dockerd could not start; its last words ($log):" >&2
      grep -E 'level=(error|fatal)|failed' "$log" | tail -5 >&2 || tail -5 "$log" >&2
      exit 3
    fi
    sleep 0.5
  done
  echo "error: dockerd $pid did not answer within 60 s; see $log" >&2
  kill "$pid" 2>/dev/null || true
  exit 3
  ;;
stop)
  [ -f "$state/started-by-faasmoe" ] || exit 0
  pid=$(cat "$state/started-by-faasmoe")
  rm -f "$state/started-by-faasmoe"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    echo "docker engine: dockerd $pid stopped" >&2
  fi
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
