#!/usr/bin/env bash
# Install what the WAN lab (fedrdma/lab) needs and build its delay element.
# Idempotent and quick when everything is present: no apt-get runs then, and the helper
# is recompiled only when delay.c is newer than the binary. Safe for CI (non-interactive).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$REPO/fedrdma/lab/delay.c"
OUT="${FEDRDMA_DELAY_HELPER:-$REPO/build/fedrdma-delay}"
# Debian packages, each for one tool the lab calls (the header comes with libnetfilter-queue-dev).
PACKAGES=(iproute2 iptables ethtool iputils-ping iperf3 procps gcc libc6-dev libnetfilter-queue-dev)
NEEDED_CMDS=(ip tc iptables-legacy ethtool ping iperf3 sysctl gcc)
HEADER=/usr/include/libnetfilter_queue/libnetfilter_queue.h

missing=()
for cmd in "${NEEDED_CMDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
        || missing+=("$cmd")
done
[[ -f "$HEADER" ]] || missing+=("$HEADER")

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "lab-deps: missing ${missing[*]}; rerun as root (sudo $0) to apt-get install them" >&2
        exit 1
    fi
    echo "lab-deps: installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # iperf3's package asks whether to run a system-wide server; the lab starts its own.
    echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

if [[ ! -x "$OUT" || "$SRC" -nt "$OUT" ]]; then
    mkdir -p "$(dirname "$OUT")"
    tmp="$OUT.tmp.$$"
    gcc -O2 -Wall -Wextra -o "$tmp" "$SRC" -lnetfilter_queue -lnfnetlink
    mv -f "$tmp" "$OUT"
    echo "lab-deps: built $OUT"
fi
