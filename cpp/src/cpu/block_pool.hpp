// Independent blocks of work on the calling thread plus helper threads that sleep when idle.
//
// Why not OpenBLAS's own pool: its workers spin (sched_yield) for ~2^28 cycles after every job and
// its threaded GEMM gives each thread a fixed half and synchronises them with spin loops, so a
// core that something else holds slows every pass to the pace of the thread on it and the
// spinning takes CPU from the thread doing the work (bench/RESULTS.md "Busy core, the cause").
// Here blocks are taken in order from a shared counter (a slowed thread takes fewer), helpers
// wait on a condition variable, and the caller, out of blocks, takes back the helper requests no
// helper has picked up yet and blocks (never spins) until the running ones finish.
#pragma once
#include <functional>

#include "rslora/view.hpp"

namespace rslora::detail {

// Runs block(0) ... block(count - 1), each exactly once, on the calling thread and up to
// threads - 1 helpers of a process-wide pool (created on first use, up to 63 threads, reset in a
// forked child). Which thread runs a block depends on timing; what a block computes must not.
// The first exception thrown by a block stops the blocks not yet started and is rethrown here,
// after every running block has finished.
void run_blocks(i64 count, int threads, const std::function<void(i64)>& block);

}  // namespace rslora::detail
