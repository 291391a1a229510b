// Stands in for the CUDA toolkit's cuda_runtime.h in emulation builds (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
