/* Checked allocation for every kernel (kernels.h), with failures on request for the callers' tests. */
#include <stdlib.h>

#include "kernels.h"

/* allocations left before the next one fails; negative: none fails */
static int64_t allocations_until_failure = -1;

/* The allocation `after` calls from now (0: the next one) returns NULL, once; a negative `after` cancels. */
void kernel_fail_allocation(int64_t after) { __atomic_store_n(&allocations_until_failure, after, __ATOMIC_SEQ_CST); }

static int allocation_fails(void) {
  if (__atomic_load_n(&allocations_until_failure, __ATOMIC_RELAXED) < 0) return 0;
  return __atomic_sub_fetch(&allocations_until_failure, 1, __ATOMIC_SEQ_CST) == -1;
}

void *kernel_malloc(size_t bytes) { return allocation_fails() ? NULL : malloc(bytes); }

void *kernel_calloc(size_t count, size_t size) { return allocation_fails() ? NULL : calloc(count, size); }
