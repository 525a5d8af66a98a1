#!/usr/bin/env bash
# GPU readiness check (issue #14, docs/gpu.md): the environment, the gpu-marked tests and the
# bf16 MFU of the reference and census70m VAEs and the DiT, in under 8 minutes on one H200.
#
#   bash bench/gpu_check.sh [--cpu-smoke] [--out DIR]
#
# Results go to DIR (default: $OUT if set, else ./gpu_check_results): gpu_check.log (all that
# is printed), gpu_check.json (each phase's exit code, seconds and timeout; the failed ones),
# env.json, tests.xml (JUnit) and mfu.json. Every phase has its own timeout, a failed phase does
# not stop the next ones, and the exit code is 1 when any failed (named at the end). Without a
# CUDA device it says so in one line and exits 2 before writing anything; --cpu-smoke runs the
# same phases on CPU (the tests' CPU variants, the MFU harness on tiny models) to check the script.
set -euo pipefail

# Phase timeouts on a GPU: 20 + 45 + 110 + 260 = 435 s, with the start-up checks (two torch
# imports) under 8 minutes. gpu_mfu skips the rows that no longer fit its budget, so it writes
# mfu.json before its own timeout.
SMI_S=20 ENV_S=45 TESTS_S=110 MFU_S=260 MFU_BUDGET_S=230
HELP_LINES='2,12p'

die() {
  echo "error: $*" >&2
  exit 2
}

smoke=0
out_dir="${OUT:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --out)
      [[ $# -ge 2 ]] || die "--out needs a folder; see 'bash bench/gpu_check.sh --help'"
      out_dir="$2"
      shift
      ;;
    -h | --help)
      sed -n "$HELP_LINES" "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1'; see 'bash bench/gpu_check.sh --help'" ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
repo="$PWD"
PY="${PYTHON:-python3}"
out_dir="${out_dir:-$repo/gpu_check_results}"

if [[ $smoke == 0 ]]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    torch_v=$("$PY" -c "import torch; print('torch', torch.__version__)" 2>/dev/null ||
      echo "torch not importable by $PY")
    die "no CUDA device visible to torch ($torch_v): nothing measured; bash bench/gpu_check.sh --cpu-smoke runs the same phases on CPU"
  fi
  device=(--device cuda --budget-s "$MFU_BUDGET_S")
  test_marks="gpu"
else
  device=(--device cpu --tiny)
  test_marks="not gpu and not slow"
  TESTS_S=900 MFU_S=600 # two shared CPU cores: minutes
fi
[[ -e "$out_dir" && ! -d "$out_dir" ]] && die "--out $out_dir is a file; name a folder"

# A bare GPU image has torch but not this package: link the repo's folders under a temporary
# atlasldm/ as pyproject's [tool.setuptools.package-dir] maps them, and keep the repo's own
# atlasldm/ (the namespace's top only) off sys.path (PYTHONSAFEPATH: no current folder).
link_note="installed atlasldm"
if ! "$PY" -c "import atlasldm.models.vae, atlasldm.bench" >/dev/null 2>&1; then
  links=$(mktemp -d)
  trap 'rm -rf "$links"' EXIT
  mkdir "$links/atlasldm"
  ln -s "$repo"/atlasldm/* "$links/atlasldm/"
  sed -n '/^\[tool.setuptools.package-dir\]/,/^\[/p' pyproject.toml |
    sed -n 's/^"atlasldm\.\([a-z_]*\)" = "\([^"]*\)"$/\1 \2/p' |
    while read -r name dir; do ln -s "$repo/$dir" "$links/atlasldm/$name"; done
  export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  link_note="atlasldm linked from the repo in $links (not installed)"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

mkdir -p "$out_dir"
log="$out_dir/gpu_check.log"
: >"$log"
echo "gpu_check: results in $out_dir (gpu_check.log, gpu_check.json, env.json, tests.xml, mfu.json); $link_note" |
  tee -a "$log"

names=() codes=() secs=() limits=()
run_phase() { # NAME TIMEOUT_S COMMAND...: run, log, record; never stops the script
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (timeout ${limit} s): $*" | tee -a "$log"
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  [[ $rc == 124 || $rc == 137 ]] && echo "== $name: timed out after ${limit} s" | tee -a "$log"
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$log"
  names+=("$name") codes+=("$rc") secs+=("$((SECONDS - start))") limits+=("$limit")
}

[[ $smoke == 0 ]] && run_phase nvidia-smi "$SMI_S" nvidia-smi
run_phase env "$ENV_S" "$PY" -m atlasldm.bench.gpu_mfu --env "${device[@]:0:2}" \
  --out "$out_dir/env.json"
run_phase tests "$TESTS_S" "$PY" -m pytest -q -ra -p no:cacheprovider --noconftest \
  -m "$test_marks" --junitxml="$out_dir/tests.xml" tests/test_attention.py tests/test_gpu.py
run_phase mfu "$MFU_S" "$PY" -m atlasldm.bench.gpu_mfu "${device[@]}" --out "$out_dir/mfu.json"

failed=()
phases=""
for i in "${!names[@]}"; do
  [[ ${codes[$i]} != 0 ]] && failed+=("${names[$i]}")
  phases+="${phases:+, }\"${names[$i]}\": {\"rc\": ${codes[$i]}, \"seconds\": ${secs[$i]}, \"timeout_s\": ${limits[$i]}}"
done
quoted=""
for name in "${failed[@]+"${failed[@]}"}"; do quoted+="${quoted:+, }\"$name\""; done
mode=$([[ $smoke == 1 ]] && echo cpu-smoke || echo gpu)
printf '{"mode": "%s", "seconds": %d, "phases": {%s}, "failed": [%s]}\n' \
  "$mode" "$SECONDS" "$phases" "$quoted" >"$out_dir/gpu_check.json"

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED: ${failed[*]} (${SECONDS} s; see $log)" | tee -a "$log"
  exit 1
fi
echo "gpu_check: every phase passed in ${SECONDS} s; results in $out_dir" | tee -a "$log"
