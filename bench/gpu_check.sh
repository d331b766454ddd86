#!/usr/bin/env bash
# One command for a GPU machine (no network; torch, triton and timm installed, diffusers optional):
# the kernel benchmarks, the GPU test tier, a profile, the offload and the CREPA-step benchmarks,
# into ${OUT:-bench/results}. Run from the repository root.
#   CHECK_BUDGET_S  seconds for the parts with a share (default 420); on top come up to 60 s for
#                   the kernel benchmark's last case (it stops starting cases when its share is
#                   spent), 60 s for probe, 90 s for host (120 with CHECK_HOST_BASE_ARCHIVE) and 105 s
#                   for profile;
#                   the A/B writes its JSON after each
#                   dtype
#   CREPA_COMMIT    the commit to record when the checkout has no .git
#   CHECK_PARTS     comma-separated parts to run (default all but tune): bench,tests,probe,ab,offload,host,
#                   profile,step, and tune (opt-in, last: the launch-setting sweep of bench/tune_kernels.py at
#                   wan480, then, given 160 s or more, an A/B of its winners on whole calls in its last
#                   70 s; CHECK_TUNE_S seconds, default 240, at least 90, on top of the budget); each
#                   part keeps its share of CHECK_BUDGET_S when others are left out
#   CHECK_HOST_BASE, CHECK_HOST_BASE_ARCHIVE  with the host part: also time the host cost against that
#                   revision (its `git archive REV crepa_kernels` tar), interleaved, into host_ab.json
#   CHECK_DEADLINE_S  seconds from the start by which the script must be done (default 480; 0:
#                   none); each part's limit is cut to what is left (10 s kept for the end), and a
#                   part with under 20 s left is skipped, so a caller's own time limit never cuts
#                   a part's output short
# When OUT is set and a run writes more than 7 files there, they are packed into
# OUT/gpu_check_results.tgz at the end (for runners that copy back only a few files).
# Python wheels placed under .whl/ (e.g. diffusers, for a machine without network) are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
BUDGET=${CHECK_BUDGET_S:-420}
if ! [[ "$BUDGET" =~ ^[0-9]{1,6}$ ]]; then
  echo "CHECK_BUDGET_S: expected a whole number of seconds, got '$BUDGET'" >&2
  exit 2
fi
BUDGET=$(( 10#$BUDGET ))  # base 10: a leading zero is not octal
DEFAULT_PARTS="bench,tests,probe,ab,offload,host,profile,step"
ALL_PARTS="$DEFAULT_PARTS,tune"
PARTS=",${CHECK_PARTS:-$DEFAULT_PARTS},"
PARTS=${PARTS// /}
for part in ${PARTS//,/ }; do
  if [[ ",$ALL_PARTS," != *",$part,"* ]]; then
    echo "CHECK_PARTS: unknown part '$part' (expected a comma-separated subset of $ALL_PARTS)" >&2
    exit 2
  fi
done
want() { [[ "$PARTS" == *",$1,"* ]]; }
DEADLINE=${CHECK_DEADLINE_S:-480}
if ! [[ "$DEADLINE" =~ ^[0-9]{1,6}$ ]]; then
  echo "CHECK_DEADLINE_S: expected a whole number of seconds, got '$DEADLINE'" >&2
  exit 2
fi
DEADLINE=$(( 10#$DEADLINE ))  # base 10: a leading zero is not octal
TUNE_S=${CHECK_TUNE_S:-240}
if ! [[ "$TUNE_S" =~ ^[0-9]{1,6}$ ]]; then
  echo "CHECK_TUNE_S: expected a whole number of seconds, got '$TUNE_S'" >&2
  exit 2
fi
TUNE_S=$(( 10#$TUNE_S ))
# fits NAME SECONDS: sets LIMIT to SECONDS cut to what is left before the deadline; false (with a
# message) when under 20 s are left.
fits() {
  LIMIT=$2
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$(( DEADLINE - SECONDS - 10 ))
    if [ "$left" -lt 20 ]; then
      echo "== $1 skipped: ${left}s left before CHECK_DEADLINE_S=${DEADLINE}"
      skipped="$skipped $1"
      return 1
    fi
    [ "$left" -lt "$LIMIT" ] && LIMIT=$left
  fi
  return 0
}
skipped=""
mkdir -p "$OUT_DIR"
# what OUT_DIR held before this run (mtime, size, name): a file whose line is not here was written by
# it. A timestamp marker would miss a file written within the marker's clock tick.
listing() { find "$OUT_DIR" -maxdepth 1 -type f -printf '%T@ %s %f\n' | sort; }
before=$(listing)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
status=0
test_rc=skipped
# Shares of the budget; host (at most 90 s, 120 with a host A/B), probe (at most 60 s) and profile
# (at most 105 s) come on top. The test tier's
# 35% (133 s at the 380 s budget a 10-minute device command leaves room for; 147 s at the default)
# covers its 2^31-element cases, which compile the kernels again for 64-bit strides.
bench_s=$(( BUDGET * 15 / 100 )); tests_s=$(( BUDGET * 35 / 100 )); ab_s=$(( BUDGET * 20 / 100 ))
offload_s=$(( BUDGET * 10 / 100 )); step_s=$(( BUDGET * 20 / 100 ))

if want bench && fits bench $(( bench_s + 60 )); then
  # the suite stops starting cases when its budget is spent; the rest of the limit covers the last case
  budget=$(( LIMIT - 60 < bench_s ? LIMIT - 60 : bench_s )); [ "$budget" -lt 10 ] && budget=10
  echo "== kernel benchmarks (budget ${budget}s)"
  # it turns SIGTERM into a clean stop; -k kills it 10 s later should a CUDA call hang (a Python handler
  # runs only when the C code returns)
  timeout -k 10 "$(( LIMIT - 10 ))" python3 bench/gpu_check.py --out "$OUT_DIR" --budget-s "$budget" || status=1
fi

if want tests && fits tests "$tests_s"; then
  echo "== GPU test tier (limit ${LIMIT}s)"
  timeout "$LIMIT" python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=12 2>&1 | tee "$OUT_DIR/gpu_tests.log"
  test_rc=${PIPESTATUS[0]}
  [ "$test_rc" -eq 0 ] || status=1
fi

if want probe && fits probe 60; then
  # each similarity kernel alone at neighbour distance 0, 1 and 2, beside a plain read of the inputs:
  # whether re-reading the neighbour frames bounds the kernels (see the script's docstring)
  echo "== bandwidth probe at wan480 (limit ${LIMIT}s)"
  timeout "$LIMIT" python3 bench/probe_bandwidth.py --preset wan480 --dtypes fp32 \
    --out "$OUT_DIR/probe_wan480.json" || status=1
fi

if want ab && fits ab "$ab_s"; then
  echo "== interleaved A/B at wan480: defaults vs the row-form and the banded one-pass backwards, Triton's own launch"
  timeout "$LIMIT" python3 bench/ab_settings.py --preset wan480 --dtypes fp32,bf16 --rounds 5 \
    --variant default= --variant row_bwd=CREPA_KERNELS_ROW_BWD=1 \
    --variant merged_bwd=CREPA_KERNELS_MERGED_BWD=1 \
    --variant triton_launch=CREPA_KERNELS_FAST_LAUNCH=0 \
    --out "$OUT_DIR/ab_switches_wan480.json" 2>&1 | tail -n 16 || status=1
fi

if want offload && fits offload "$offload_s"; then
  echo "== offload benchmark (limit ${LIMIT}s)"
  timeout "$LIMIT" python3 bench/bench_offload.py --out "$OUT_DIR/offload.json" 2>&1 | tail -n 30 || status=1
fi
if want host && fits host 60; then
  echo "== host cost of a call, kernels stubbed (direct vs custom-op front end)"
  timeout "$LIMIT" python3 -m pytest -q bench/test_bench_host.py --benchmark-enable -p no:cacheprovider \
    --benchmark-json "$OUT_DIR/host_cost.json" --benchmark-columns=min,median,max 2>&1 | tail -n 12 || status=1
  # where that host time goes: a cProfile of the stubbed call and the cost of each torch primitive it uses
  if fits host_profile 30; then
    timeout "$LIMIT" python3 bench/host_profile.py --out "$OUT_DIR/host_profile.txt" > /dev/null || status=1
  fi
  # this checkout's host cost against another revision's, CUDA tensors, interleaved (CHECK_HOST_BASE names
  # the revision, CHECK_HOST_BASE_ARCHIVE its `git archive REV crepa_kernels` tar: the machine has no git)
  if [ -n "${CHECK_HOST_BASE:-}" ] && [ -z "${CHECK_HOST_BASE_ARCHIVE:-}" ]; then
    echo "== host A/B skipped: CHECK_HOST_BASE needs CHECK_HOST_BASE_ARCHIVE (the base's git archive tar)"
  fi
  if [ -n "${CHECK_HOST_BASE_ARCHIVE:-}" ] && fits host_ab 30; then
    echo "== host cost against ${CHECK_HOST_BASE:-base}, CUDA tensors, kernels stubbed"
    timeout "$LIMIT" python3 bench/host_ab.py --device cuda --base "${CHECK_HOST_BASE:-base}" \
      --base-archive "$CHECK_HOST_BASE_ARCHIVE" --rounds 15 --calls 300 --out "$OUT_DIR/host_ab.json" || status=1
  fi
fi
if want profile && fits profile 60; then
  echo "== profile of the wan480 step (kernel table, host enqueue cost)"
  timeout "$LIMIT" python3 bench/profile_loss.py --preset wan480 --dtype fp32 --iters 10 \
    --out "$OUT_DIR/profile_wan480_fp32.txt" > /dev/null || status=1  # the table goes to the file
  # the row-form one-pass backward's kernel time on its own (the A/B times it only with the host included)
  if fits profile_row_bwd 45; then
    CREPA_KERNELS_ROW_BWD=1 timeout "$LIMIT" python3 bench/profile_loss.py --preset wan480 --dtype fp32 \
      --iters 10 --backends triton --out "$OUT_DIR/profile_wan480_fp32_row_bwd.txt" > /dev/null || status=1
  fi
fi

if ! want step || ! fits step "$step_s"; then
  :
elif python3 -c "import diffusers" 2>/dev/null; then
  echo "== CREPA step benchmark (limit ${LIMIT}s; 6 latent frames = 21 video frames)"
  timeout "$LIMIT" python3 bench/bench_step.py --latent-frames 6 --steps 3 --out "$OUT_DIR/step.json" 2>&1 \
    | tee "$OUT_DIR/step.log" \
    | tail -n 20 || status=1
else
  echo "== CREPA step benchmark skipped: diffusers is not importable (carry its wheel in .whl/)"
fi
if want tune && fits tune "$TUNE_S"; then
  if [ "$LIMIT" -lt 90 ]; then
    echo "== tune skipped: it needs at least 90 s and has ${LIMIT}s (CHECK_TUNE_S=${TUNE_S}, CHECK_DEADLINE_S=${DEADLINE})"
  else
    # The sweep stops starting variants at its budget, 45 s before its limit (for the variant in flight
    # and the defaults still to come); a part of 160 s or more keeps its last 70 s for timing the
    # winners on whole calls.
    tune_end=$(( SECONDS + LIMIT ))
    sweep_limit=$(( LIMIT >= 160 ? LIMIT - 70 : LIMIT ))
    budget=$(( sweep_limit - 45 ))
    rm -f "$OUT_DIR/tune_wan480.json"  # the A/B must read this run's report, not an earlier one
    echo "== launch-setting sweep of the hot kernels at wan480 (limit ${sweep_limit}s, budget ${budget}s)"
    timeout "$sweep_limit" python3 bench/tune_kernels.py --preset wan480 --dtypes fp32,bf16 --budget-s "$budget" \
      --out "$OUT_DIR/tune_wan480.json" || status=1
    ab_limit=$(( tune_end - SECONDS ))
    if [ "$LIMIT" -lt 160 ]; then
      echo "== A/B of the sweep's winners skipped: the part had ${LIMIT}s, under 160"
    elif [ ! -s "$OUT_DIR/tune_wan480.json" ]; then
      echo "== A/B of the sweep's winners skipped: the sweep wrote no report"
    elif [ "$ab_limit" -ge 20 ]; then
      echo "== interleaved A/B at wan480: defaults vs the sweep's best settings (limit ${ab_limit}s)"
      timeout "$ab_limit" python3 bench/ab_settings.py --preset wan480 --dtypes fp32,bf16 --rounds 5 \
        --variant default= --tuned "$OUT_DIR/tune_wan480.json" --out "$OUT_DIR/ab_tuned_wan480.json" 2>&1 \
        | tail -n 8 || status=1
    fi
  fi
fi

if [ -n "${OUT:-}" ]; then
  mapfile -t written < <(comm -13 <(printf '%s\n' "$before") <(listing) | cut -d' ' -f3- | sort)
  if [ "${#written[@]}" -gt 7 ]; then
    if tar czf "$OUT_DIR/gpu_check_results.tgz" -C "$OUT_DIR" "${written[@]}"; then
      (cd "$OUT_DIR" && rm -f "${written[@]}")
      echo "packed ${#written[@]} files into $OUT_DIR/gpu_check_results.tgz: ${written[*]}"
    fi
  fi
fi
echo "gpu_check: tests rc=$test_rc, overall status=$status, ${SECONDS}s${skipped:+, skipped by the deadline:$skipped}"
exit $status
