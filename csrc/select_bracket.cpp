// Exact top-k of large single-k jobs in one pass over the data, from a sampled bracket.
//
// The histogram path (select.cpp) reads every key twice and scatters each into a 32768-bin
// table. Here a small sample locates the threshold first:
//   sample   S keys, taken as runs of RUN consecutive entries, one at a pseudo-random offset
//            in each of S / RUN equal strides of the job;
//            with p = k / n, r = floor(p S) and d = SIGMAS sqrt(S p (1 - p)) + RUN, the
//            sample's (r - d)-th and (r + d)-th largest keys are the bracket [lo, hi];
//   pass     per chunk: how many keys are > hi, == hi and == lo, and the (key, index) of
//            every key strictly inside (lo, hi), in index order. Only compares and counts
//            run per element (they vectorize); the few entries inside are appended;
//   resolve  walking down from the top, the k-th largest key is in "== hi", "inside" or
//            "== lo" (the bracket held), or above hi / below lo (it missed: the job goes
//            back to the histogram path; the result is exact either way).
// A key equal to the threshold is never stored (a frequent key, e.g. a zero delta, costs a
// count, not memory): when T is hi or lo, the chunk counts locate the chunk holding the
// needed entry and only that chunk is scanned. The sample only decides the speed.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "items.h"
#include "select_common.h"

namespace mc {

namespace {

// Tuning of the bracket (one place): sample size, run length and width in deviations.
constexpr uint64_t SAMPLE_MIN = 8192;
constexpr uint64_t SAMPLE_MAX = 1u << 18;
constexpr uint64_t SAMPLE_DIVISOR = 256;  // S = n / SAMPLE_DIVISOR within [MIN, MAX]
constexpr uint64_t RUN = 8;               // consecutive entries per sample run
constexpr double SIGMAS = 4.0;
constexpr size_t MAX_TEAM = 8;            // jobs sharing a base read per pass

std::atomic<uint64_t> g_settled{0}, g_missed{0};

struct Bracket {
  uint32_t lo, hi;         // lo <= hi; hi == 0xFFFFFFFF: nothing above
  double inside_fraction;  // expected share of keys strictly inside (lo, hi)
};

// A growable array that leaves new elements uninitialized (no page is touched before use).
struct U32Buffer {
  std::unique_ptr<uint32_t[]> data;
  size_t capacity = 0;
  void grow_to(size_t cap, size_t keep) {
    if (cap <= capacity) return;
    std::unique_ptr<uint32_t[]> bigger(new uint32_t[cap]);
    if (keep) std::memcpy(bigger.get(), data.get(), keep * sizeof(uint32_t));
    data = std::move(bigger);
    capacity = cap;
  }
};

struct ChunkResult {
  uint64_t above = 0, at_hi = 0, at_lo = 0;
  size_t inside = 0;  // entries strictly inside (lo, hi):
  U32Buffer key;      // their keys in index order (the first `inside` entries)
  U32Buffer pos;      // their indices relative to the chunk start
};

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

Bracket sample_bracket(const SelectJob& job, uint64_t k) {
  const uint64_t n = job.n;
  uint64_t s = std::clamp<uint64_t>(n / SAMPLE_DIVISOR, SAMPLE_MIN, SAMPLE_MAX);
  const uint64_t runs = s / RUN;
  s = runs * RUN;
  std::vector<uint32_t> keys(s);
  // one run at a pseudo-random offset inside each stride: a fixed offset would sample the
  // same columns of every row of a weight matrix, and real weights have column structure
  const uint64_t stride = n / runs;  // >= 4 RUN: callers pass n >= 4 S
  for (uint64_t r = 0; r < runs; ++r) {
    const uint64_t offset = splitmix64(r) % (stride - RUN + 1);
    keys_tile(job, r * stride + offset, RUN, keys.data() + r * RUN);
  }
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double sd = std::sqrt(static_cast<double>(s) * p * (1.0 - p));
  const int64_t d = static_cast<int64_t>(SIGMAS * sd) + static_cast<int64_t>(RUN);
  const int64_t r = static_cast<int64_t>(p * static_cast<double>(s));
  const int64_t hi_rank = r - d, lo_rank = r + d;  // 0-based, descending
  Bracket br{0, 0xFFFFFFFFu, static_cast<double>(2 * d + 1) / static_cast<double>(s)};
  auto desc_nth = [&](int64_t rank) {  // the rank-th largest sample key
    auto it = keys.begin() + (static_cast<int64_t>(s) - 1 - rank);
    std::nth_element(keys.begin(), it, keys.end());
    return *it;
  };
  if (lo_rank < static_cast<int64_t>(s)) br.lo = desc_nth(lo_rank);
  if (hi_rank >= 0) br.hi = desc_nth(hi_rank);
  return br;
}

// One tile's counts and inside entries of one job.
MC_INLINE void tile_bracket(const uint32_t* key, size_t cnt, uint64_t offset, Bracket br,
                            uint8_t* inside, ChunkResult& res) {
  const uint32_t lo = br.lo, hi = br.hi;
  uint32_t above = 0, at_hi = 0, at_lo = 0;
  for (size_t t = 0; t < cnt; ++t) {
    above += key[t] > hi;
    at_hi += key[t] == hi;
    at_lo += key[t] == lo;
    inside[t] = (key[t] > lo) & (key[t] < hi);
  }
  res.above += above;
  res.at_hi += at_hi;
  res.at_lo += at_lo;
  for (size_t t = cnt; t < ((cnt + 7) & ~size_t{7}); ++t) inside[t] = 0;
  if (res.key.capacity < res.inside + cnt) {  // room for a whole tile: the copy below is blind
    const size_t cap = std::max(res.key.capacity * 2, res.inside + cnt);
    res.key.grow_to(cap, res.inside);
    res.pos.grow_to(cap, res.inside);
  }
  uint32_t* kout = res.key.data.get() + res.inside;
  uint32_t* pout = res.pos.data.get() + res.inside;
  size_t m = 0;
  for (size_t t = 0; t < cnt; t += 8) {
    uint64_t w;
    std::memcpy(&w, inside + t, 8);
    if (w == 0) continue;
    for (size_t u = t; u < t + 8; ++u) {  // branch-free compaction
      kout[m] = key[u];
      pout[m] = static_cast<uint32_t>(offset + u);
      m += inside[u];
    }
  }
  res.inside += m;
}

// The pass over [start, end) for a team of jobs sharing one base: tile by tile, every
// member's keys, so each base tile is read from memory once and from L1 for the others.
MC_HOT void bracket_pass(const SelectJob* const* team, const Bracket* brs, ChunkResult* const* res,
                         size_t members, uint64_t start, uint64_t end) {
  alignas(64) uint32_t key[TILE];
  alignas(64) uint8_t inside[TILE + 8];
  for (uint64_t s = start; s < end; s += TILE) {
    const size_t cnt = static_cast<size_t>(std::min<uint64_t>(TILE, end - s));
    for (size_t m = 0; m < members; ++m) {
      keys_tile(*team[m], s, cnt, key);
      tile_bracket(key, cnt, s - start, brs[m], inside, *res[m]);
    }
  }
}

// The TopSet with threshold `value` keeping the first `need` of its `total` equal entries,
// located through the chunks' counts of that value.
TopSet cutoff_at_equal(const SelectJob& job, const std::vector<Item>& items, size_t first,
                       size_t last, const std::vector<ChunkResult>& res, bool at_hi,
                       uint32_t value, uint64_t need, uint64_t total) {
  if (need >= total) return TopSet{value, job.n};
  for (size_t i = first; i < last; ++i) {
    const uint64_t c = at_hi ? res[i].at_hi : res[i].at_lo;
    if (c >= need) return TopSet{value, find_nth_equal(job, items[i].start, items[i].end, value, need) + 1};
    need -= c;
  }
  return TopSet{value, job.n};  // unreachable when the counts are right
}

// Settles one job from its chunks' results; false when the bracket missed the threshold.
bool resolve(const SelectJob& job, uint64_t k, Bracket br, const std::vector<Item>& items,
             size_t first, size_t last, const std::vector<ChunkResult>& res, TopSet& out) {
  uint64_t above = 0, at_hi = 0, at_lo = 0, inside = 0;
  for (size_t i = first; i < last; ++i) {
    above += res[i].above;
    at_hi += res[i].at_hi;
    at_lo += res[i].at_lo;
    inside += res[i].inside;
  }
  if (br.lo == br.hi) at_lo = 0;  // the same entries: count them once
  if (k <= above) return false;
  uint64_t need = k - above;
  if (need <= at_hi) {
    out = cutoff_at_equal(job, items, first, last, res, true, br.hi, need, at_hi);
    return true;
  }
  need -= at_hi;
  if (need <= inside) {
    std::vector<uint32_t> keys;
    keys.reserve(inside);
    for (size_t i = first; i < last; ++i) {
      keys.insert(keys.end(), res[i].key.data.get(), res[i].key.data.get() + res[i].inside);
    }
    // every key inside shares the bits above the highest bit in which lo and hi differ
    const int varying = 32 - __builtin_clz(br.lo ^ br.hi);
    std::vector<uint32_t> kbuf, ibuf;
    TopSet local = select_in_keys(keys.data(), keys.size(), need, kbuf, ibuf, (varying - 1) / 8 * 8);
    if (local.cutoff >= keys.size()) {
      out = TopSet{local.threshold, job.n};
      return true;
    }
    uint64_t p = local.cutoff - 1;  // position of the last kept entry equal to T
    for (size_t i = first; i < last; ++i) {
      if (p < res[i].inside) {
        out = TopSet{local.threshold, items[i].start + res[i].pos.data[p] + 1};
        return true;
      }
      p -= res[i].inside;
    }
    return false;  // unreachable
  }
  need -= inside;
  if (br.lo != br.hi && need <= at_lo) {
    out = cutoff_at_equal(job, items, first, last, res, false, br.lo, need, at_lo);
    return true;
  }
  return false;
}

}  // namespace

std::vector<char> select_bracketed(const std::vector<SelectJob>& jobs,
                                   const std::vector<uint32_t>& which,
                                   std::vector<std::vector<TopSet>>& out) {
  std::vector<char> settled(which.size(), 0);
  std::vector<uint32_t> todo;  // positions in `which` worth bracketing
  for (uint32_t w = 0; w < which.size(); ++w) {
    const SelectJob& job = jobs[which[w]];
    if (job.ks.size() == 1 && job.n >= 4 * SAMPLE_MIN && job.n < (1ull << 40) && job.ks[0] > 0 && job.ks[0] < job.n) {
      todo.push_back(w);
    }
  }
  if (todo.empty()) return settled;
  std::vector<Bracket> brackets(todo.size());
  parallel_for(todo.size(), [&](size_t t) {
    const SelectJob& job = jobs[which[todo[t]]];
    brackets[t] = sample_bracket(job, job.ks[0]);
  });
  std::vector<Item> items;  // chunks of each job, job by job
  std::vector<size_t> first(todo.size() + 1);
  for (uint32_t t = 0; t < todo.size(); ++t) {
    const uint64_t n = jobs[which[todo[t]]].n;
    const uint64_t grain = select_grain(n);
    first[t] = items.size();
    for (uint64_t s = 0; s < n; s += grain) items.push_back(Item{t, s, std::min(s + grain, n)});
  }
  first[todo.size()] = items.size();
  // teams: runs of consecutive jobs with one base (the models of one TIES merge), which then
  // have the same chunks
  std::vector<std::pair<size_t, size_t>> teams;  // [begin, end) in todo
  for (size_t t = 0; t < todo.size();) {
    const SelectJob& lead = jobs[which[todo[t]]];
    size_t e = t + 1;
    while (e < todo.size() && e - t < MAX_TEAM) {
      const SelectJob& job = jobs[which[todo[e]]];
      if (lead.base.ptr == nullptr || job.base.ptr != lead.base.ptr ||
          job.base.dtype != lead.base.dtype || job.n != lead.n) {
        break;
      }
      ++e;
    }
    teams.emplace_back(t, e);
    t = e;
  }
  std::vector<std::pair<size_t, size_t>> work;  // (team, chunk)
  for (size_t g = 0; g < teams.size(); ++g) {
    const size_t lead = teams[g].first;
    for (size_t c = 0; c < first[lead + 1] - first[lead]; ++c) work.emplace_back(g, c);
  }
  std::vector<ChunkResult> res(items.size());
  parallel_for(work.size(), [&](size_t w) {
    // sized for 1.5x the expected inside entries (grown if the chunk holds more)
    for (size_t t = teams[work[w].first].first; t < teams[work[w].first].second; ++t) {
      const Item& it = items[first[t] + work[w].second];
      const size_t want = static_cast<size_t>(1.5 * brackets[t].inside_fraction *
                                              static_cast<double>(it.end - it.start)) + TILE;
      res[first[t] + work[w].second].key.grow_to(want, 0);
      res[first[t] + work[w].second].pos.grow_to(want, 0);
    }
    const auto [begin, end] = teams[work[w].first];
    const size_t c = work[w].second;
    const SelectJob* team[MAX_TEAM];
    Bracket brs[MAX_TEAM];
    ChunkResult* outs[MAX_TEAM];
    for (size_t t = begin; t < end; ++t) {
      team[t - begin] = &jobs[which[todo[t]]];
      brs[t - begin] = brackets[t];
      outs[t - begin] = &res[first[t] + c];
    }
    const Item& it = items[first[begin] + c];
    bracket_pass(team, brs, outs, end - begin, it.start, it.end);
  });
  parallel_for(todo.size(), [&](size_t t) {
    const uint32_t j = which[todo[t]];
    const SelectJob& job = jobs[j];
    TopSet ts{};
    if (resolve(job, job.ks[0], brackets[t], items, first[t], first[t + 1], res, ts)) {
      out[j][0] = ts;
      settled[todo[t]] = 1;
      g_settled.fetch_add(1, std::memory_order_relaxed);
    } else {
      g_missed.fetch_add(1, std::memory_order_relaxed);
    }
  });
  return settled;
}

std::pair<uint64_t, uint64_t> select_bracket_stats() {
  return {g_settled.load(), g_missed.load()};
}

}  // namespace mc
