#!/usr/bin/env bash
# The demo with several seeds: the figures of BENCHMARKS.md, "Known-truth demo".
# Usage: benchmarks/demo_seeds.sh [SEEDS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-5}
out=${2:-runs/bench/demo-seeds$seeds}
.venv/bin/soteacher demo --seeds "$seeds" --out "$out" --overwrite --quiet
