#!/usr/bin/env bash
# serve_load.py's load with py-spy sampling the server process and its engine process for a few seconds in the
# middle of it: where each one's host time goes under load (raw stacks; bench/spy_top.py summarizes them).
# Usage: bench/serve_spy.sh OUT_DIR [serve_load.py flags]; needs py-spy on PATH (pip install py-spy).
set -euo pipefail
out=$1; shift
mkdir -p "$out"
python bench/serve_load.py --model default --server-log "$out/server.log" --out "$out/serve_load.json" "$@" &
load=$!
until grep -q "Uvicorn running" "$out/server.log" 2>/dev/null; do sleep 1; done
sleep 6  # the load is under way
server=$(pgrep -f "r1kit.cli serve" | head -1)
engine=$(pgrep -f "multiprocessing.spawn" -P "$server" | head -1)
py-spy record -d 8 -r 250 -f raw -o "$out/spy_server.txt" -p "$server" > /dev/null &
py-spy record -d 8 -r 250 -f raw -o "$out/spy_engine.txt" -p "$engine" > /dev/null || true
wait
