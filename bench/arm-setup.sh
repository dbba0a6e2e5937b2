#!/usr/bin/env bash
# Build the emulated aarch64 root that bench/arm.py runs its devices in.
#
#   bash bench/arm-setup.sh [ROOT]        # default /var/tmp/arm64-root; as root, on Debian
#
# 1. Debian's qemu-user-static, registered with binfmt_misc, so the kernel runs
#    aarch64 programs through qemu (chroot needs that: no qemu binary in the root).
# 2. debootstrap of Debian bookworm arm64 (minbase, python3, python3-venv,
#    python3-pip): Python 3.11, glibc 2.36. ~5 min here, 330 MB.
# 3. A venv at ROOT/opt/fedclient-venv with fedclient's device requirements: the
#    core dependencies and the [onnxruntime] and [tflite] extras, read from
#    pyproject.toml (`python3 bench/arm.py requirements`), installed by the root's own
#    pip under emulation (~3-4 min), so markers and wheel tags are aarch64's.
#
# It does nothing twice: rerun it after pyproject.toml changes to update the venv.
# Nothing of fedclient is installed in the root: arm.py mounts the repository.
set -euo pipefail

ROOT=${1:-/var/tmp/arm64-root}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
VENV=/opt/fedclient-venv
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "arm-setup.sh: run as root (apt-get, binfmt_misc, debootstrap, chroot)" >&2
    exit 1
fi

# 1. qemu-user-static and its binfmt_misc registration.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-user-static binfmt-support debootstrap
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then  # containers often lack the mount
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
fi
if ! head -1 /proc/sys/fs/binfmt_misc/qemu-aarch64 | grep -q enabled; then
    echo "arm-setup.sh: binfmt_misc has no enabled qemu-aarch64 entry" >&2
    exit 1
fi

# 2. The arm64 Debian root (both debootstrap stages: binfmt runs the second).
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$ROOT" "$MIRROR"
fi
# The host's resolver and any extra CA certificates (a proxy's), so the root's pip
# reaches PyPI the way the host's does.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null
fi

# 3. The venv, with the device requirements; a clean environment so that the host's
# PIP_* settings (local indexes, find-links) do not leak in.
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    in_root python3 -m venv "$VENV"
fi
python3 "$HERE/arm.py" requirements core onnxruntime tflite >"$ROOT/tmp/fedclient-requirements.txt"
in_root "$VENV/bin/pip" install --progress-bar off --disable-pip-version-check \
    -r /tmp/fedclient-requirements.txt
in_root "$VENV/bin/python" -c \
    'import platform, numpy, onnxruntime, ai_edge_litert; print("ready:", platform.machine(), platform.python_version(), "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)'
echo "arm-setup.sh: $ROOT is ready; run: python bench/arm.py --root $ROOT"
