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
# The packages of the list that are not installed.
not_installed() {
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
mapfile -t missing < <(not_installed)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # apt may remove a listed package to resolve a conflict with one it installs: a host with
    # a newer qemu-utils from backports and no QEMU loses qemu-utils (and so qemu-img, which
    # clones and pools need) when Debian's qemu-system-x86 comes in. Put back what went, in
    # the versions that match what is now installed.
    mapfile -t removed < <(not_installed)
    if [ ${#removed[@]} -gt 0 ]; then
        echo "setup.sh: apt removed ${removed[*]}; installing them again"
        apt-get install -y -qq --no-install-recommends "${removed[@]}" >/dev/null
    fi
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
