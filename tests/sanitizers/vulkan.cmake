# Sanitizer builds and Mesa's lavapipe: the one place that accommodates Mesa (which is not
# instrumented) in the ASan and TSan runs of the suites that open Vulkan devices.
#
# The problem: the Vulkan loader dlopen()s the ICD (libvulkan_lvp.so) at vkCreateInstance and
# dlclose()s it at vkDestroyInstance. lavapipe allocates process-lifetime state in one-time
# initialisers (pthread_once inside the ICD); once the ICD is unloaded those blocks are no
# longer reachable from its statics, and LeakSanitizer reports them as direct leaks from
# "<unknown module>" (the unloaded code cannot even be symbolised), about 50 per test binary.
#
# The accommodation: gpusvm_keep_lavapipe_loaded(target) links the test binary against the ICD
# itself, so it is loaded at start-up and the loader's dlopen/dlclose only move its reference
# count: Mesa's one-time state stays reachable (not a leak) and its frames stay symbolised.
# No suppression: nothing LeakSanitizer, AddressSanitizer or ThreadSanitizer reports is hidden,
# in our code or in Mesa's. Only sanitizer builds do this; elsewhere the loader alone decides.
function(gpusvm_keep_lavapipe_loaded target)
  if(NOT GPUSVM_SANITIZE OR NOT GPUSVM_VULKAN)
    return()
  endif()
  find_file(GPUSVM_LAVAPIPE_ICD libvulkan_lvp.so
            PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE} /usr/lib64 /usr/lib NO_DEFAULT_PATH)
  if(NOT GPUSVM_LAVAPIPE_ICD)
    message(STATUS "gpusvm: lavapipe ICD not found: sanitizer runs on Vulkan may report Mesa's one-time allocations")
    return()
  endif()
  target_link_options(${target} PRIVATE "LINKER:--no-as-needed" "${GPUSVM_LAVAPIPE_ICD}" "LINKER:--as-needed")
endfunction()
