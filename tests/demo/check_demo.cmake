# Runs gpusvm-demo's end-to-end workload and checks what it reports: exit status 0, the key
# report lines, and the JSON file's shape (the one docs/demo.md documents for plot tools).
# Then the option check: an unknown backend is refused with exit status 2 and a clear message.
#   cmake -DDEMO=<gpusvm-demo> -DJSON=<scratch file> [-DBACKEND=host|vulkan] -P check_demo.cmake
# BACKEND (default host) is passed as --backend; the report must name it.
# require("<if() condition>" "<what failed>"): the condition is evaluated as if() code.
function(require cond msg)
  cmake_language(EVAL CODE "if(NOT (${cond}))\n message(FATAL_ERROR \"gpusvm-demo check failed: \${msg}\")\nendif()")
endfunction()

if(NOT BACKEND)
  set(BACKEND host)
endif()
file(REMOVE "${JSON}")
execute_process(COMMAND "${DEMO}" --backend "${BACKEND}" --json "${JSON}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
require("rc EQUAL 0" "exit status ${rc}")
foreach(line
    "through the runtime \\(backend '${BACKEND}[':]"
    "context: VM [0-9]+ in fault mode mirroring the whole address space"
    "\\[1\\] cpu-init" "\\[2\\] gpu-fault" "\\[3\\] prefetch" "\\[4\\] oversubscribe" "\\[5\\] madvise"
    "ok    the CPU read back every byte"
    "ok    atomics 'device'" "ok    atomics 'global'" "ok    atomics 'cpu'"
    "phase +ms +4K +64K +2M"
    "\n  total +[0-9.]+ "
    "residency of buffer 'thp' \\(4096 KiB\\), one char per 64 KiB"
    "oversubscribe +thp prefetched to VRAM +V+\n"
    "all checks passed")
  string(REGEX MATCH "${line}" hit "${out}")
  require("hit" "no line matching '${line}'")
endforeach()

file(READ "${JSON}" j)
string(JSON schema GET "${j}" schema)
require("schema STREQUAL \"gpusvm-demo/1\"" "schema '${schema}'")
string(JSON backend GET "${j}" backend)
string(FIND "${backend}" "${BACKEND}" at)
require("at EQUAL 0" "JSON backend '${backend}' is not ${BACKEND}")
string(JSON ok GET "${j}" ok)
require("ok" "JSON ok is ${ok}")
string(JSON nphases LENGTH "${j}" phases)
require("nphases EQUAL 5" "${nphases} phases in the JSON")
string(JSON chunk GET "${j}" residency chunk_bytes)
string(JSON bytes GET "${j}" residency bytes)
math(EXPR cells "${bytes} / ${chunk}")
string(JSON nrows LENGTH "${j}" residency rows)
require("nrows GREATER 5" "${nrows} residency rows")
math(EXPR last "${nrows} - 1")
foreach(i RANGE ${last})
  string(JSON row GET "${j}" residency rows ${i} cells)
  string(LENGTH "${row}" n)
  require("n EQUAL cells" "residency row ${i} has ${n} cells, expected ${cells}")
endforeach()
# Eviction happened, faults of every size the workload causes were counted, bytes moved both ways.
string(JSON evictions GET "${j}" phases 3 stats evictions)
require("evictions GREATER 0" "no eviction in the oversubscribed phase")
string(JSON f2m GET "${j}" totals faults_2m)
require("f2m GREATER 0" "no 2 MiB GPU fault")
string(JSON to_smem GET "${j}" totals copy_bytes_to_smem)
require("to_smem GREATER 0" "no bytes copied to system memory")

execute_process(COMMAND "${DEMO}" --backend cuda RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
require("rc EQUAL 2" "--backend cuda: exit status ${rc}")
string(FIND "${err}" "unknown backend 'cuda'" at)
require("at GREATER -1" "--backend cuda: no 'unknown backend' message (${err})")
