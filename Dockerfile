# sockops node agent: bcc (Debian's python3-bpfcc) + the sockops package with the agent extra.
#
# Base image. BASE_IMAGE names a Debian bookworm root; the default, sockops-base:bookworm, is made
# on the build machine because this project's CI reaches no image registry:
#     debootstrap --variant=minbase bookworm ROOT <the machine's Debian mirror>
#     tar -C ROOT -c . | docker import - sockops-base:bookworm
# (tests/dockerd.py does exactly this, taking the mirror from /etc/apt/sources.list(.d)). Where a
# registry is reachable, pin the official image by digest instead:
#     docker build --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest> .
#
# Build (legacy builder or BuildKit; apt and pip need the network, hence --network host where the
# daemon has no bridge):
#     docker build --network host -t sockops:0.1.0 \
#         [--build-arg APT_MIRROR=URL --build-arg APT_SECURITY_MIRROR=URL] [--build-arg PIP_INDEX=URL] .
# APT_MIRROR / PIP_INDEX replace the base image's apt sources / pip's default index when set (the
# test suite passes this machine's own configuration); nothing here names a mirror or an index.
#
# Run: the agent loads BPF programs, attaches them to a cgroup, enters other pods' network
# namespaces and pins maps, so it runs as UID 0 with named capabilities and nothing else:
# CAP_SYS_ADMIN (cgroup attach, setns; on Linux >= 5.8 with a runtime that knows them, CAP_BPF +
# CAP_PERFMON cover loading), CAP_NET_ADMIN (sockmap/sk_msg, reading nat rules), CAP_SYS_PTRACE
# (other processes' /proc/PID/ns/net), CAP_SYS_RESOURCE only on kernels < 5.11 (memlock rlimit).
# The DaemonSet drops ALL others and keeps the root filesystem read-only. A non-root UID would get
# none of these as effective capabilities (an exec'd Python gets no ambient ones), which is why the
# image does not switch USER. bcc compiles against the host's kernel headers, mounted read-only:
#     docker run --rm --cap-drop=ALL --cap-add=SYS_ADMIN --cap-add=NET_ADMIN --cap-add=SYS_PTRACE \
#         -v /sys/fs/bpf:/sys/fs/bpf -v /sys/fs/cgroup/unified:/sys/fs/cgroup/unified:ro \
#         -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro sockops:0.1.0 doctor
# (mount the cgroup v2 root wherever the host has it; `sockops doctor` says what is missing, e.g.
# which header mount).

ARG BASE_IMAGE=sockops-base:bookworm

# -- base: the runtime packages, shared by both stages ----------------------------------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG APT_MIRROR=""
ARG APT_SECURITY_MIRROR=""
# Exact Debian versions (bookworm); bump them together with the base image.
ARG PYTHON3_VERSION=3.11.2-1+b1
ARG BPFCC_VERSION=0.26.0+ds-1
ARG IPTABLES_VERSION=1.8.9-2
ENV DEBIAN_FRONTEND=noninteractive
# iptables: the agent reads a pod's nat rules (iptables-save in its netns) to find Istio's capture
# ports; nsenter comes with util-linux, which minbase already has.
RUN if [ -n "${APT_MIRROR}" ]; then \
        rm -f /etc/apt/sources.list.d/*.sources; \
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "${APT_MIRROR}" "${APT_MIRROR}" \
            > /etc/apt/sources.list; \
        if [ -n "${APT_SECURITY_MIRROR}" ]; then \
            printf 'deb %s bookworm-security main\n' "${APT_SECURITY_MIRROR}" >> /etc/apt/sources.list; \
        fi; \
    fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3="${PYTHON3_VERSION}" \
        python3-bpfcc="${BPFCC_VERSION}" \
        iptables="${IPTABLES_VERSION}" \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# -- build: a venv that sees Debian's bcc, with sockops[agent] at pinned versions --------------------
FROM base AS build
ARG PYTHON3_VENV_VERSION=3.11.2-1+b1
ARG CA_CERTIFICATES_VERSION=20250419~deb12u2
ARG PIP_INDEX=""
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=80.9.0
# PEM certificates the build machine trusts on top of Debian's (a TLS-inspecting proxy in front of
# the package index, say). Only this throw-away stage trusts them; the runtime image does not.
ARG EXTRA_CA_CERTS=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3-venv="${PYTHON3_VENV_VERSION}" \
        ca-certificates="${CA_CERTIFICATES_VERSION}" \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && if [ -n "${EXTRA_CA_CERTS}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERTS}" > /usr/local/share/ca-certificates/build-extra.crt \
        && update-ca-certificates; \
    fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# --system-site-packages: bcc is only packaged for Debian's python (python3-bpfcc), not on PyPI.
RUN python3 -m venv --system-site-packages /opt/sockops \
    && /opt/sockops/bin/pip install --no-cache-dir ${PIP_INDEX:+--index-url "${PIP_INDEX}"} \
        "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}"
# Dependencies first, from the constraints alone: this layer stays cached while only the code changes.
COPY image/constraints.txt /src/image/constraints.txt
RUN sed -e '/^#/d' -e '/^$/d' /src/image/constraints.txt > /tmp/requirements.txt \
    && /opt/sockops/bin/pip install --no-cache-dir ${PIP_INDEX:+--index-url "${PIP_INDEX}"} \
        --requirement /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY sockops /src/sockops
RUN /opt/sockops/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/sockops/bin/pip uninstall --yes setuptools pip \
    && find /opt/sockops -name __pycache__ -prune -exec rm -rf {} +

# -- runtime ----------------------------------------------------------------------------------------
FROM base AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sockops" \
      org.opencontainers.image.description="eBPF sockmap acceleration agent for Istio-style service meshes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm (minbase)" \
      io.sockops.requires="uid 0 with CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_PTRACE; host bpffs, cgroup v2 root, /lib/modules and /usr/src read-only"
COPY --from=build /opt/sockops /opt/sockops
COPY bpf /opt/sockops/bpf
ENV PATH=/opt/sockops/bin:${PATH} \
    SOCKOPS_BPF_DIR=/opt/sockops/bpf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["sockops"]
CMD ["--help"]
