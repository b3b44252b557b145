// Compiled by nvcc only: proves the CUDA sources were built and says how.
#include <string>

#include "pw_cutlass.cuh"

namespace convmixer_kernels {
std::string cuda_build_info() {
  std::string s = "nvcc=" + std::to_string(__CUDACC_VER_MAJOR__) + "." +
                  std::to_string(__CUDACC_VER_MINOR__) + ";";
#ifdef __CUDA_ARCH_LIST__
#define CMK_STR2(...) #__VA_ARGS__
#define CMK_STR(...) CMK_STR2(__VA_ARGS__)
  s += "archs=" CMK_STR(__CUDA_ARCH_LIST__) ";";
#endif
  s += std::string("cutlass=") + (pwcutlass::built() ? "1" : "0") + ";";
  return s;
}
}  // namespace convmixer_kernels
