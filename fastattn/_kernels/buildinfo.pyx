# What the compiled kernels were built with, and which of their code paths this CPU
# takes: read by fastattn.show_config(). The predicates are the kernels' own run-time
# dispatch functions (vecmath.h, tilegemm.h, tilehalf.h), compiled with the same flags.

cdef extern from *:
    """
    #include "tilehalf.h"      /* includes vecmath.h and tilegemm.h */

    static const char *fa_info_compiler(void)
    {
    #if defined(__clang__)
        return "clang " __clang_version__;
    #elif defined(__GNUC__)
        return "gcc " __VERSION__;
    #elif defined(_MSC_VER)
        return "MSVC";
    #else
        return "unknown";
    #endif
    }

    /* The ISA the build's own flags target (without run-time dispatch). */
    static const char *fa_info_baseline(void)
    {
    #if defined(__AVX512F__)
        return "AVX-512 (compiled in)";
    #elif defined(__AVX2__)
        return "AVX2 (compiled in)";
    #elif defined(__x86_64__)
        return "x86-64 baseline (SSE2)";
    #elif defined(__aarch64__)
        return "AArch64 (NEON)";
    #else
        return "the compiler's default";
    #endif
    }

    /* Vector row code (exp, max, sum, dot): 2 = 64-byte AVX-512, 1 = 32-byte AVX2+FMA,
     * 0 = 16-byte baseline; chosen at run time when the build has one version per ISA. */
    static int fa_info_vector_level(void)
    {
    #if FA_WIDTHS
        return fa_isa_level();
    #elif FA_NATIVE_BYTES == 64
        return 2;
    #elif FA_NATIVE_BYTES == 32
        return 1;
    #else
        return 0;
    #endif
    }

    static int fa_info_runtime_dispatch(void) { return FA_WIDTHS; }
    static int fa_info_tile_kernels(void) { return FA_TILE_KERNELS && fa_tile_products_ok(16); }
    #if FA_HALF_KERNELS
    static int fa_info_half_v4(void) { return fa_have_v4(); }
    static int fa_info_bf16_dot(void) { return fa_bf16_dot_ok(); }
    #else
    static int fa_info_half_v4(void) { return 0; }
    static int fa_info_bf16_dot(void) { return 0; }
    #endif
    #ifdef FASTATTN_NO_THREADS
    static int fa_info_threads(void) { return 0; }
    #else
    static int fa_info_threads(void) { return 1; }
    #endif
    #ifdef __OPTIMIZE__
    static int fa_info_optimized(void) { return 1; }
    #else
    static int fa_info_optimized(void) { return 0; }
    #endif
    """
    const char *fa_info_compiler()
    const char *fa_info_baseline()
    int fa_info_vector_level()
    int fa_info_runtime_dispatch()
    int fa_info_tile_kernels()
    int fa_info_half_v4()
    int fa_info_bf16_dot()
    int fa_info_threads()
    int fa_info_optimized()


def build_info():
    """The kernels' build and the code paths they take on this CPU, as a dict."""
    return {
        "compiler": fa_info_compiler().decode(),
        "optimized": bool(fa_info_optimized()),
        "baseline_isa": fa_info_baseline().decode(),
        "runtime_dispatch": bool(fa_info_runtime_dispatch()),
        "vector_level": fa_info_vector_level(),
        "tile_kernels": bool(fa_info_tile_kernels()),
        "half_avx512_f16c": bool(fa_info_half_v4()),
        "bf16_dot": bool(fa_info_bf16_dot()),
        "thread_pool": bool(fa_info_threads()),
    }
