#include "fileio.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <vector>

namespace mc {

namespace {

constexpr uint64_t MAX_CALL = 1ull << 30;          // bytes per pread/pwrite call
constexpr uint64_t PREAD_SPLIT_MIN = 8ull << 20;   // smallest piece worth a thread
constexpr uint64_t PIECE_ALIGN = 1ull << 20;

IoOutcome read_piece(int fd, uint64_t off, uint64_t n, char* dst) {
  uint64_t got = 0;
  while (got < n) {
    size_t want = static_cast<size_t>(std::min(n - got, MAX_CALL));
    ssize_t r = ::pread(fd, dst + got, want, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return IoOutcome{got, errno};
    }
    if (r == 0) break;  // end of file
    got += static_cast<uint64_t>(r);
  }
  return IoOutcome{got, 0};
}

}  // namespace

IoOutcome pread_into(int fd, uint64_t file_offset, uint64_t nbytes, void* dst, int nthreads) {
  char* out = static_cast<char*>(dst);
  uint64_t pieces = std::max<uint64_t>(1, nbytes / PREAD_SPLIT_MIN);
  pieces = std::min<uint64_t>(pieces, static_cast<uint64_t>(std::max(1, nthreads)));
  if (pieces <= 1) return read_piece(fd, file_offset, nbytes, out);
  uint64_t step = (nbytes / pieces + PIECE_ALIGN - 1) / PIECE_ALIGN * PIECE_ALIGN;
  std::vector<uint64_t> starts;
  for (uint64_t s = 0; s < nbytes; s += step) starts.push_back(s);
  std::vector<IoOutcome> results(starts.size());
  std::vector<std::thread> threads;
  for (size_t p = 1; p < starts.size(); ++p) {
    threads.emplace_back([&, p] {
      uint64_t len = std::min(step, nbytes - starts[p]);
      results[p] = read_piece(fd, file_offset + starts[p], len, out + starts[p]);
    });
  }
  results[0] = read_piece(fd, file_offset, std::min(step, nbytes), out);
  for (auto& t : threads) t.join();
  IoOutcome total{0, 0};
  for (size_t p = 0; p < starts.size(); ++p) {
    if (results[p].error != 0) return IoOutcome{total.bytes + results[p].bytes, results[p].error};
    total.bytes += results[p].bytes;
    if (results[p].bytes < std::min(step, nbytes - starts[p])) break;  // end of file
  }
  return total;
}

IoOutcome pwrite_from(int fd, uint64_t file_offset, uint64_t nbytes, const void* src) {
  const char* in = static_cast<const char*>(src);
  uint64_t done = 0;
  while (done < nbytes) {
    size_t want = static_cast<size_t>(std::min(nbytes - done, MAX_CALL));
    ssize_t r = ::pwrite(fd, in + done, want, static_cast<off_t>(file_offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return IoOutcome{done, errno};
    }
    if (r == 0) return IoOutcome{done, EIO};
    done += static_cast<uint64_t>(r);
  }
  return IoOutcome{done, 0};
}

}  // namespace mc
