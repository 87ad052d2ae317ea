#!/usr/bin/env bash
# Sets up a Debian/Ubuntu host for Hutch: installs the host packages, builds `hutch` and the
# static guest agent, and builds the `default` guest image. Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (installing packages and debootstrap need it)" >&2
    exit 1
fi

# Host packages: the VMM, the image pipeline's tools, and the Debian archive key.
# qemu-system-common carries virtiofsd (/usr/lib/qemu/virtiofsd), which serves shared folders.
packages=(qemu-system-x86 qemu-system-common qemu-utils debootstrap e2fsprogs dpkg apt debian-archive-keyring ca-certificates xz-utils zstd nftables iproute2)
# `hutch setup firecracker` downloads with curl; `hutch image kernel --from-source` compiles a
# kernel (only with HUTCH_KERNEL_TOOLS=1: a compiler toolchain most hosts do not need).
packages+=(curl tar)
# Agent tasks: packing a workspace and `task apply --branch` use the host's git.
packages+=(git)
# The fleet's etcd client (crate etcd-client) compiles etcd's protobufs with protoc at build time.
packages+=(protobuf-compiler)
if [ "${HUTCH_KERNEL_TOOLS:-0}" = 1 ]; then
    packages+=(make gcc flex bison bc libelf-dev)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A host with a newer qemu-utils from backports (and no QEMU yet) loses it when apt installs
# Debian's qemu-system-x86 beside it: their common files conflict, and apt resolves that by
# removing qemu-utils. Clones and pools need qemu-img, so put back the one that matches.
if ! command -v qemu-img >/dev/null; then
    echo "setup.sh: qemu-img went missing; installing Debian's qemu-utils"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup.sh: Rust is not installed: install it with rustup (stable), then run this again" >&2
    exit 1
fi

# The guest agent is PID 1 in the VM: it must be a static binary.
agent=target/x86_64-unknown-linux-musl/release/hutch-agent
if rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl; then
    cargo build --locked --release -p hutch-agent --target x86_64-unknown-linux-musl
else
    echo "setup.sh: no musl target; building the agent for glibc with static linking" >&2
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --release -p hutch-agent --target x86_64-unknown-linux-gnu
    agent=target/x86_64-unknown-linux-gnu/release/hutch-agent
fi
cargo build --locked --release -p hutch-cli

./target/release/hutch image build --name default --agent "$agent"
echo "setup.sh: ready; try: ./target/release/hutch run -- uname -a"
