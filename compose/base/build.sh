#!/usr/bin/env bash
# Build the local base image of faasmoe's images without a container registry: debootstrap of the Debian
# release this machine runs (python3, its venv module, CA certificates, useradd), imported into docker.
#
#   compose/base/build.sh            # prints the image name, e.g. faasmoe-base:bookworm
#   FAASMOE_BASE_REBUILD=1 compose/base/build.sh   # build again even if the image exists
#
# Idempotent: when the image exists it only prints its name. The Debian mirror is read from apt's own
# sources on this machine (apt-get indextargets), never written into the repository. Needs root,
# debootstrap and a running docker engine.
set -euo pipefail

. /etc/os-release
release=${VERSION_CODENAME:?this machine does not say its Debian release (VERSION_CODENAME in /etc/os-release)}
image=${FAASMOE_BASE_IMAGE:-faasmoe-base:$release}

if [ -z "${FAASMOE_BASE_REBUILD:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is missing: apt-get install debootstrap" >&2; exit 3; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 3; }

# The mirror apt uses here for the release itself (not -updates or -security).
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v r="$release" '$2 == r {print $1; exit}')
[ -n "$mirror" ] || { echo "error: apt's sources list no mirror for $release (apt-get indextargets)" >&2; exit 3; }

tree=$(mktemp -d /var/tmp/faasmoe-base.XXXXXX)
trap 'rm -rf "$tree"' EXIT
echo "debootstrap $release into $tree (from apt's mirror)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
  "$release" "$tree" "$mirror" >"$tree.log" 2>&1 || { tail -20 "$tree.log" >&2; rm -f "$tree.log"; exit 3; }
rm -f "$tree.log"
# Slim it like the registry's -slim images: no apt lists, docs or caches in the image.
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb \
       "$tree"/usr/share/doc/* "$tree"/usr/share/man/* "$tree"/usr/share/locale/*
chmod 755 "$tree"                       # mktemp made it 0700: as the image's / it would lock out every user
tar --numeric-owner -C "$tree" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
# Python and its venv module, for an unprivileged user too (the images run as one).
docker run --rm --network none --user 65534 "$image" python3 -c 'import venv, ssl' \
  || { echo "error: the imported base $image does not run Python as an unprivileged user" >&2; exit 3; }
echo "$image"
