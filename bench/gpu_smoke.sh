#!/usr/bin/env bash
# Spindle CUDA smoke run, one short call on the lent GPU machine (see ../shared/gpu/README.md):
#   bash bench/gpu_smoke.sh          (from the repo root; carry: [".whl"])
# The machine has python3.12 + torch + triton + pytest + transformers, no network, and grpcio/protobuf older
# than the generated stubs need: .whl/ holds the missing wheels (../shared/gpu/fetch_wheels.sh).
# Every stage has its own timeout and the script carries on past failures; logs go to $OUT (default /tmp).
# Total worst case ~6.5 min (stages: 30 + 20 + 170 + 150 + 120 s); normally far less.
set -uo pipefail
OUT=${OUT:-/tmp/spindle-gpu-smoke}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
S="$OUT/summary.txt"; log() { echo "== $(date +%T) $*" | tee -a "$S"; }
stage() { local rc=$1; shift; log "$* -> rc=$rc"; }  # rc 124: the stage hit its timeout

# 1. machine: GPU, python, torch, triton
log "machine"
timeout 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$S"
timeout 60 python3 -c 'import sys, torch, triton; p = torch.cuda.get_device_properties(0)
print("python", sys.version.split()[0], sys.executable, "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__, "|", p.name, p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")' 2>&1 | tee -a "$S"

# 2. packages: the carried wheels into /tmp/site (a venv made from the machine's python3, itself a venv at
#    /opt/torch/.venv, would see the *base* interpreter's site-packages without torch: so --target + PYTHONPATH),
#    and the project's four packages by path (pip -e would need setuptools from the network).
log "install wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tail -5 | tee -a "$S"; stage $? "pip install .whl"
else log "no .whl/ carried: using the machine's grpcio/protobuf"; fi
export PYTHONPATH="/tmp/site:$PWD/proto:$PWD/kernels:$PWD/server:$PWD/router:$PWD"
timeout 60 python3 - <<'EOF' 2>&1 | tee -a "$S"; stage $? "imports"
import grpc, google.protobuf as pb, tokenizers, safetensors, transformers, spindle_kernels
import spindle_proto.generate_pb2_grpc, spindle_server.engine.cuda_graphs, spindle_router.launcher
print("grpc", grpc.__version__, "protobuf", pb.__version__, "tokenizers", tokenizers.__version__, "safetensors",
      safetensors.__version__, "transformers", transformers.__version__,
      "| ops_for(cuda, 16):", spindle_kernels.ops_for("cuda", block_size=16).name,
      "| ops_for(cuda, 256):", spindle_kernels.ops_for("cuda", block_size=256).name)
EOF

# 3. every test marked gpu (compiled Triton kernels vs reference; captured decode graphs == eager), all of
#    them (no -x); -o timeout: pytest-timeout's per-test limit, when the plugin is there. tests/contract is
#    ignored: it needs kubernetes, which the machine lacks, and has no gpu tests.
log "pytest -m gpu"
timeout 170 python3 -m pytest tests/ -m gpu -v -rfEs --tb=short -p no:cacheprovider -o timeout=90 \
  --ignore=tests/contract --continue-on-collection-errors --durations=10 >"$OUT/pytest_gpu.txt" 2>&1; stage $? "pytest -m gpu"
grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -1 | tee -a "$S"
grep -E "^(FAILED|ERROR) " "$OUT/pytest_gpu.txt" | cut -c1-300 | tee -a "$S"

# 4. decode throughput on a random Llama-1B shape: copy yardstick, one-layer attention, full step eager/graph,
#    transformers generate for comparison
log "bench_gpu"
timeout 150 python3 bench/bench_gpu.py --batches 1,4,16,64,256 --context-len 1024 --hf-batches 1,16,64 \
  --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.txt" 2>&1; stage $? "bench_gpu"
tail -40 "$OUT/bench_gpu.txt"

# 5. served path: one shard (Triton, decode graphs) behind the router answers a request on models/demo
log "launcher"
python3 -m spindle_router.launcher --model-id models/demo --dtype bfloat16 --hostname 127.0.0.1 --port 8080 \
  --cuda-graphs 1,2,4,8 --shard-uds-path "/tmp/spindle-gpu-smoke-$$" >"$OUT/server.log" 2>&1 & PID=$!
timeout 110 python3 - <<'EOF' 2>&1 | tee -a "$S"; stage $? "request"
import json, time, urllib.request as u
t0 = time.time()
for _ in range(90):
    try: u.urlopen("http://127.0.0.1:8080/health", timeout=5); break
    except Exception: time.sleep(1)
print(f"healthy after {time.time() - t0:.1f}s")
body = {"inputs": "def fibonacci(n):", "parameters": {"max_new_tokens": 32, "details": True}}
req = u.Request("http://127.0.0.1:8080/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
t = time.time(); r = json.load(u.urlopen(req, timeout=60)); print(f"{time.time() - t:.2f}s", json.dumps(r)[:600])
print(u.urlopen("http://127.0.0.1:8080/info").read().decode()[:600])
EOF
kill -INT $PID 2>/dev/null; timeout 20 tail --pid=$PID -f /dev/null; kill -KILL $PID 2>/dev/null; wait $PID
stage $? "launcher exit"
grep -E "KV cache|CUDA graphs|Connected|Error|Traceback|dtype|attention" "$OUT/server.log" | cut -c1-300 | head -20 | tee -a "$S"
log "done"
