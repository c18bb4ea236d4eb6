#!/usr/bin/env bash
# gpusvm.sh: install what the build needs, build, run the demo, run the test suites.
#
#   ./gpusvm.sh demo [demo args...]   build gpusvm-demo (default preset) and run it
#   ./gpusvm.sh test [preset...]      build and run ctest for default, asan and tsan
#   ./gpusvm.sh build [preset]        configure and build one preset (default: default)
#   ./gpusvm.sh help
#
# Works on a fresh Debian 12 machine: missing Debian packages are installed with apt-get first
# (as root, or through sudo). See README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# Debian packages the build needs (checked with dpkg -s, installed only when missing).
# libclang-rt-dev carries clang's sanitizer run-times (ASan, UBSan, TSan): Debian 12's clang
# only recommends it, so it is named explicitly. nlohmann-json3-dev: gpusvm-bench --json;
# libbenchmark-dev: gpusvm-microbench; python3-matplotlib (brings python3, which a minimal
# Debian 12 lacks): tools/plot/gpusvm-plot and its ctest test. libvulkan-dev +
# mesa-vulkan-drivers: the refgpu Vulkan backend and lavapipe, the CPU Vulkan driver its tests
# run on (glslang-tools: GLSL compute shaders for the engines, DESIGN.md §5b; not used yet).
DEB_PACKAGES=(
  cmake ninja-build clang g++ ccache pkg-config
  libgtest-dev libgmock-dev googletest
  libspdlog-dev libfmt-dev libdrm-dev libcli11-dev libbenchmark-dev nlohmann-json3-dev
  libclang-rt-dev
  python3-matplotlib
  libvulkan-dev mesa-vulkan-drivers glslang-tools
)
TEST_PRESETS_DEFAULT=(default asan tsan)
ALL_PRESETS=(default asan tsan gcc release)
JOBS=2  # the CI machine has 2 cores

# Sanitizer run-time options (a caller's own value wins).
TSAN_OPTIONS_DEFAULT="halt_on_error=1 second_deadlock_stack=1"
ASAN_OPTIONS_DEFAULT="detect_leaks=1:abort_on_error=1"
UBSAN_OPTIONS_DEFAULT="print_stacktrace=1:halt_on_error=1"

# ---- output helpers ----

log() { printf '[gpusvm.sh] %s\n' "$*"; }
warn() { printf '[gpusvm.sh] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[gpusvm.sh] ERROR: %s\n' "$*" >&2
  exit 1
}

now() { date +%s.%N; }
# Seconds since $1, one decimal.
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }

PHASE_NAME=""
PHASE_START=""
TIMINGS=()  # "phase: N.Ns" lines, printed at the end
phase_begin() {
  PHASE_NAME="$1"
  PHASE_START="$(now)"
  log "==> $PHASE_NAME"
}
# phase_end STATUS: records and prints the phase's time.
phase_end() {
  local status="$1" t
  t="$(elapsed "$PHASE_START")"
  TIMINGS+=("$(printf '%-22s %7ss  %s' "$PHASE_NAME" "$t" "$status")")
  log "<== $PHASE_NAME: $status (${t}s)"
}
print_timings() {
  log "timings:"
  local line
  for line in "${TIMINGS[@]}"; do printf '    %s\n' "$line"; done
}

usage() {
  cat <<EOF
usage: ./gpusvm.sh <command> [args]

commands:
  demo [args...]      configure the 'default' preset, build its gpusvm-demo target, then run
                      build/default/tools/gpusvm-demo/gpusvm-demo with the given args (none:
                      the end-to-end workload; 'host-mm', 'dmirror': the tours; '--help')
  test [preset...]    for each preset (default: ${TEST_PRESETS_DEFAULT[*]}): configure, build,
                      and run 'ctest --preset <preset> -j$JOBS'. Goes on after a failure, prints
                      one summary line per preset and exits non-zero if any failed
  build [preset]      configure and build one preset (default: default; one of: ${ALL_PRESETS[*]})
  help                this text

Programs a build leaves under build/<preset>/tools/ (see docs/benchmarks.md):
  gpusvm-demo/gpusvm-demo           the demo ('demo' above)
  gpusvm-bench/gpusvm-bench         benchmarks against a baseline of the same run (--json, --list)
  gpusvm-microbench/gpusvm-microbench  Google Benchmark timings of single operations
and tools/plot/gpusvm-plot turns 'gpusvm-bench --json' output into PNG/SVG plots:
  build/release/tools/gpusvm-bench/gpusvm-bench --json > bench.jsonl
  tools/plot/gpusvm-plot bench.jsonl -o plots/

Every command first installs the Debian packages it needs when some are missing
(apt-get, as root or through sudo): ${DEB_PACKAGES[*]}

environment:
  GPUSVM_LOG          log level of the programs (trace, debug, info, warn, error, critical, off)
  TSAN_OPTIONS        default: $TSAN_OPTIONS_DEFAULT
  ASAN_OPTIONS        default: $ASAN_OPTIONS_DEFAULT
  UBSAN_OPTIONS       default: $UBSAN_OPTIONS_DEFAULT
EOF
}

# ---- dependencies ----

deb_installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'
}

ensure_deps() {
  phase_begin "dependencies"
  if ! command -v dpkg >/dev/null 2>&1; then
    warn "no dpkg: not a Debian system, skipping the package check (need: ${DEB_PACKAGES[*]})"
    phase_end "skipped"
    return 0
  fi
  local missing=() p
  for p in "${DEB_PACKAGES[@]}"; do
    deb_installed "$p" || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    phase_end "all installed"
    return 0
  fi
  log "missing Debian packages: ${missing[*]}"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 ||
      die "not root and no sudo: run as root: apt-get update && apt-get install -y ${missing[*]}"
    sudo=(sudo -n)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update </dev/null || die "apt-get update failed"
  "${sudo[@]}" apt-get install -y "${missing[@]}" </dev/null ||
    die "apt-get install failed: ${missing[*]}"
  for p in "${missing[@]}"; do
    deb_installed "$p" || die "package $p is still not installed"
  done
  phase_end "installed ${missing[*]}"
}

# ---- sanitizer environment probes ----
#
# Clang 14's TSan (and, more rarely, ASan) cannot run when the kernel randomizes mmap with more
# bits than its shadow layout allows (vm.mmap_rnd_bits > 28 on x86-64, common on 6.x kernels):
# every instrumented binary dies with "FATAL: ThreadSanitizer: unexpected memory mapping".
# gtest_discover_tests runs the test binaries at build time, so the build is affected as well
# as ctest. The probe compiles a tiny instrumented program and, if it fails, tries in order:
#   1. running under `setarch <arch> -R` (ASLR off for that process tree only);
#   2. `sysctl vm.mmap_rnd_bits=28` (system-wide; root only).
# The chosen wrapper (possibly empty) goes into SAN_WRAPPER_<kind>.

SAN_WRAPPER_thread=()
SAN_WRAPPER_address=()
PROBE_DIR="$ROOT/build/.sanitizer-probe"

# probe_run KIND [WRAPPER...]: runs the probe binary of KIND; 0 if it ran cleanly.
probe_run() {
  local kind="$1"
  shift
  local out
  out="$("$@" "$PROBE_DIR/probe-$kind" 2>&1)" && [[ "$out" == "probe ok" ]] && return 0
  printf '%s\n' "$out" | head -5 | sed 's/^/    probe: /' >&2
  return 1
}

set_mmap_rnd_bits() {
  if [[ $(id -u) -ne 0 ]]; then return 1; fi
  if command -v sysctl >/dev/null 2>&1; then
    sysctl -w vm.mmap_rnd_bits=28 >/dev/null 2>&1 && return 0
  fi
  [[ -w /proc/sys/vm/mmap_rnd_bits ]] && echo 28 >/proc/sys/vm/mmap_rnd_bits 2>/dev/null
}

# probe_sanitizer KIND (thread | address)
probe_sanitizer() {
  local kind="$1" name
  [[ "$kind" == thread ]] && name=TSan || name=ASan
  phase_begin "probe $name"
  mkdir -p "$PROBE_DIR"
  cat >"$PROBE_DIR/probe.cc" <<'EOF'
#include <cstdio>
#include <thread>
int shared_value;
int main() {
  std::thread t([] { shared_value = 1; });
  t.join();
  std::printf("probe %s\n", shared_value == 1 ? "ok" : "bad");
  return 0;
}
EOF
  if ! clang++ -std=c++20 -g -fsanitize="$kind" "$PROBE_DIR/probe.cc" -o "$PROBE_DIR/probe-$kind" \
    >"$PROBE_DIR/compile-$kind.log" 2>&1; then
    warn "$name probe does not compile (see $PROBE_DIR/compile-$kind.log)"
    phase_end "compile failed"
    return 0  # the real build will fail and say why
  fi
  local wrapper=() status
  if probe_run "$kind"; then
    status="ok"
  else
    local rnd
    rnd="$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo '?')"
    warn "$name binaries do not run here (vm.mmap_rnd_bits=$rnd); trying setarch -R"
    wrapper=(setarch "$(uname -m)" -R)
    if command -v setarch >/dev/null 2>&1 && probe_run "$kind" "${wrapper[@]}"; then
      status="ok under '${wrapper[*]}'"
    else
      wrapper=()
      warn "setarch -R did not help (or is not permitted); trying sysctl vm.mmap_rnd_bits=28"
      if set_mmap_rnd_bits && probe_run "$kind"; then
        status="ok after sysctl vm.mmap_rnd_bits=28 (system-wide)"
      else
        warn "$name binaries cannot run on this machine; the $name build will fail." \
          "Fix: sysctl vm.mmap_rnd_bits=28 as root, or run under 'setarch $(uname -m) -R'"
        status="broken"
      fi
    fi
  fi
  if [[ "$kind" == thread ]]; then
    SAN_WRAPPER_thread=("${wrapper[@]}")
  else
    SAN_WRAPPER_address=("${wrapper[@]}")
    # LeakSanitizer needs ptrace; some containers forbid it and LSan then fails every test.
    if [[ "$status" != broken ]] && [[ "${ASAN_OPTIONS:-$ASAN_OPTIONS_DEFAULT}" == *detect_leaks=1* ]]; then
      local out
      out="$(ASAN_OPTIONS=detect_leaks=1 "${wrapper[@]}" "$PROBE_DIR/probe-$kind" 2>&1 || true)"
      if [[ "$out" == *"LeakSanitizer has encountered a fatal error"* ]]; then
        warn "LeakSanitizer cannot run here (ptrace not permitted?): using detect_leaks=0"
        ASAN_LSAN_OFF=1
        status="$status, leak checking off"
      fi
    fi
  fi
  phase_end "$status"
}
ASAN_LSAN_OFF=0

# Sets SAN_ENV (env assignments) and SAN_WRAP (command prefix) for a preset.
SAN_ENV=()
SAN_WRAP=()
sanitizer_setup() {
  local preset="$1"
  SAN_ENV=()
  SAN_WRAP=()
  case "$preset" in
    tsan)
      [[ -n "${TSAN_PROBED:-}" ]] || { probe_sanitizer thread; TSAN_PROBED=1; }
      SAN_ENV=("TSAN_OPTIONS=${TSAN_OPTIONS:-$TSAN_OPTIONS_DEFAULT}")
      SAN_WRAP=("${SAN_WRAPPER_thread[@]}")
      ;;
    asan)
      [[ -n "${ASAN_PROBED:-}" ]] || { probe_sanitizer address; ASAN_PROBED=1; }
      local asan_opts="${ASAN_OPTIONS:-$ASAN_OPTIONS_DEFAULT}"
      [[ "$ASAN_LSAN_OFF" == 1 ]] && asan_opts="${asan_opts//detect_leaks=1/detect_leaks=0}"
      SAN_ENV=("ASAN_OPTIONS=$asan_opts" "UBSAN_OPTIONS=${UBSAN_OPTIONS:-$UBSAN_OPTIONS_DEFAULT}")
      SAN_WRAP=("${SAN_WRAPPER_address[@]}")
      ;;
  esac
}

# run_env CMD...: runs CMD with the preset's sanitizer environment and wrapper.
run_env() {
  env "${SAN_ENV[@]}" "${SAN_WRAP[@]}" "$@"
}

# ---- build ----

check_preset() {
  local p
  for p in "${ALL_PRESETS[@]}"; do [[ "$1" == "$p" ]] && return 0; done
  die "unknown preset '$1' (one of: ${ALL_PRESETS[*]})"
}

# configure_and_build PRESET [cmake --build args...]: 0 on success, 1 when the configure step
# failed, 2 when the build failed.
configure_and_build() {
  local preset="$1"
  shift
  sanitizer_setup "$preset"
  phase_begin "$preset: configure"
  if ! cmake --preset "$preset" </dev/null; then
    phase_end "FAILED"
    return 1
  fi
  phase_end "ok"
  phase_begin "$preset: build"
  # The wrapper matters here too: gtest_discover_tests runs the test binaries after linking.
  if ! run_env cmake --build --preset "$preset" -j "$JOBS" "$@" </dev/null; then
    phase_end "FAILED"
    return 2
  fi
  phase_end "ok"
}

# ---- commands ----

cmd_build() {
  local preset="${1:-default}"
  check_preset "$preset"
  ensure_deps
  local rc=0
  configure_and_build "$preset" || rc=1
  print_timings
  return "$rc"
}

cmd_demo() {
  if ! compgen -G "$ROOT/tools/gpusvm-demo/*.cc" >/dev/null; then
    die "tools/gpusvm-demo has no sources yet: the demo is not written"
  fi
  ensure_deps
  if ! configure_and_build default --target gpusvm-demo; then
    print_timings
    die "build failed"
  fi
  local demo="$ROOT/build/default/tools/gpusvm-demo/gpusvm-demo"
  [[ -x "$demo" ]] || die "$demo was not built"
  phase_begin "demo"
  local rc=0
  "$demo" "$@" || rc=$?
  phase_end "$([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)")"
  print_timings
  return "$rc"
}

# ctest_counts LOGFILE: prints "passed failed" from ctest's closing line ("0 0" if none).
ctest_counts() {
  local line total failed
  line="$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$1" | tail -1 || true)"
  if [[ -z "$line" ]]; then
    echo "0 0"
    return
  fi
  failed="$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")"
  total="$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")"
  echo "$((total - failed)) $failed"
}

# failed_tests LOGFILE: the names ctest lists under "The following tests FAILED:", one a line.
failed_tests() {
  sed -n '/^The following tests FAILED:/,/^[^[:space:]]/p' "$1" |
    sed -nE 's/^[[:space:]]+[0-9]+ - (.*) \([^)]*\)$/\1/p'
}

# print_failed_output PRESET NAME: the last lines of NAME's output in that preset's last ctest
# run. CI keeps only the tail of what this script prints, so the summary repeats them.
print_failed_output() {
  local file="$ROOT/build/$1/Testing/Temporary/LastTest.log"
  [[ -f "$file" ]] || return 0
  printf '    --- %s: %s: the first lines saying what went wrong, then the last of its output ---\n' "$1" "$2"
  # The first lines that say what went wrong (a sanitizer's report, a gtest failure, a
  # panic), then the tail.
  awk -v name="$2" '
    $0 ~ /^[0-9]+\/[0-9]+ Test: / { sub(/^[0-9]+\/[0-9]+ Test: /, ""); in_test = ($0 == name); if (in_test) n = k = 0; next }
    in_test && /^<end of output>/ { in_test = 0 }
    in_test && k < 12 && /(ERROR: |SUMMARY: |: Failure$|panic|FAILED: |#[0-9]+ 0x[0-9a-f]+ in gpusvm::)/ { key[k++] = $0 }
    in_test { lines[n++ % 30] = $0 }
    END {
      for (i = 0; i < k; i++) print "      " key[i]
      if (k) print "      ..."
      for (i = (n > 30 ? n - 30 : 0); i < n; i++) print "      " lines[i % 30]
    }
  ' "$file"
}

cmd_test() {
  local presets=("$@")
  [[ ${#presets[@]} -gt 0 ]] || presets=("${TEST_PRESETS_DEFAULT[@]}")
  local p
  for p in "${presets[@]}"; do check_preset "$p"; done
  ensure_deps

  local summary=() failures=() any_failed=0 total_passed=0 total_failed=0
  for p in "${presets[@]}"; do
    local start result log passed failed build_rc=0
    start="$(now)"
    # -k 0: a target that fails to build does not stop the others, so the suites that did
    # build still run below and the summary says which parts work.
    configure_and_build "$p" -- -k 0 || build_rc=$?
    if [[ $build_rc -eq 1 ]]; then
      result="FAILED (configure)"
      any_failed=1
      total_failed=$((total_failed + 1))
    else
      log="$ROOT/build/$p/ctest.log"
      phase_begin "$p: ctest"
      local rc=0
      run_env ctest --preset "$p" -j "$JOBS" </dev/null 2>&1 | tee "$log" || rc=$?
      read -r passed failed < <(ctest_counts "$log")
      total_passed=$((total_passed + passed))
      total_failed=$((total_failed + failed))
      if [[ $rc -eq 0 ]]; then
        result="PASSED ($passed tests)"
      else
        result="FAILED ($failed of $((passed + failed)) tests failed, ctest exit $rc)"
        # ctest failing without a failed test (no tests found, a crash): count it once.
        [[ $failed -gt 0 ]] || total_failed=$((total_failed + 1))
        local name
        while IFS= read -r name; do failures+=("$p"$'\t'"$name"); done < <(failed_tests "$log")
      fi
      phase_end "$result"
      if [[ $build_rc -ne 0 ]]; then
        result="FAILED (build; ctest: $result)"
        total_failed=$((total_failed + 1))
      fi
      [[ $rc -eq 0 && $build_rc -eq 0 ]] || any_failed=1
    fi
    summary+=("$(printf '%-8s %s in %ss' "$p:" "$result" "$(elapsed "$start")")")
  done

  print_timings
  log "summary:"
  local line
  for line in "${summary[@]}"; do printf '    %s\n' "$line"; done
  if [[ ${#failures[@]} -gt 0 ]]; then
    log "failed tests:"
    for line in "${failures[@]}"; do printf '    %s: %s\n' "${line%%$'\t'*}" "${line#*$'\t'}"; done
    for line in "${failures[@]}"; do print_failed_output "${line%%$'\t'*}" "${line#*$'\t'}"; done
  fi
  printf 'total: %d passed, %d failed\n' "$total_passed" "$total_failed"
  return "$any_failed"
}

main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    demo) cmd_demo "$@" ;;
    test) cmd_test "$@" ;;
    build) cmd_build "$@" ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
