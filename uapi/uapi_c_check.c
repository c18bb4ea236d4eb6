/* Compile check: the uapi headers are C (built as C in every configuration). */
#include "uapi/dmirror.h"

_Static_assert(sizeof(struct hmm_dmirror_cmd) == 40, "hmm_dmirror_cmd is five __u64");
_Static_assert(HMM_DMIRROR_READ != HMM_DMIRROR_WRITE, "distinct requests");

int gpusvm_uapi_c_check(void);
int gpusvm_uapi_c_check(void)
{
	struct hmm_dmirror_cmd cmd = { 0 };
	return (int)cmd.npages;
}
