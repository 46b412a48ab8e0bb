#!/bin/bash
# On the H200 machine, after .gpu/a was unpacked (bench/gpu/README.md): installs vLLM and the gateway's
# missing packages, builds the model and 64 adapters, starts replicas A and B one after the other (setsid:
# they outlive this call), and waits until both answer. Safe to re-run: what is there already is kept.
set -e
cd "$(dirname "$0")/../.."
L=/root/logs; mkdir -p $L /root/gw
S=$(date +%s); el() { echo "[$(( $(date +%s) - S ))s] $*"; }
[ -f /tmp/site/vllm/__init__.py ] || { el install vllm; bash .gpu/b/install.sh 2>&1 | tail -1; }
[ -d /tmp/gwsite ] || { el install gateway wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gwsite .gwwhl/*.whl; }
[ -f /root/m/lora63/adapter_config.json ] || { el model; python3 bench/gpu/make_model.py /root/m 64; }
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
# With PROBE_DIR set, the replicas run with bench/gpu/probe on their path: timings of their LoRA loads,
# GPU-slot activations and steps (bench/gpu/probe/summary.py reads them).
export PYTHONPATH=${PROBE_DIR:+$PWD/bench/gpu/probe:}/tmp/site
up() { python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$1/health',timeout=2).status_code!=200)" 2>/dev/null; }
for r in "A 8001" "B 8002"; do set -- $r
  up $2 && continue
  el "replica $1"
  # --max-cpu-loras 64: vLLM alone holds all 64 adapters; the gateway sides register capacity 64 (the
  # same host cache; README: capacity = --max-cpu-loras) or, `gw-<policy>` without @, 16 (the issue's
  # first table).
  setsid nohup python3 -m vllm.entrypoints.cli.main serve /root/m/base --served-model-name mistral-7b \
    --host 127.0.0.1 --port $2 --enable-lora --max-loras 8 --max-cpu-loras 64 --max-lora-rank 16 \
    --max-num-seqs 64 --max-model-len 2048 --gpu-memory-utilization 0.42 > $L/vllm-$1.log 2>&1 < /dev/null &
  # The next replica starts only once this one is ready: two profiling GPU memory at once mis-size
  # their KV caches and one dies at start.
  for i in $(seq 200); do up $2 && break; sleep 2; done
  up $2 || { tail -30 $L/vllm-$1.log; exit 1; }
done
el ready; grep -hE "Maximum concurrency|KV cache memory" $L/vllm-*.log | tail -2
