#include "fileio.h"

#include <errno.h>
#include <sys/mman.h>
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

namespace {

// Run piece(start, len) over [0, nbytes) split into up to nthreads pieces of at least
// PREAD_SPLIT_MIN bytes (starts multiples of PIECE_ALIGN), the first on this thread; the
// outcome is the contiguous prefix read (a short piece ends it: end of file).
template <typename Piece>
IoOutcome split_read(uint64_t nbytes, int nthreads, Piece piece) {
  uint64_t pieces = std::max<uint64_t>(1, nbytes / PREAD_SPLIT_MIN);
  pieces = std::min<uint64_t>(pieces, static_cast<uint64_t>(std::max(1, nthreads)));
  if (pieces <= 1) return piece(0, nbytes);
  const uint64_t step = (nbytes / pieces + PIECE_ALIGN - 1) / PIECE_ALIGN * PIECE_ALIGN;
  std::vector<uint64_t> starts;
  for (uint64_t s = 0; s < nbytes; s += step) starts.push_back(s);
  std::vector<IoOutcome> results(starts.size());
  std::vector<std::thread> threads;
  for (size_t p = 1; p < starts.size(); ++p) {
    threads.emplace_back([&, p] { results[p] = piece(starts[p], std::min(step, nbytes - starts[p])); });
  }
  results[0] = piece(0, std::min(step, nbytes));
  for (auto& t : threads) t.join();
  IoOutcome total{0, 0};
  for (size_t p = 0; p < starts.size(); ++p) {
    if (results[p].error != 0) return IoOutcome{total.bytes + results[p].bytes, results[p].error};
    total.bytes += results[p].bytes;
    if (results[p].bytes < std::min(step, nbytes - starts[p])) break;  // end of file
  }
  return total;
}

}  // namespace

IoOutcome pread_into(int fd, uint64_t file_offset, uint64_t nbytes, void* dst, int nthreads) {
  char* out = static_cast<char*>(dst);
  return split_read(nbytes, nthreads, [&](uint64_t s, uint64_t len) {
    return read_piece(fd, file_offset + s, len, out + s);
  });
}

IoOutcome pread_direct_into(int direct_fd, int fd, uint64_t file_offset, uint64_t nbytes,
                            void* dst, int nthreads, uint64_t align) {
  char* out = static_cast<char*>(dst);
  const uint64_t begin = (file_offset + align - 1) / align * align;  // first aligned byte
  const uint64_t end = (file_offset + nbytes) / align * align;       // last aligned end
  const bool congruent = (reinterpret_cast<uintptr_t>(out) - file_offset) % align == 0;
  if (!congruent || direct_fd < 0 || end <= begin) return pread_into(fd, file_offset, nbytes, out, nthreads);
  // the partial pages at both ends through the page cache (a few KiB)
  IoOutcome head = read_piece(fd, file_offset, begin - file_offset, out);
  if (head.error != 0 || head.bytes < begin - file_offset) return head;
  const uint64_t inner = end - begin;
  char* inner_dst = out + (begin - file_offset);
  IoOutcome mid = split_read(inner, nthreads, [&](uint64_t s, uint64_t len) {
    IoOutcome r = read_piece(direct_fd, begin + s, len, inner_dst + s);
    if (r.error == EINVAL) {  // this file system refuses O_DIRECT here: the page cache then
      IoOutcome rest = read_piece(fd, begin + s + r.bytes, len - r.bytes, inner_dst + s + r.bytes);
      r = IoOutcome{r.bytes + rest.bytes, rest.error};
    }
    return r;
  });
  const IoOutcome so_far{head.bytes + mid.bytes, mid.error};
  if (mid.error != 0 || mid.bytes < inner) return so_far;  // error, or end of file
  IoOutcome tail = read_piece(fd, end, file_offset + nbytes - end, out + (end - file_offset));
  return IoOutcome{so_far.bytes + tail.bytes, tail.error};
}

CachedPages cached_pages(int fd, uint64_t file_offset, uint64_t nbytes) {
  const long sys_page = ::sysconf(_SC_PAGESIZE);
  const uint64_t page = sys_page > 0 ? static_cast<uint64_t>(sys_page) : 4096;
  const uint64_t first = file_offset / page * page;
  const uint64_t last = (file_offset + nbytes + page - 1) / page * page;
  constexpr uint64_t WINDOW = 256ull << 20;  // mapped at a time (bounds the vector below)
  CachedPages pages{0, 0};
  std::vector<unsigned char> held;
  for (uint64_t at = first; at < last; at += WINDOW) {
    const uint64_t len = std::min(WINDOW, last - at);
    void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(at));
    if (map == MAP_FAILED) return CachedPages{0, 0};
    held.resize(len / page);
    const int rc = ::mincore(map, len, held.data());
    ::munmap(map, len);
    if (rc != 0) return CachedPages{0, 0};
    for (unsigned char h : held) pages.cached += h & 1u;
    pages.total += len / page;
  }
  return pages;
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
