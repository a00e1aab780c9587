// Exact top-k selection by the 32-bit key of spec.py, without sorting:
//   key(j) = bits(|fl32(x[j]) - fl32(base[j])|)  (sign bit cleared; integer order = float order)
//   TopSet(T, J) = {j : key(j) > T or (key(j) == T and j < J)}
// For 0 < k < n the result is T = the k-th largest key and J = 1 + the flat index of the last
// kept entry whose key is T, or J = n when every entry with key T is kept. k == 0 gives
// EMPTY_TOP = (0xFFFFFFFF, 0) and k == n gives (0, n).
//
// Small jobs (n <= small_n) run entirely in one work item: keys into a buffer, then a radix
// select over 8-bit digits with stable compaction. Large jobs are split into chunks and:
//   pass 1  histogram of key >> 16 (32768 bins; per-thread tables merged per chunk) -> the bin
//           holding the k-th largest key, and how many entries `need` it must supply;
//   pass 2  histogram of the low 16 bits of the keys in that bin, with a sparse copy of each
//           chunk's counts -> the threshold T. Entries equal to a guessed frequent key of the
//           bin are counted with vector compares; only the others take the scalar histogram
//           (bf16 deltas have few significant bits, so one key often fills much of the bin);
//   cutoff  when more entries equal T than are needed, the per-chunk counts locate the chunk
//           holding the need-th entry equal to T, and only that chunk is scanned.
// All ks of a job share the passes. Every step is exact integer work, so the result does not
// depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "items.h"
#include "kernels.h"
#include "select_common.h"

namespace mc {

namespace {

constexpr size_t HI_BINS = 1u << 15;   // key >> 16 (the key's top bit is always clear)
constexpr size_t LO_BINS = 1u << 16;   // key & 0xFFFF
constexpr size_t LARGE_JOBS_PER_GROUP = 32;  // bounds the shared histograms' memory

std::atomic<uint64_t> g_small_n{1u << 16};
std::atomic<uint64_t> g_grain{0};  // 0: automatic
std::atomic<uint64_t> g_bracket_min_n{0};  // jobs at least this large may take the bracket

const TopSet EMPTY_SET{0xFFFFFFFFu, 0};

inline void atomic_add(uint64_t* p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline void atomic_or(uint32_t* p, uint32_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

// ---- small jobs -------------------------------------------------------------------------------

thread_local std::vector<uint32_t> tl_keys, tl_kbuf, tl_ibuf;

void select_small(const SelectJob& job, const std::vector<uint32_t>& qs, std::vector<TopSet>& out) {
  tl_keys.resize(job.n);
  for (uint64_t s = 0; s < job.n; s += TILE) {
    keys_tile(job, s, static_cast<size_t>(std::min<uint64_t>(TILE, job.n - s)), tl_keys.data() + s);
  }
  for (uint32_t q : qs) {
    out[q] = select_in_keys(tl_keys.data(), job.n, job.ks[q], tl_kbuf, tl_ibuf);
  }
}

// ---- large jobs -------------------------------------------------------------------------------

// Sparse per-chunk counts: sorted (bin << 32 | count) entries.
using Sparse = std::vector<uint64_t>;

uint64_t sparse_count(const Sparse& sp, uint32_t bin) {
  auto it = std::lower_bound(sp.begin(), sp.end(), static_cast<uint64_t>(bin) << 32);
  if (it == sp.end() || (*it >> 32) != bin) return 0;
  return *it & 0xFFFFFFFFu;
}

// Per thread, four interleaved count tables (elements t % 4), so that runs of equal bins do not
// form one long read-modify-write dependency chain. All zero between calls.
constexpr size_t HI_TABLES = 4;
thread_local std::vector<uint32_t> tl_hi;

MC_HOT void pass1(const SelectJob& job, uint64_t start, uint64_t end, uint64_t* counts) {
  if (tl_hi.size() != HI_TABLES * HI_BINS) tl_hi.assign(HI_TABLES * HI_BINS, 0);
  uint32_t* h0 = tl_hi.data();
  uint32_t* h1 = h0 + HI_BINS;
  uint32_t* h2 = h1 + HI_BINS;
  uint32_t* h3 = h2 + HI_BINS;
  alignas(64) uint32_t key[TILE];
  for (uint64_t s = start; s < end; s += TILE) {
    const size_t cnt = static_cast<size_t>(std::min<uint64_t>(TILE, end - s));
    keys_tile(job, s, cnt, key);
    for (size_t t = 0; t < cnt; ++t) key[t] >>= 16;
    size_t t = 0;
    for (; t + 4 <= cnt; t += 4) {
      h0[key[t]]++;
      h1[key[t + 1]]++;
      h2[key[t + 2]]++;
      h3[key[t + 3]]++;
    }
    for (; t < cnt; ++t) h0[key[t]]++;
  }
  for (size_t b = 0; b < HI_BINS; ++b) {
    const uint64_t c = static_cast<uint64_t>(h0[b]) + h1[b] + h2[b] + h3[b];
    if (c == 0) continue;
    atomic_add(counts + b, c);
    h0[b] = h1[b] = h2[b] = h3[b] = 0;
  }
}

thread_local std::vector<uint32_t> tl_lo;

// Histograms of the low 16 key bits of the entries in each of `bins` (shared: LO_BINS per bin).
// refs[q] is a guess of the most frequent key of bin q: entries equal to it are counted with a
// vector compare, and only the others go through the scalar histogram.
MC_HOT void pass2(const SelectJob& job, uint64_t start, uint64_t end,
                  const std::vector<uint32_t>& bins, const std::vector<uint32_t>& refs,
                  uint64_t* shared, std::vector<Sparse>& sparse) {
  const size_t nb = bins.size();
  if (tl_lo.size() < nb * LO_BINS) tl_lo.assign(nb * LO_BINS, 0);
  uint32_t* h = tl_lo.data();
  alignas(64) uint32_t key[TILE];
  alignas(64) uint8_t flag[TILE + 8];
  std::vector<uint64_t> ref_count(nb, 0);
  for (uint64_t s = start; s < end; s += TILE) {
    const size_t cnt = static_cast<size_t>(std::min<uint64_t>(TILE, end - s));
    keys_tile(job, s, cnt, key);
    for (size_t q = 0; q < nb; ++q) {
      const uint32_t want = bins[q], ref = refs[q];
      uint32_t* hq = h + q * LO_BINS;
      uint32_t c = 0;
      for (size_t t = 0; t < cnt; ++t) {
        c += key[t] == ref;
        flag[t] = ((key[t] >> 16) == want) & (key[t] != ref);
      }
      ref_count[q] += c;
      for (size_t t = cnt; t < ((cnt + 7) & ~size_t{7}); ++t) flag[t] = 0;
      for (size_t t = 0; t < cnt; t += 8) {
        uint64_t w;
        std::memcpy(&w, flag + t, 8);
        if (w == 0) continue;
        for (size_t u = t; u < t + 8; ++u) {
          if (flag[u]) hq[key[u] & 0xFFFFu]++;
        }
      }
    }
  }
  sparse.assign(nb, Sparse());
  for (size_t q = 0; q < nb; ++q) {
    uint32_t* hq = h + q * LO_BINS;
    uint64_t* sq = shared + q * LO_BINS;
    // the reference value is in bin q by construction (refs come from keys of the bin)
    hq[refs[q] & 0xFFFFu] += static_cast<uint32_t>(ref_count[q]);
    for (size_t lo = 0; lo < LO_BINS; ++lo) {
      if (hq[lo] == 0) continue;
      atomic_add(sq + lo, hq[lo]);
      sparse[q].push_back(static_cast<uint64_t>(lo) << 32 | hq[lo]);
      hq[lo] = 0;
    }
  }
}

// The most frequent key of `bin` among the first entries of the job (a guess for pass 2; any
// key of the bin is correct, a frequent one is faster). Falls back to bin << 16.
uint32_t guess_mode(const SelectJob& job, uint32_t bin) {
  constexpr uint64_t SAMPLE = 1u << 15;
  const uint64_t m = std::min<uint64_t>(SAMPLE, job.n);
  std::vector<uint32_t> keys(m), in_bin;
  for (uint64_t s = 0; s < m; s += TILE) {
    keys_tile(job, s, static_cast<size_t>(std::min<uint64_t>(TILE, m - s)), keys.data() + s);
  }
  for (uint32_t k : keys) {
    if ((k >> 16) == bin) in_bin.push_back(k);
  }
  if (in_bin.empty()) return bin << 16;
  std::vector<uint32_t> counts(LO_BINS, 0);
  uint32_t best = in_bin[0];
  for (uint32_t k : in_bin) {
    if (++counts[k & 0xFFFFu] > counts[best & 0xFFFFu]) best = k;
  }
  return best;
}

// One pending k of a large job.
struct KSel {
  uint32_t job;   // index into the group's large jobs
  uint32_t q;     // position of k in the job's ks
  uint32_t bin;   // key >> 16 of the threshold
  uint32_t slot;  // index of bin in the job's target bins
  uint64_t need;  // entries still to take among those equal to the threshold
  uint64_t eq;    // entries equal to the threshold
  uint32_t threshold;
};

struct LargeJob {
  const SelectJob* job;
  uint32_t out_index;             // index in the caller's job list
  std::vector<uint32_t> qs;       // pending ks
  std::vector<uint64_t> counts;   // pass 1: HI_BINS counts
  std::vector<uint32_t> bins;     // distinct bins holding a threshold
  std::vector<uint32_t> refs;     // a frequent key of each bin
  std::vector<uint64_t> low;      // pass 2: LO_BINS counts per bin
  size_t first_item = 0, last_item = 0;
};

void select_group(const std::vector<SelectJob>& jobs, const std::vector<uint32_t>& group,
                  std::vector<std::vector<TopSet>>& out) {
  const uint64_t small_n = g_small_n.load();
  // ---- classify -------------------------------------------------------------------------
  std::vector<std::pair<uint32_t, std::vector<uint32_t>>> small;
  std::vector<LargeJob> large;
  for (uint32_t j : group) {
    const SelectJob& job = jobs[j];
    std::vector<uint32_t> pending;
    for (uint32_t q = 0; q < job.ks.size(); ++q) {
      uint64_t k = job.ks[q];
      if (k == 0) {
        out[j][q] = EMPTY_SET;
      } else if (k >= job.n) {
        out[j][q] = TopSet{0, job.n};
      } else {
        pending.push_back(q);
      }
    }
    if (pending.empty()) continue;
    if (job.n <= small_n) {
      small.emplace_back(j, std::move(pending));
    } else {
      LargeJob lj;
      lj.job = &job;
      lj.out_index = j;
      lj.qs = std::move(pending);
      lj.counts.assign(HI_BINS, 0);
      large.push_back(std::move(lj));
    }
  }

  // ---- pass 1: small jobs whole, large jobs' high-bits histograms -------------------------
  std::vector<Item> items;  // chunks of large jobs, in job then index order
  for (uint32_t l = 0; l < large.size(); ++l) {
    const uint64_t n = large[l].job->n;
    const uint64_t grain = select_grain(n);
    large[l].first_item = items.size();
    for (uint64_t s = 0; s < n; s += grain) items.push_back(Item{l, s, std::min(s + grain, n)});
    large[l].last_item = items.size();
  }
  parallel_for(small.size() + items.size(), [&](size_t i) {
    if (i < small.size()) {
      select_small(jobs[small[i].first], small[i].second, out[small[i].first]);
    } else {
      const size_t it = i - small.size();
      LargeJob& lj = large[items[it].job];
      pass1(*lj.job, items[it].start, items[it].end, lj.counts.data());
    }
  });
  if (large.empty()) return;

  // ---- the bin of each k ---------------------------------------------------------------------
  std::vector<KSel> sels;
  for (uint32_t l = 0; l < large.size(); ++l) {
    LargeJob& lj = large[l];
    for (uint32_t q : lj.qs) {
      uint64_t need = lj.job->ks[q];
      uint32_t b = HI_BINS - 1;
      for (; b > 0; --b) {
        if (lj.counts[b] >= need) break;
        need -= lj.counts[b];
      }
      auto it = std::find(lj.bins.begin(), lj.bins.end(), b);
      KSel sel{l, q, b, static_cast<uint32_t>(it - lj.bins.begin()), need, 0, 0};
      if (it == lj.bins.end()) lj.bins.push_back(b);
      sels.push_back(sel);
    }
  }

  // ---- pass 2: low 16 bits of the target bins ----------------------------------------------
  std::vector<std::vector<Sparse>> sparse2(items.size());
  std::vector<size_t> work;
  for (size_t i = 0; i < items.size(); ++i) {
    LargeJob& lj = large[items[i].job];
    if (lj.bins.empty()) continue;
    if (lj.low.empty()) lj.low.assign(lj.bins.size() * LO_BINS, 0);
    work.push_back(i);
  }
  {
    std::vector<std::pair<size_t, size_t>> guesses;  // (large job, bin slot)
    for (size_t l = 0; l < large.size(); ++l) {
      large[l].refs.assign(large[l].bins.size(), 0);
      for (size_t q = 0; q < large[l].bins.size(); ++q) guesses.emplace_back(l, q);
    }
    parallel_for(guesses.size(), [&](size_t g) {
      LargeJob& lj = large[guesses[g].first];
      lj.refs[guesses[g].second] = guess_mode(*lj.job, lj.bins[guesses[g].second]);
    });
  }
  parallel_for(work.size(), [&](size_t w) {
    const size_t i = work[w];
    LargeJob& lj = large[items[i].job];
    pass2(*lj.job, items[i].start, items[i].end, lj.bins, lj.refs, lj.low.data(), sparse2[i]);
  });
  for (KSel& sel : sels) {
    const uint64_t* h = large[sel.job].low.data() + static_cast<size_t>(sel.slot) * LO_BINS;
    uint32_t lo = LO_BINS - 1;
    for (; lo > 0; --lo) {
      if (h[lo] >= sel.need) break;
      sel.need -= h[lo];
    }
    sel.threshold = (sel.bin << 16) | lo;
    sel.eq = h[lo];
  }
  for (auto& lj : large) std::vector<uint64_t>().swap(lj.low);

  // ---- the cutoff: the chunk holding the need-th entry equal to T, then scan it ----------
  struct Scan {
    size_t sel, item;
    uint64_t need;
  };
  std::vector<Scan> scans;
  std::vector<TopSet> result(sels.size());
  for (size_t s = 0; s < sels.size(); ++s) {
    const KSel& sel = sels[s];
    const LargeJob& lj = large[sel.job];
    if (sel.need >= sel.eq) {
      result[s] = TopSet{sel.threshold, lj.job->n};
      continue;
    }
    uint64_t need = sel.need;
    for (size_t i = lj.first_item; i < lj.last_item; ++i) {
      const uint64_t c = sparse_count(sparse2[i][sel.slot], sel.threshold & 0xFFFFu);
      if (c >= need) {
        scans.push_back(Scan{s, i, need});
        break;
      }
      need -= c;
    }
  }
  parallel_for(scans.size(), [&](size_t c) {
    const KSel& sel = sels[scans[c].sel];
    const Item& it = items[scans[c].item];
    const uint64_t j =
        find_nth_equal(*large[sel.job].job, it.start, it.end, sel.threshold, scans[c].need);
    result[scans[c].sel] = TopSet{sel.threshold, j + 1};
  });
  for (size_t s = 0; s < sels.size(); ++s) {
    out[large[sels[s].job].out_index][sels[s].q] = result[s];
  }
}

}  // namespace

std::vector<std::vector<TopSet>> select_top_many(const std::vector<SelectJob>& jobs) {
  std::vector<std::vector<TopSet>> out(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) out[j].assign(jobs[j].ks.size(), EMPTY_SET);
  const uint64_t small_n = g_small_n.load();
  // large single-k jobs first try the one-pass sampled bracket (select_bracket.cpp)
  std::vector<uint32_t> bracketable;
  for (uint32_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].n > small_n && jobs[j].n >= g_bracket_min_n.load()) bracketable.push_back(j);
  }
  std::vector<char> done(jobs.size(), 0);
  if (!bracketable.empty()) {
    std::vector<char> settled = select_bracketed(jobs, bracketable, out);
    for (size_t w = 0; w < bracketable.size(); ++w) done[bracketable[w]] = settled[w];
  }
  std::vector<uint32_t> group;
  size_t large_in_group = 0;
  for (uint32_t j = 0; j < jobs.size(); ++j) {
    if (done[j]) continue;
    group.push_back(j);
    if (jobs[j].n > small_n) ++large_in_group;
    if (large_in_group >= LARGE_JOBS_PER_GROUP) {
      select_group(jobs, group, out);
      group.clear();
      large_in_group = 0;
    }
  }
  if (!group.empty()) select_group(jobs, group, out);
  return out;
}

uint64_t select_grain(uint64_t n) {
  const uint64_t fixed = g_grain.load();
  return fixed ? fixed : pick_grain(n, TILE, 256 * TILE, 2048 * TILE);
}

uint64_t select_bracket_min_n(uint64_t min_n) { return g_bracket_min_n.exchange(min_n); }

std::pair<uint64_t, uint64_t> select_tuning(uint64_t small_n, uint64_t grain) {
  std::pair<uint64_t, uint64_t> old{g_small_n.load(), g_grain.load()};
  g_small_n.store(small_n);
  g_grain.store(grain == 0 ? 0 : (grain + TILE - 1) / TILE * TILE);
  return old;
}

}  // namespace mc
