// Headers an instruction-set build of the passes includes before its target pragma, so that the
// standard library and the shared types stay compiled for the baseline instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef FK_HAS_OPENMP
#include <omp.h>
#endif

#include "multi.h"
#include "passes.h"
#include "types.h"
