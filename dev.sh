#!/usr/bin/env bash
# The README's two set-up commands on a fresh Debian 12 machine:
#   ./dev.sh example   build fixtures/example into example.tar and run it
#   ./dev.sh test      lint and run the whole test suite
# A bare Debian 12 image lacks make itself; everything else is installed by the Makefile.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  example|test) ;;
  *) echo "usage: ./dev.sh example|test" >&2; exit 2 ;;
esac
if ! command -v make >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make
  else
    echo "dev.sh: make is missing; install it as root: apt-get install -y make" >&2
    exit 1
  fi
fi
exec make "$1"
