#!/usr/bin/env bash
# Spindle CUDA smoke run, one short call on the lent GPU machine (see ../shared/gpu/README.md):
#   bash bench/gpu_smoke.sh          (from the repo root; carry: [".whl"])
# The machine has python3.12 + torch + triton + pytest + transformers, no network, and grpcio/protobuf older
# than the generated stubs need: .whl/ holds the missing wheels (../shared/gpu/fetch_wheels.sh).
# Every stage has its own timeout and the script carries on past failures; logs go to $OUT.
# Worst case 420 s (7 min): 10 + 20 + 40 + 20 + 150 (pytest -m gpu) + 100 (bench) + 70 (served) + 10.
# On CPU it runs through too (a dry run): the GPU stages report "needs CUDA" / skips and the served path runs
# on CPU. SMOKE_PORT (default 8080) and SITE (default /tmp/site) let a dry run stay out of others' way.
set -uo pipefail
OUT=${OUT:-/tmp/spindle-gpu-smoke}; mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}; PORT=${SMOKE_PORT:-8080}
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
S="$OUT/summary.txt"; : >"$S"; log() { echo "== $(date +%T) $*" | tee -a "$S"; }
stage() { local rc=$1; shift; log "$* -> rc=$rc"; }  # rc 124: the stage hit its timeout
START=$SECONDS

# 1. machine: GPU, python, torch, triton (10 + 20 s)
log "machine"
timeout 10 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$S"
timeout 20 python3 -c 'import sys, torch, triton
print("python", sys.version.split()[0], sys.executable, "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB, L2", getattr(p, "L2_cache_size", 0) >> 20, "MiB")
else:
    print("no CUDA device: a dry run")' 2>&1 | tee -a "$S"

# 2. packages (40 + 20 s): the carried wheels into $SITE (a venv made from the machine's python3, itself a venv at
#    /opt/torch/.venv, would see the *base* interpreter's site-packages without torch: so --target + PYTHONPATH),
#    and the project's four packages by path (pip -e would need setuptools from the network).
log "install wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl 2>&1 | tail -5 | tee -a "$S"; stage "${PIPESTATUS[0]}" "pip install .whl"
else log "no .whl/ carried: using this python's grpcio/protobuf"; fi
export PYTHONPATH="$SITE:$PWD/proto:$PWD/kernels:$PWD/server:$PWD/router:$PWD"
timeout 20 python3 - <<'EOF' 2>&1 | tee -a "$S"; stage "${PIPESTATUS[0]}" "imports"
import grpc, google.protobuf as pb, tokenizers, safetensors, spindle_kernels, torch
import spindle_proto.generate_pb2_grpc, spindle_server.engine.cuda_graphs, spindle_router.launcher
print("grpc", grpc.__version__, "protobuf", pb.__version__, "tokenizers", tokenizers.__version__, "safetensors",
      safetensors.__version__)
if torch.cuda.is_available():
    print("ops_for(cuda, 16):", spindle_kernels.ops_for("cuda", block_size=16).name,
          "| ops_for(cuda, 256):", spindle_kernels.ops_for("cuda", block_size=256).name)
EOF

# 3. every test marked gpu (150 s): compiled Triton kernels vs reference, no recompiles as batches vary, captured
#    decode graphs vs eager. No -x; -o timeout: pytest-timeout's per-test limit where the plugin is installed.
#    tests/contract is ignored: it needs kubernetes, which the machine lacks, and has no gpu tests.
log "pytest -m gpu"
timeout 150 python3 -m pytest tests/ -m gpu -v -rfEs --tb=short -p no:cacheprovider -o timeout=100 \
  --ignore=tests/contract --continue-on-collection-errors --durations=10 >"$OUT/pytest_gpu.txt" 2>&1
stage $? "pytest -m gpu"
grep -E "passed|failed|error|skipped" "$OUT/pytest_gpu.txt" | tail -1 | tee -a "$S"
grep -E "^(FAILED|ERROR) " "$OUT/pytest_gpu.txt" | cut -c1-300 | tee -a "$S"

# 4. decode on a random Llama-1B shape (100 s): copy yardstick, one-layer attention (graph of N calls over KV copies
#    > 2x L2), split-count sweep, full step eager/graph, transformers generate at batch 64 (the 10x comparison)
log "bench_gpu"
timeout 100 python3 bench/bench_gpu.py --batches 1,16,64,256 --context-len 1024 --hf-batches 64 --split-sweep 1,16,64,256 \
  --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.txt" 2>&1; stage $? "bench_gpu"
tail -45 "$OUT/bench_gpu.txt" | tee -a "$S"

# 5. served path (70 + 10 s): one shard (dtype auto, decode graphs) behind the router answers one request
log "launcher"
python3 -m spindle_router.launcher --model-id models/demo --dtype auto --hostname 127.0.0.1 --port "$PORT" \
  --cuda-graphs 1,2,4,8 --shard-uds-path "/tmp/spindle-gpu-smoke-$$" >"$OUT/server.log" 2>&1 & PID=$!
SMOKE_PORT=$PORT timeout 70 python3 - <<'EOF' 2>&1 | tee -a "$S"; stage "${PIPESTATUS[0]}" "request"
import json, os, time, urllib.request as u
base = f"http://127.0.0.1:{os.environ['SMOKE_PORT']}"
t0 = time.time()
while time.time() - t0 < 60:
    try: u.urlopen(f"{base}/health", timeout=5); break
    except Exception: time.sleep(1)
print(f"healthy after {time.time() - t0:.1f}s")
body = {"inputs": "def fibonacci(n):", "parameters": {"max_new_tokens": 32, "details": True}}
req = u.Request(f"{base}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
t = time.time(); r = json.load(u.urlopen(req, timeout=30)); print(f"{time.time() - t:.2f}s", json.dumps(r)[:600])
print(u.urlopen(f"{base}/info").read().decode()[:600])
EOF
kill -INT $PID 2>/dev/null; timeout 10 tail --pid=$PID -f /dev/null; kill -KILL $PID 2>/dev/null; wait $PID
stage $? "launcher exit"
grep -E "KV cache|CUDA graphs|Connected|Error|Traceback|dtype|attention|step cost" "$OUT/server.log" | cut -c1-300 | head -20 | tee -a "$S"
log "done in $((SECONDS - START)) s"
