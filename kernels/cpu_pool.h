// Sharing one kernel call's units of work over XLA's CPU thread pool (cpu_*.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace sgljax {

// Runs work(*job) on this thread and on one pool thread per other core, and returns
// when job->done reaches `units`: `work` takes units from job->next and counts each
// finished one in job->done (release order). Helpers hold the job by shared_ptr, as
// one may start after this call has returned, find nothing left, and end.
template <typename Job, typename Work>
void ShareWork(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t units,
               Work work) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, work] { work(*job); });
  work(*job);
  while (job->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace sgljax
