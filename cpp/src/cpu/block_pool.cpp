// The helper pool behind run_blocks (block_pool.hpp).
#include "block_pool.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

namespace rslora::detail {
namespace {

constexpr int kMaxHelpers = 63;

struct Job {
  const std::function<void(i64)>* block = nullptr;
  i64 count = 0;
  std::atomic<i64> next{0};
  int running = 0;  // helpers inside work(); guarded by Pool::mu
  std::condition_variable done;
  std::mutex error_mu;
  std::exception_ptr error;

  void work() {
    for (i64 i; (i = next.fetch_add(1)) < count;) {
      try {
        (*block)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
        next.store(count);  // start no more blocks
      }
    }
  }
};

struct Pool {
  std::mutex mu;
  std::condition_variable wake;
  std::deque<Job*> queue;  // one entry per helper a caller asked for
  int helpers = 0;
};

void helper_loop(Pool* p) {
  std::unique_lock<std::mutex> lock(p->mu);
  for (;;) {
    p->wake.wait(lock, [p] { return !p->queue.empty(); });
    Job* j = p->queue.front();
    p->queue.pop_front();
    ++j->running;
    lock.unlock();
    j->work();
    lock.lock();
    if (--j->running == 0) j->done.notify_all();
  }
}

// The pool is never destroyed (helpers may sit in wait() at exit). A forked child has none of
// the parent's threads: it drops (leaks) the parent's pool and starts its own on first use; the
// creation mutex is held across fork so that the child never inherits it locked.
std::mutex g_create_mu;
Pool* g_pool = nullptr;

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_create_mu);
  if (!g_pool) {
    static const bool registered = [] {
      pthread_atfork([] { g_create_mu.lock(); }, [] { g_create_mu.unlock(); },
                     [] {
                       g_pool = nullptr;
                       g_create_mu.unlock();
                     });
      return true;
    }();
    (void)registered;
    g_pool = new Pool;
  }
  return *g_pool;
}

}  // namespace

void run_blocks(i64 count, int threads, const std::function<void(i64)>& block) {
  const int want = static_cast<int>(std::min<i64>({count, threads, kMaxHelpers + 1})) - 1;
  if (want <= 0) {
    for (i64 i = 0; i < count; ++i) block(i);
    return;
  }
  Pool& p = pool();
  Job job;
  job.block = &block;
  job.count = count;
  int asked = 0;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    while (p.helpers < want) {
      try {
        std::thread(helper_loop, &p).detach();
      } catch (const std::system_error&) {
        break;  // no more threads: run with the helpers there are
      }
      ++p.helpers;
    }
    asked = std::min(want, p.helpers);
    for (int h = 0; h < asked; ++h) p.queue.push_back(&job);
  }
  for (int h = 0; h < asked; ++h) p.wake.notify_one();
  job.work();
  {
    std::unique_lock<std::mutex> lock(p.mu);
    p.queue.erase(std::remove(p.queue.begin(), p.queue.end(), &job), p.queue.end());
    job.done.wait(lock, [&job] { return job.running == 0; });
  }
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace rslora::detail
