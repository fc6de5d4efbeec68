#!/usr/bin/env bash
# Builds the cxfed image FROM scratch, for machines that cannot pull a base image:
#
#   node/compose/scratch-image.sh [BINARY] [TAG]      # default: target/release/cxfed cxfed:dev
#
# The image holds the binary at /usr/local/bin/cxfed, exactly the shared libraries `ldd` lists
# for it (at the same paths), /etc/passwd and /etc/group with the cxfed user (uid/gid 10001),
# and nothing else: no shell, no package manager. Prints the image id.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/release/cxfed}"
tag="${2:-cxfed:dev}"
[ -x "$bin" ] || { echo "scratch-image: $bin is not an executable cxfed binary" >&2; exit 2; }
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc"
cp "$bin" "$root/usr/local/bin/cxfed"
# ldd lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
ldd "$bin" | awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/nonexistent\ncxfed:x:10001:10001:cxfed:/nonexistent:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\ncxfed:x:10001:\n' >"$root/etc/group"
cp "$here/Dockerfile.scratch" "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx"
