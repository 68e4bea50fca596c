// The cuSOLVER routines rsvd uses, resolved at run time (see solver.cu).
#pragma once
#include <cusolverDn.h>

#include "context.cuh"

namespace rslora::cuda {

struct Solver {
  decltype(&cusolverDnCreate) create;
  decltype(&cusolverDnSetStream) set_stream;
  decltype(&cusolverDnSgeqrf_bufferSize) geqrf_size;
  decltype(&cusolverDnSgeqrf) geqrf;
  decltype(&cusolverDnSorgqr_bufferSize) orgqr_size;
  decltype(&cusolverDnSorgqr) orgqr;
  decltype(&cusolverDnCreateGesvdjInfo) create_gesvdj_info;
  decltype(&cusolverDnDestroyGesvdjInfo) destroy_gesvdj_info;
  decltype(&cusolverDnSgesvdj_bufferSize) gesvdj_size;
  decltype(&cusolverDnSgesvdj) gesvdj;
};

// Throws cuda_error saying how to install cuSOLVER when it cannot be opened.
const Solver& solver();
// The calling thread's cuSOLVER handle for ctx.device, set to ctx.stream.
cusolverDnHandle_t solver_handle(const Ctx& ctx);

}  // namespace rslora::cuda
