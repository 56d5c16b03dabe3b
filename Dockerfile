# sockops node agent: bcc (Debian's python3-bpfcc) + the sockops package with the agent extra.
#
# Base image. BASE_IMAGE names a Debian bookworm root; the default, sockops-base:bookworm, is made
# on the build machine because this project's CI reaches no image registry:
#     debootstrap --variant=minbase bookworm ROOT <the machine's Debian mirror>
#     tar -C ROOT -c . | docker import - sockops-base:bookworm
# (tests/support/dockerd.py does exactly this, taking the mirror from /etc/apt/sources.list(.d)). Where a
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
# image does not switch USER. The image carries the kernel headers bcc compiles against (Debian's
# linux-headers, see the `headers` stage), so no node needs any:
#     docker run --rm --cap-drop=ALL --cap-add=SYS_ADMIN --cap-add=NET_ADMIN --cap-add=SYS_PTRACE \
#         -v /sys/fs/bpf:/sys/fs/bpf -v /sys/fs/cgroup:/sys/fs/cgroup:ro sockops:0.1.0 doctor
# (mount the cgroup v2 root wherever the host has it; `sockops doctor` says what is missing).
#
# Size: the runtime stage is one flattened layer without documentation, man pages and message
# catalogues (nothing reads them) and without the kubernetes client's asyncio copy (the agent uses
# the synchronous client, 41 MB). Measured (tests/test_image.py): 505 MB before, 453 MB now,
# kernel headers (35 MB of files) included.

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
# Documentation, man pages and message catalogues of what apt installs below are never unpacked.
COPY image/dpkg-nodoc /etc/dpkg/dpkg.cfg.d/sockops-nodoc
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
    && rm -rf /opt/sockops/lib/python3*/site-packages/kubernetes/aio \
    && find /opt/sockops -name __pycache__ -prune -exec rm -rf {} +

# -- headers: the kernel headers bcc compiles against, in the image ---------------------------------
# The programs use only UAPI context structures (README), so one header version serves every
# kernel from 5.15 on (this project's CI compiles against 6.1 headers on a 6.18 kernel). Debian
# splits them into a flavour package (generated headers, config) and a common one; bcc's
# BCC_KERNEL_SOURCE takes one tree, so both are unpacked into one, without their dependencies
# (gcc, kbuild: nothing here builds modules) and without the other architectures' headers.
FROM base AS headers
ARG KERNEL_HEADERS_ABI=6.1.0-57
ARG KERNEL_HEADERS_VERSION=6.1.192-3
WORKDIR /tmp/headers
RUN apt-get update \
    && flavour="$(dpkg --print-architecture)" \
    && case "${flavour}" in amd64) karch=x86 ;; arm64) karch=arm64 ;; \
        *) echo "no kernel header flavour known for ${flavour}" >&2; exit 1 ;; esac \
    && apt-get download \
        "linux-headers-${KERNEL_HEADERS_ABI}-common=${KERNEL_HEADERS_VERSION}" \
        "linux-headers-${KERNEL_HEADERS_ABI}-${flavour}=${KERNEL_HEADERS_VERSION}" \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && for deb in ./*.deb; do dpkg-deb --extract "${deb}" root; done \
    && tree=/opt/sockops/kernel-headers \
    && mkdir -p "${tree}" \
    && cp -a "root/usr/src/linux-headers-${KERNEL_HEADERS_ABI}-common/." "${tree}/" \
    && cp -a "root/usr/src/linux-headers-${KERNEL_HEADERS_ABI}-${flavour}/include/." "${tree}/include/" \
    && cp -a "root/usr/src/linux-headers-${KERNEL_HEADERS_ABI}-${flavour}/arch/${karch}/." \
        "${tree}/arch/${karch}/" \
    && find "${tree}/arch" -mindepth 1 -maxdepth 1 ! -name "${karch}" -exec rm -rf {} + \
    && rm -rf "${tree}/scripts" "${tree}/tools" "${tree}/include/dt-bindings" "${tree}/include/drm" \
        "${tree}/include/sound" "${tree}/include/media" \
    && test -f "${tree}/include/linux/kconfig.h" && test -f "${tree}/include/generated/autoconf.h" \
    && rm -rf /tmp/headers
WORKDIR /

# -- assemble: the runtime's files, trimmed --------------------------------------------------------
FROM base AS assemble
COPY --from=build /opt/sockops /opt/sockops
COPY --from=headers /opt/sockops/kernel-headers /opt/sockops/kernel-headers
COPY bpf /opt/sockops/bpf
# What the base image itself brought of these (a debootstrap root has them all): nothing reads
# them, and the flattening below is what makes removing them shrink the image.
RUN find /usr/share/doc -type f ! -name copyright -delete \
    && rm -rf /usr/share/man/* /usr/share/locale/* /usr/share/info/* \
        /var/cache/debconf/*-old /var/lib/apt/lists/* /var/log/*.log

# -- runtime: one layer -----------------------------------------------------------------------------
FROM scratch AS runtime
ARG VERSION=0.1.0
# The whole root on purpose: one layer is what sheds the files removed above (a node pulls this
# image alone, so no layer is shared with anything anyway).
# hadolint ignore=DL3067
COPY --from=assemble / /
LABEL org.opencontainers.image.title="sockops" \
      org.opencontainers.image.description="eBPF sockmap acceleration agent for Istio-style service meshes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm (minbase)" \
      io.sockops.requires="uid 0 with CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_PTRACE; host bpffs and cgroup v2 root"
# BCC_KERNEL_SOURCE: bcc compiles against the image's headers, whatever the node has
# (sockops/loader.py check_headers and `sockops doctor` report which tree is used).
ENV PATH=/opt/sockops/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SOCKOPS_BPF_DIR=/opt/sockops/bpf \
    BCC_KERNEL_SOURCE=/opt/sockops/kernel-headers \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["sockops"]
CMD ["--help"]
