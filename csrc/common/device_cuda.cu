#include <cuda_runtime.h>

#include "common/device.h"

namespace pyfast {

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace pyfast
