// cuda_runtime.h of the CUDA-execution emulator (csrc/emu/idid_emu.h): on the include path only
// when csrc/cuda/*.cu are compiled as host C++ for IDID_KERNELS_CUDA_EMULATE.
#pragma once
#include "../idid_emu.h"
