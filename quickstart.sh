#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a published release: installs everything, then
# builds the default recipe with the example keys, boot-tests it under QEMU + OVMF (Secure Boot
# on) + swtpm, and publishes it with its signed golden manifest to the local store ./store.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
exec .venv/bin/invoke release
