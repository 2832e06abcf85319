/* The CPU check of the fast builds (scripts/build-fast.sh), linked into every binary of such a
 * build by build.rs, which compiles it for baseline x86-64 and defines MPS_BUILD ("x86-64-v3")
 * and MPS_REQUIRED (the CPU features rustc was allowed to use, comma-separated).
 *
 * Why C, and why a constructor: once Rust code is compiled with AVX enabled, the compiler may use
 * AVX instructions anywhere — for a 32-byte copy in the first line of main — so a check written
 * in that Rust dies of SIGILL on exactly the CPUs it is meant to catch (measured: qemu-x86_64
 * -cpu Nehalem). This file is compiled without AVX and runs from .init_array, before Rust's main.
 * On a CPU that lacks a required feature it names the missing ones and exits with 78 (EX_CONFIG),
 * so systemd's RestartPreventExitStatus=78 does not restart it into the same error.
 *
 * A CPUID bit is not enough for the AVX family: its instructions also need the operating system
 * to save their registers (the XSAVE state, OSXSAVE and XCR0). A kernel booted with `noxsave`,
 * or a hypervisor that passes the CPUID bits through but not the state, leaves AVX reported and
 * unusable; such features are named "disabled by the OS" rather than run into a SIGILL. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

struct feature {
    const char *name; /* rustc's name */
    unsigned leaf, subleaf, reg, bit; /* reg: 0 eax, 1 ebx, 2 ecx, 3 edx */
    unsigned state; /* XCR0 bits the OS must enable for it: none, or YMM, or YMM and AVX-512 */
};

#define YMM 0x06u /* XCR0: SSE and AVX state */
#define ZMM 0xe6u /* XCR0: SSE, AVX, opmask, ZMM0-15 and ZMM16-31 state */

static const struct feature FEATURES[] = {
    {"sse3", 1, 0, 2, 0, 0},          {"pclmulqdq", 1, 0, 2, 1, 0},
    {"ssse3", 1, 0, 2, 9, 0},         {"fma", 1, 0, 2, 12, YMM},
    {"cmpxchg16b", 1, 0, 2, 13, 0},   {"sse4.1", 1, 0, 2, 19, 0},
    {"sse4.2", 1, 0, 2, 20, 0},       {"movbe", 1, 0, 2, 22, 0},
    {"popcnt", 1, 0, 2, 23, 0},       {"aes", 1, 0, 2, 25, 0},
    {"xsave", 1, 0, 2, 26, 0},        {"avx", 1, 0, 2, 28, YMM},
    {"f16c", 1, 0, 2, 29, YMM},       {"bmi1", 7, 0, 1, 3, 0},
    {"avx2", 7, 0, 1, 5, YMM},        {"bmi2", 7, 0, 1, 8, 0},
    {"avx512f", 7, 0, 1, 16, ZMM},    {"avx512dq", 7, 0, 1, 17, ZMM},
    {"adx", 7, 0, 1, 19, 0},          {"avx512ifma", 7, 0, 1, 21, ZMM},
    {"avx512cd", 7, 0, 1, 28, ZMM},   {"sha", 7, 0, 1, 29, 0},
    {"avx512bw", 7, 0, 1, 30, ZMM},   {"avx512vl", 7, 0, 1, 31, ZMM},
    {"avx512vbmi", 7, 0, 2, 1, ZMM},  {"lzcnt", 0x80000001, 0, 2, 5, 0},
};

/* The register state the OS has enabled: XCR0, or 0 where it has not enabled XSAVE (OSXSAVE,
 * CPUID.1:ECX bit 27, clear), in which case XGETBV itself would fault. */
static unsigned long long os_state(void) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1)) return 0;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

enum { ABSENT, PRESENT, DISABLED_BY_OS, UNKNOWN };

/* UNKNOWN: not a feature this check knows (baseline ones such as sse2). */
static int present(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof FEATURES / sizeof FEATURES[0]; i++) {
        const struct feature *f = &FEATURES[i];
        if (strlen(f->name) != len || memcmp(f->name, name, len) != 0) continue;
        unsigned regs[4] = {0, 0, 0, 0};
        if (!__get_cpuid_count(f->leaf, f->subleaf, &regs[0], &regs[1], &regs[2], &regs[3]))
            return ABSENT;
        if (!((regs[f->reg] >> f->bit) & 1)) return ABSENT;
        if (f->state && (os_state() & f->state) != f->state) return DISABLED_BY_OS;
        return PRESENT;
    }
    return UNKNOWN;
}

static void put(const char *text) {
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, text, len);
        if (n <= 0) return;
        text += n;
        len -= (size_t)n;
    }
}

__attribute__((constructor)) static void mps_cpu_check(void) {
    static const char required[] = MPS_REQUIRED;
    static const char disabled[] = " (disabled by the OS)";
    char missing[1024] = "";
    size_t used = 0;
    const char *start = required;
    while (*start) {
        const char *end = strchr(start, ',');
        size_t len = end ? (size_t)(end - start) : strlen(start);
        int found = len > 0 ? present(start, len) : UNKNOWN;
        if ((found == ABSENT || found == DISABLED_BY_OS) &&
            used + len + sizeof disabled + 2 < sizeof missing) {
            if (used > 0) {
                memcpy(missing + used, ", ", 2);
                used += 2;
            }
            memcpy(missing + used, start, len);
            used += len;
            if (found == DISABLED_BY_OS) {
                memcpy(missing + used, disabled, sizeof disabled - 1);
                used += sizeof disabled - 1;
            }
            missing[used] = '\0';
        }
        start += len + (end ? 1 : 0);
    }
    if (used == 0) return;
    put(program_invocation_short_name);
    put(": this is the " MPS_BUILD " build, and this CPU lacks ");
    put(missing);
    put(", which it was compiled to use; run the generic build on this machine instead "
        "(`cargo build --locked --release`; see the README's performance section)\n");
    _exit(78);
}
