// What the native module can say about the CUDA side before any kernel runs.
#pragma once

namespace pyfast {

#if PYFAST_WITH_CUDA
// CUDART_VERSION of the toolkit the module was built with, e.g. 13000 for CUDA 13.0.
int cuda_runtime_version();
// cudaDriverGetVersion: the newest CUDA the installed driver supports (same encoding), 0 when
// there is no driver. Creates no context.
int cuda_driver_version();
#endif

}  // namespace pyfast
