#!/usr/bin/env bash
# Installs what bootchain needs on Debian 12: the Debian tools (as root, or through sudo) and a
# Python virtual environment in .venv with bootchain and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES=(
  apt ca-certificates
  qemu-system-x86 ovmf swtpm swtpm-tools     # boot tests
  mtools dosfstools fdisk cpio zstd binutils # independent checks of disk, initrd and UKI
  sbsigntool pesign osslsigncode             # independent Authenticode oracles
  tpm2-tools systemd                         # tpm2_eventlog, systemd-measure oracles
  softhsm2 opensc efitools                   # PKCS#11 signing tests, .auth/.esl oracles
  kmod busybox-static                        # modinfo and busybox cpio oracles for the initrd
  util-linux                                 # setpriv: tests of unreadable inputs as a non-root user
  faketime                                   # reproducibility check under another clock
  python3 python3-venv
)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# bootchain downloads its pinned packages through apt: it needs package lists.
lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -1)
if [ ${#missing[@]} -gt 0 ] || [ -z "$lists" ]; then
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup: ready (.venv/bin/bootchain, .venv/bin/invoke)"
