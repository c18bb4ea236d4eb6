# gpusvm_add_layer: one layer of the gpusvm library (DESIGN.md §1), with what a consumer needs.
#
#   gpusvm_add_layer(<name> [INTERFACE] [SOURCES <file>...] [PUBLIC <dependency>...])
#
# Creates the static library gpusvm_<name> (an INTERFACE library with INTERFACE: headers only)
# with the alias gpusvm::<name>, the same name it has in the installed package, and gives it:
#  - the usage requirement of the include root: headers include each other from the tree's
#    root ("gpusvm/mm/vma.h", "drivers/devfs/process.h", "uapi/dmirror.h"); installed, that
#    root is <prefix>/include/gpusvm, so the same include lines work and nothing lands
#    directly in <prefix>/include under a generic name such as "uapi/" or "drivers/";
#  - its PUBLIC dependencies (other layers as gpusvm::<layer>, or imported targets that
#    gpusvmConfig.cmake finds again with find_dependency);
#  - install rules: the archive, and every header of the folder except *_internal.h;
#  - a place in the umbrella gpusvm::gpusvm and in gpusvm.pc.
# Call it in dependency order (base first): gpusvm.pc lists the archives in reverse, which is
# the order a static link needs. A new layer is one call in its folder's CMakeLists.txt plus
# its add_subdirectory in the top-level CMakeLists.txt.
function(gpusvm_add_layer name)
  cmake_parse_arguments(PARSE_ARGV 1 L "INTERFACE" "" "SOURCES;PUBLIC")
  set(target gpusvm_${name})
  if(L_INTERFACE)
    add_library(${target} INTERFACE)
    set(scope INTERFACE)
  else()
    add_library(${target} STATIC ${L_SOURCES})
    set(scope PUBLIC)
    # C++20 in the public headers (uapi, the INTERFACE layer, is C and stays so).
    target_compile_features(${target} PUBLIC cxx_std_20)
    set_property(GLOBAL APPEND PROPERTY GPUSVM_ARCHIVE_LAYERS ${name})
  endif()
  add_library(gpusvm::${name} ALIAS ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name})
  target_include_directories(${target} ${scope}
    $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}>
    $<INSTALL_INTERFACE:${GPUSVM_INSTALL_INCLUDEDIR}>)
  if(L_PUBLIC)
    target_link_libraries(${target} ${scope} ${L_PUBLIC})
  endif()
  set_property(GLOBAL APPEND PROPERTY GPUSVM_LAYERS ${name})

  install(TARGETS ${target} EXPORT gpusvmTargets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
  file(GLOB headers CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.h)
  list(FILTER headers EXCLUDE REGEX "_internal\\.h$")
  file(RELATIVE_PATH folder ${PROJECT_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR})
  install(FILES ${headers} DESTINATION ${GPUSVM_INSTALL_INCLUDEDIR}/${folder})
endfunction()

# gpusvm_finish_package: the umbrella target gpusvm::gpusvm, the exported targets,
# gpusvmConfig.cmake + version file and gpusvm.pc. Call once, after the last layer.
function(gpusvm_finish_package)
  get_property(layers GLOBAL PROPERTY GPUSVM_LAYERS)
  get_property(archives GLOBAL PROPERTY GPUSVM_ARCHIVE_LAYERS)

  add_library(gpusvm INTERFACE)
  add_library(gpusvm::gpusvm ALIAS gpusvm)
  foreach(layer IN LISTS layers)
    target_link_libraries(gpusvm INTERFACE gpusvm::${layer})
  endforeach()
  install(TARGETS gpusvm EXPORT gpusvmTargets)

  set(cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/gpusvm)
  install(EXPORT gpusvmTargets NAMESPACE gpusvm:: DESTINATION ${cmake_dir})
  include(CMakePackageConfigHelpers)
  set(GPUSVM_CONFIG_LAYERS ${layers})
  configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/gpusvmConfig.cmake.in
    ${PROJECT_BINARY_DIR}/gpusvmConfig.cmake INSTALL_DESTINATION ${cmake_dir})
  # 0.x: a minor version may change the API.
  write_basic_package_version_file(${PROJECT_BINARY_DIR}/gpusvmConfigVersion.cmake
    COMPATIBILITY SameMinorVersion)
  install(FILES ${PROJECT_BINARY_DIR}/gpusvmConfig.cmake
                ${PROJECT_BINARY_DIR}/gpusvmConfigVersion.cmake DESTINATION ${cmake_dir})

  # gpusvm.pc: the archives in link order (the layer above before the one below), the prefix
  # found from the file's own place so that `cmake --install --prefix <dir>` stays usable.
  set(GPUSVM_PC_LIBS "")
  list(REVERSE archives)
  foreach(layer IN LISTS archives)
    string(APPEND GPUSVM_PC_LIBS " -lgpusvm_${layer}")
  endforeach()
  set(GPUSVM_PC_LINK_FLAGS "-pthread")
  if(GPUSVM_VULKAN)
    string(APPEND GPUSVM_PC_LINK_FLAGS " -lvulkan")
  endif()
  if(GPUSVM_SANITIZE_LINK_FLAG)
    string(APPEND GPUSVM_PC_LINK_FLAGS " ${GPUSVM_SANITIZE_LINK_FLAG}")
  endif()
  set(pc_dir ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
  file(RELATIVE_PATH GPUSVM_PC_TO_PREFIX /${pc_dir} /)
  string(REGEX REPLACE "/$" "" GPUSVM_PC_TO_PREFIX "${GPUSVM_PC_TO_PREFIX}")
  configure_file(${PROJECT_SOURCE_DIR}/cmake/gpusvm.pc.in ${PROJECT_BINARY_DIR}/gpusvm.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/gpusvm.pc DESTINATION ${pc_dir})
endfunction()
