// Positional file IO for the reader/writer of mergecore.io (no GIL, no intermediate copies).
#pragma once

#include <cstdint>

namespace mc {

struct IoOutcome {
  uint64_t bytes;  // bytes transferred (the contiguous prefix from file_offset)
  int error;       // errno of the first failure, 0 if none
};

// Fill dst[0, nbytes) from fd at file_offset with pread, split across up to nthreads threads
// (pieces of at least PREAD_SPLIT_MIN bytes). EINTR and short reads are retried; end of file
// stops early (bytes < nbytes, error 0).
IoOutcome pread_into(int fd, uint64_t file_offset, uint64_t nbytes, void* dst, int nthreads);

// pread_into through an O_DIRECT descriptor (direct_fd) of the same file as fd: the
// align-aligned interior of the range goes from the device straight into dst (no page cache:
// no kernel copy, no cached pages to drop) and the partial pages at both ends through fd.
// Only when dst and file_offset are congruent modulo align (the caller places its buffer so);
// otherwise, or for a range within one page, or with direct_fd < 0, it is pread_into(fd).
// A piece the file system refuses (EINVAL) is read through fd instead.
IoOutcome pread_direct_into(int direct_fd, int fd, uint64_t file_offset, uint64_t nbytes,
                            void* dst, int nthreads, uint64_t align);

// Pages of [file_offset, file_offset + nbytes) of fd (whole pages of the system page size):
// {held by the page cache, in all}, from mmap + mincore (nothing is read or faulted in);
// {0, 0} when the file cannot be mapped or the kernel will not tell.
struct CachedPages {
  uint64_t cached;
  uint64_t total;
};
CachedPages cached_pages(int fd, uint64_t file_offset, uint64_t nbytes);

// Write src[0, nbytes) to fd at file_offset with pwrite (EINTR and short writes retried).
IoOutcome pwrite_from(int fd, uint64_t file_offset, uint64_t nbytes, const void* src);

}  // namespace mc
