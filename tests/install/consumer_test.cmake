# The install test (cmake -P): installs the current build into a scratch prefix and builds and
# runs tests/install/consumer against it, the way a project outside the tree would use gpusvm:
#   0. configure the gpusvm tree library-only (GPUSVM_BUILD_TESTS/TOOLS=OFF) with GoogleTest,
#      CLI11 and Google Benchmark hidden: a library consumer must not need them;
#   1. cmake --install <build> --prefix <work>/prefix;
#   2. find_package(gpusvm): configure, build and run the consumer project (three programs: one
#      linked to gpusvm::dmirror, one to the umbrella gpusvm::gpusvm, and the runtime's example
#      linked to gpusvm::runtime);
#   3. pkg-config: compile the same main.cc with `pkg-config --cflags --libs gpusvm` and run it.
# Nothing is downloaded. Inputs (-D): SOURCE_DIR, BUILD_DIR, WORK_DIR, CXX, GENERATOR,
# MAKE_PROGRAM, BUILD_TYPE, PKG_CONFIG.
cmake_minimum_required(VERSION 3.25)

foreach(var SOURCE_DIR BUILD_DIR WORK_DIR CXX GENERATOR BUILD_TYPE PKG_CONFIG)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "consumer_test.cmake: -D${var}=... missing")
  endif()
endforeach()

# step(<name> <command>...): runs a command, fails the test with its output if it fails.
function(step name)
  message(STATUS "[install test] ${name}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[install test] ${name} failed (${rc}):\n${ARGN}\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
set(generator_args -G ${GENERATOR})
if(MAKE_PROGRAM)
  list(APPEND generator_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()

step("configure the library alone, without test and tool dependencies"
  ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/library-only ${generator_args}
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
    -DGPUSVM_BUILD_TESTS=OFF -DGPUSVM_BUILD_TOOLS=OFF
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DCMAKE_DISABLE_FIND_PACKAGE_CLI11=ON
    -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON)

step("cmake --install into ${prefix}" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

step("find_package(gpusvm): configure the consumer"
  ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/cmake-consumer
    ${generator_args} -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
step("find_package(gpusvm): build the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-consumer)
foreach(program gpusvm-consumer gpusvm-consumer-umbrella gpusvm-consumer-runtime)
  step("run ${program} (find_package)" ${WORK_DIR}/cmake-consumer/${program})
  message(STATUS "${step_output}")
endforeach()

# pkg-config, as a Makefile or a shell would use it: the .pc found from PKG_CONFIG_PATH only.
set(ENV{PKG_CONFIG_PATH} "")
file(GLOB_RECURSE pc_files ${prefix}/*/gpusvm.pc)
list(LENGTH pc_files n_pc)
if(NOT n_pc EQUAL 1)
  message(FATAL_ERROR "[install test] expected one gpusvm.pc under ${prefix}, found: ${pc_files}")
endif()
get_filename_component(pc_dir ${pc_files} DIRECTORY)
set(ENV{PKG_CONFIG_PATH} ${pc_dir})
step("pkg-config --cflags --libs gpusvm" ${PKG_CONFIG} --cflags --libs gpusvm)
string(STRIP "${step_output}" pc_flags)
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
file(MAKE_DIRECTORY ${WORK_DIR}/pkg-config-consumer)
step("pkg-config: build the consumer"
  ${CXX} -std=c++20 ${SOURCE_DIR}/tests/install/consumer/main.cc
    -o ${WORK_DIR}/pkg-config-consumer/gpusvm-consumer ${pc_flags})
step("run gpusvm-consumer (pkg-config)" ${WORK_DIR}/pkg-config-consumer/gpusvm-consumer)
message(STATUS "${step_output}")
message(STATUS "[install test] passed")
