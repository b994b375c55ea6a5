/* The CPU attention task built for the compiler's baseline target
 * (native/cpu_attention_task.h): what runs where neither wider build can. */
#define TASK kvpager_task_base
#include "cpu_attention_task.h"
