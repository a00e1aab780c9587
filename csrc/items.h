// Work items: every batched kernel splits each job into chunks and runs all (job, chunk)
// pairs of all jobs in one parallel_for.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.h"

namespace mc {

struct Item {
  uint32_t job;
  uint64_t start, end;  // element range [start, end) of the job
};

// Chunks of each job of sizes[j] elements; chunk boundaries are multiples of `align`.
// Empty jobs get no item.
inline std::vector<Item> make_items(const std::vector<uint64_t>& sizes, uint64_t align,
                                    uint64_t lo, uint64_t hi) {
  std::vector<Item> items;
  for (size_t j = 0; j < sizes.size(); ++j) {
    uint64_t n = sizes[j];
    if (n == 0) continue;
    uint64_t grain = pick_grain(n, align, lo, hi);
    for (uint64_t s = 0; s < n; s += grain) {
      items.push_back(Item{static_cast<uint32_t>(j), s, s + grain < n ? s + grain : n});
    }
  }
  return items;
}

}  // namespace mc
