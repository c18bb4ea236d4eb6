#!/usr/bin/env bash
# ctest gpusvm_plot: tools/plot/gpusvm-plot on the JSON of a tiny gpusvm-bench run.
#
#   plot_test.sh GPUSVM_BENCH GPUSVM_PLOT WORKDIR SAMPLE_JSONL
#
# 1. gpusvm-bench --json runs the size sweeps (thp-migration at 512 KiB and 1 MiB,
#    refgpu-copy at 2 MiB) and, when the build has it, fault-latency; the plot tool must
#    write the bandwidth-vs-size plots (and the latency histogram) as non-empty SVG and PNG.
# 2. The plot tool reads SAMPLE_JSONL (tests/plot/sample.jsonl: every documented shape, a
#    histogram, a series and a residency map) and must write each plot.
# 3. Bad input must fail with a message: a non-JSON line, and JSON with nothing to plot.
# Exit 77 (skipped) only when python3-matplotlib is missing.
set -euo pipefail
bench="$1" plot="$2" work="$3" sample="$4"

if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  echo "SKIPPED: python3-matplotlib is not installed (./gpusvm.sh installs it: apt-get install python3-matplotlib)"
  exit 77
fi
rm -rf "$work"
mkdir -p "$work"

expect_files() {  # DIR NAME...: each NAME.svg and NAME.png exists and is not empty
  local dir="$1" f
  shift
  for f in "$@"; do
    for ext in svg png; do
      if [[ ! -s "$dir/$f.$ext" ]]; then
        echo "FAIL: $dir/$f.$ext missing or empty; the directory holds:"
        ls -la "$dir"
        exit 1
      fi
    done
  done
}

# 1. A real bench run.
cases=(--case thp-migration --case refgpu-copy)
want=(sweep-thp-migration sweep-refgpu-copy)
if "$bench" --list | grep -q '^fault-latency'; then
  cases+=(--case fault-latency)
  want+=(hist-fault-latency)
fi
"$bench" "${cases[@]}" --size 2m --repeat 1 --json >"$work/bench.jsonl"
head -c 300 "$work/bench.jsonl"
echo
/usr/bin/python3 - "$work/bench.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert "run" in lines[0] and lines[0]["run"]["build_type"], "first line: the run record"
reports = lines[1:]
assert reports and all(r["ok"] for r in reports), "every case ok"
assert all("sweep" in r for r in reports if r["family"] in ("thp-migration", "refgpu-copy")), "sweeps marked"
print(f"bench.jsonl: run record + {len(reports)} report(s), each valid JSON")
PY
"$plot" "$work/bench.jsonl" -o "$work/bench"
expect_files "$work/bench" "${want[@]}"

# 2. Every documented shape.
"$plot" "$sample" -o "$work/sample"
expect_files "$work/sample" sweep-sample hist-fault-latency series-sample-series residency-demo-buffer

# 3. Bad input fails with a message.
printf '{"run": {}}\nnot json\n' >"$work/bad.jsonl"
if "$plot" "$work/bad.jsonl" -o "$work/bad" 2>"$work/bad.err"; then echo "FAIL: a non-JSON line was accepted"; exit 1; fi
grep -q 'bad.jsonl:2: not JSON' "$work/bad.err" || { echo "FAIL: no line number in: $(cat "$work/bad.err")"; exit 1; }
printf '{"run": {}}\n' >"$work/empty.jsonl"
if "$plot" "$work/empty.jsonl" -o "$work/empty" 2>"$work/empty.err"; then echo "FAIL: nothing to plot was accepted"; exit 1; fi
grep -q 'nothing to plot' "$work/empty.err" || { echo "FAIL: unclear message: $(cat "$work/empty.err")"; exit 1; }
echo "gpusvm-plot: ok"
