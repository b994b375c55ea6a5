/* The CPU attention task built for the compiler's baseline target
 * (native/cpu_attention_task.h): what runs where neither wider build can. */
#define TASK kvpager_task_base
#define VW 4  /* one SSE2 or NEON register */
#define VXB 2
#include "cpu_attention_task.h"
