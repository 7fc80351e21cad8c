#!/usr/bin/env bash
# Installs what the project needs; safe to run again (skips what is already there).
#   scripts/setup.sh          runtime: espeak-ng + .venv with requirements.txt
#   scripts/setup.sh --dev    also chromium, firefox-esr, pulseaudio, sox, nftables, coturn, redis-server, postgresql and requirements-dev.txt (tests, benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

debs=(espeak-ng)
[ $dev = 1 ] && debs+=(chromium firefox-esr pulseaudio pulseaudio-utils sox nftables iproute2 coturn redis-server postgresql)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" != 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
reqs=requirements.txt
[ $dev = 1 ] && reqs=requirements-dev.txt
# A stamp per requirements content: a dev install also covers the runtime one.
hash=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
stamp=".venv/.installed-$hash-$dev"
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-$hash-1" ]; then
  echo "setup: installing Python packages from $reqs" >&2
  .venv/bin/pip install -q --disable-pip-version-check -r "$reqs"
  touch "$stamp"
fi
