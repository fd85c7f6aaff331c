#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image on machines that reach Debian's archive
# but no container registry: debootstrap bookworm (minbase) + python3 + venv, imported into the
# local Docker engine and tagged with the base image's name, so the Dockerfile builds unchanged.
#
#   docker/bootstrap-base.sh [IMAGE]        (default: python:3.11-slim-bookworm)
#
# Needs root, debootstrap and a running Docker engine. Takes about a minute.
set -euo pipefail

image=${1:-python:3.11-slim-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "bootstrap-base: $image already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "bootstrap-base: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

root=$(mktemp -d /tmp/bootstrap-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "bootstrap-base: debootstrap bookworm into $root (from $mirror)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" >/dev/null
# The stand-in trusts what this machine trusts (e.g. a TLS-inspecting proxy's CA), so package
# downloads inside builds work wherever they work on the host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root"/usr/local/share/ca-certificates/
  chroot "$root" update-ca-certificates >/dev/null
fi
# Like the official python images: no cached package lists, `python` on PATH.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
ln -sf /usr/bin/python3 "$root"/usr/local/bin/python

echo "bootstrap-base: importing as $image"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
docker image ls "$image"
