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

// Write src[0, nbytes) to fd at file_offset with pwrite (EINTR and short writes retried).
IoOutcome pwrite_from(int fd, uint64_t file_offset, uint64_t nbytes, const void* src);

}  // namespace mc
