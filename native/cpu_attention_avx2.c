/* The CPU attention task built for AVX2 with FMA (native/cpu_attention_task.h);
 * native/cpu_attention.c runs it where the CPU has it. Off x86-64, or with a
 * compiler that takes neither pragma, this is one more baseline build. */
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define TASK kvpager_task_avx2
#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define VW 8  /* one ymm register */
#define VXB 2 /* 4 x 2 accumulators, 4 broadcasts and V: 13 of the 16 registers */
#else
#define VW 4
#define VXB 2
#endif
#include "cpu_attention_task.h"
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
