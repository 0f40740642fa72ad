// The CUDA kernel sources compiled as host C++ under the SIMT emulator (csrc/emu/simt_emu.h).
#define SLVIT_EMULATE 1
#include "slvit_kernels.cu"
#include "slvit_backward.cu"
