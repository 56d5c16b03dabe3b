#!/usr/bin/env bash
# Installs everything sockops needs on a fresh Debian bookworm machine, as root.
# Idempotent: each step checks first, so a second run only verifies and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (BPF, network namespaces and iptables need it)" >&2
  exit 1
fi

# Debian packages: bcc and kernel headers for it, network tools, load generators, bench/test helpers,
# and a docker engine with what the tests build their local images from (no image registry here);
# prometheus for promtool, which checks and unit-tests the alert rules in daemonset/alerts;
# nginx (the benchmark's app server, run inside a pod) and gcc (the benchmark's ping-pong program);
# the app zoo of tests/test_apps.py: Go (its programs are built in the test), HAProxy, socat,
# redis and curl, each run inside a pod with sockops off and on.
PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv iproute2 iptables bpftool
      sockperf wrk iperf3 nghttp2-client tcpdump util-linux procps
      docker.io debootstrap busybox-static prometheus
      nginx gcc golang-go haproxy socat redis-server redis-tools curl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The bench and the tests start their own nginx, haproxy and redis inside pods; the host
  # services the packages enable are not wanted.
  for svc in nginx haproxy redis-server; do
    if [[ " ${missing[*]} " == *" $svc "* ]] && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
  # Only promtool is wanted: on a systemd host the package also starts a Prometheus server (:9090).
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# bcc compiles against the running kernel's headers. The running kernel ships none, so point
# /lib/modules/$(uname -r)/{build,source} at the Debian header package. A header version that
# differs from the kernel is fine: the programs use the UAPI context structs from the headers and
# read kernel-internal fields only at offsets taken from the running kernel's BTF
# (sockops/kernel_btf.py).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup: no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64" >&2; exit 1; }
  log "linking $kdir/{build,source} -> $hdr"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "${hdr%-amd64}-common" "$kdir/source"
fi

# bpffs for pinned maps.
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# The virtual environment sees Debian's bcc through --system-site-packages.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.sockops-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing sockops and its test extras into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,agent,bench]'
  touch "$stamp"
fi
# The lab (lab/), the benchmark (bench/) and the tests' support run from the checkout, not from the
# installed package (the agent's image carries the agent alone): the venv finds them through a .pth.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if [ "$(cat "$site/sockops-checkout.pth" 2>/dev/null)" != "$PWD" ]; then
  log "putting the checkout ($PWD) on the venv's path"
  printf '%s\n' "$PWD" > "$site/sockops-checkout.pth"
fi
log "ready"
