#!/usr/bin/env bash
# Builds the GPU binary and packs it for a GPU machine that gets it by copy: the release
# build with `--features cuda` is about 500 MB with its line tables and 100 MB stripped,
# more than a lent machine takes along (64 MiB); stripped and gzipped it is about 24 MB.
#
#   scripts/gpu-pack.sh        -> target/gpu/bertrain.gz
#
# On the GPU machine, `scripts/gpu-check.sh target/gpu/bertrain.gz` unpacks it itself.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --features cuda
mkdir -p target/gpu
strip -o target/gpu/bertrain target/release/bertrain
gzip -f target/gpu/bertrain
ls -l target/gpu/bertrain.gz
