#!/usr/bin/env bash
# Bubblewrap (`bwrap`), the sandbox the code-execution reward (trl_qrpo.rewards.code_pass_rate) uses when present:
# installed from the OS packages when missing and this is a Debian/Ubuntu machine run as root (as CI is). Elsewhere it
# says how to install it and exits 0: the reward then runs in its locked-down subprocess fallback, and says at start
# which isolation is in force (docs/code-rewards.md). The sandbox uses `--size` (a size-limited tmpfs), `--args` and,
# not run as root, `--disable-userns`: bubblewrap 0.8 or newer (Debian 12, Ubuntu 24.04).
set -euo pipefail
check_version() {
    local version
    version="$(bwrap --version 2>/dev/null | awk '{print $2}')"
    if [ -n "$version" ] && [ "$(printf '%s\n0.8.0\n' "$version" | sort -V | head -n1)" != "0.8.0" ]; then
        echo "[sandbox] bubblewrap $version is older than 0.8.0: the reward will say it does not work and fall back"
        echo "[sandbox] to its subprocess sandbox; install bubblewrap 0.8 or newer for full isolation."
    fi
}
if command -v bwrap >/dev/null 2>&1; then
    echo "[sandbox] bubblewrap present: $(command -v bwrap) ($(bwrap --version 2>/dev/null))"
    check_version
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[sandbox] installing bubblewrap (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq bubblewrap >/dev/null
    echo "[sandbox] bubblewrap installed: $(command -v bwrap) ($(bwrap --version 2>/dev/null))"
    check_version
else
    echo "[sandbox] bubblewrap is not installed; install it (e.g. 'sudo apt-get install bubblewrap') for full"
    echo "[sandbox] isolation of code rewards; without it they run in the subprocess fallback."
fi
