#!/bin/sh
# bootchain in-guest probe (busybox sh). Prints what the boot measured and enforced, framed and
# checksummed, on the console, then powers off. builder/boot.py:parse_probe reads it.
#
# Frame:  BOOTCHAIN-PROBE-BEGIN <section>
#         <base64 of the section's bytes, 76 columns>
#         BOOTCHAIN-PROBE-END <section> sha256=<hex of the bytes>
# Sections: meta, pcrs ("<bank> <index> <HEX>" lines), eventlog (binary_bios_measurements),
# lockdown, efivar:<Name>-<guid> (efivarfs file: u32 attributes + data).
# Last line: BOOTCHAIN-PROBE-DONE sections=<n>
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

[ -c /dev/console ] && exec >/dev/console 2>&1

mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
[ -r /proc/mounts ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /sys/kernel/security || mount -t securityfs securityfs /sys/kernel/security
if [ -d /sys/firmware/efi/efivars ] && ! mounted /sys/firmware/efi/efivars; then
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars
fi
# Keep kernel messages from splitting probe lines on the shared console.
echo 1 >/proc/sys/kernel/printk

WORK=/tmp/bootchain-probe
mkdir -p "$WORK"
COUNT=0

emit() {
    # emit NAME FILE: one framed section; copy first so the bytes hashed are the bytes sent.
    cat "$2" >"$WORK/section" 2>/dev/null || return 0
    echo "BOOTCHAIN-PROBE-BEGIN $1"
    base64 <"$WORK/section"
    echo "BOOTCHAIN-PROBE-END $1 sha256=$(sha256sum <"$WORK/section" | cut -d' ' -f1)"
    COUNT=$((COUNT + 1))
}

echo "BOOTCHAIN-PROBE-START"

{
    echo "probe 1"
    echo "kernel $(uname -r)"
    echo "cmdline $(cat /proc/cmdline)"
} >"$WORK/meta"
emit meta "$WORK/meta"

: >"$WORK/pcrs"
for bankdir in /sys/class/tpm/tpm0/pcr-*; do
    [ -d "$bankdir" ] || continue
    bank=${bankdir##*/pcr-}
    n=0
    while [ "$n" -lt 24 ]; do
        [ -r "$bankdir/$n" ] && echo "$bank $n $(cat "$bankdir/$n")" >>"$WORK/pcrs"
        n=$((n + 1))
    done
done
emit pcrs "$WORK/pcrs"

if [ -r /sys/kernel/security/tpm0/binary_bios_measurements ]; then
    emit eventlog /sys/kernel/security/tpm0/binary_bios_measurements
fi

if [ -r /sys/kernel/security/lockdown ]; then
    emit lockdown /sys/kernel/security/lockdown
fi

EFIVARS=/sys/firmware/efi/efivars
GLOBAL=8be4df61-93ca-11d2-aa0d-00e098032b8c
LOADER=4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
for f in "$EFIVARS/SecureBoot-$GLOBAL" "$EFIVARS/SetupMode-$GLOBAL" \
    "$EFIVARS/AuditMode-$GLOBAL" "$EFIVARS/DeployedMode-$GLOBAL" \
    "$EFIVARS"/Loader*-"$LOADER" "$EFIVARS"/Stub*-"$LOADER"; do
    [ -f "$f" ] && emit "efivar:${f##*/}" "$f"
done

echo "BOOTCHAIN-PROBE-DONE sections=$COUNT"
sync
poweroff -f
