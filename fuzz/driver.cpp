// A bounded stand-in for libFuzzer's main, for compilers without -fsanitize=fuzzer (GCC):
//
//   fuzz_x SEED_FILE... [-max_total_time=SECONDS] [-runs=N] [-seed=S]
//
// Runs every seed, then mutations of them (bit flips, interesting bytes and integers, inserted,
// deleted, duplicated and truncated ranges, splices of two seeds) until the time or run budget
// is spent. Deterministic for a given -seed. A finding crashes the process (sanitizers abort).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using Bytes = std::vector<uint8_t>;

void mutate(Bytes& b, const std::vector<Bytes>& seeds, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n ? static_cast<size_t>(rng() % n) : 0; };
  static const uint8_t interesting8[] = {0, 1, 0x7f, 0x80, 0xff, '{', '}', '"', '[', ']', ',', ':', '0', '9', '-'};
  static const uint64_t interesting64[] = {0, 1, 0xff, 0x7fffffff, 0xffffffffull, 0x7fffffffffffffffull,
                                           0xffffffffffffffffull, 1ull << 32, 1ull << 40};
  switch (rng() % 9) {
    case 0:  // bit flip
      if (!b.empty()) b[pick(b.size())] ^= static_cast<uint8_t>(1u << (rng() % 8));
      break;
    case 1:  // interesting byte
      if (!b.empty()) b[pick(b.size())] = interesting8[pick(std::size(interesting8))];
      break;
    case 2: {  // interesting little-endian integer
      if (b.size() < 8) break;
      uint64_t v = interesting64[pick(std::size(interesting64))];
      std::memcpy(&b[pick(b.size() - 7)], &v, 8);
      break;
    }
    case 3: {  // insert random bytes
      size_t at = pick(b.size() + 1), n = 1 + pick(16);
      Bytes r(n);
      for (auto& x : r) x = static_cast<uint8_t>(rng());
      b.insert(b.begin() + at, r.begin(), r.end());
      break;
    }
    case 4: {  // delete a range
      if (b.empty()) break;
      size_t at = pick(b.size()), n = 1 + pick(std::min<size_t>(64, b.size() - at));
      b.erase(b.begin() + at, b.begin() + at + n);
      break;
    }
    case 5: {  // duplicate a range
      if (b.empty()) break;
      size_t at = pick(b.size()), n = 1 + pick(std::min<size_t>(64, b.size() - at));
      Bytes r(b.begin() + at, b.begin() + at + n);
      b.insert(b.begin() + pick(b.size() + 1), r.begin(), r.end());
      break;
    }
    case 6:  // truncate
      b.resize(pick(b.size() + 1));
      break;
    case 7: {  // splice with another seed
      const Bytes& o = seeds[pick(seeds.size())];
      if (o.empty()) break;
      size_t cut = pick(b.size() + 1), from = pick(o.size());
      b.resize(cut);
      b.insert(b.end(), o.begin() + from, o.end());
      break;
    }
    default:  // overwrite a range with random bytes
      if (b.empty()) break;
      for (size_t at = pick(b.size()), n = 1 + pick(8); n-- && at < b.size(); ++at)
        b[at] = static_cast<uint8_t>(rng());
  }
}

}  // namespace

int main(int argc, char** argv) {
  double max_seconds = 10;
  long long max_runs = -1;
  uint64_t seed = 1;
  std::vector<Bytes> seeds;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("-max_total_time=", 0) == 0) max_seconds = std::stod(a.substr(16));
    else if (a.rfind("-runs=", 0) == 0) max_runs = std::stoll(a.substr(6));
    else if (a.rfind("-seed=", 0) == 0) seed = std::stoull(a.substr(6));
    else {
      std::ifstream in(a, std::ios::binary);
      if (!in) {
        std::cerr << a << ": cannot read seed file\n";
        return 2;
      }
      seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  }
  if (seeds.empty()) seeds.push_back({});
  std::mt19937_64 rng(seed);
  const auto t0 = std::chrono::steady_clock::now();
  long long runs = 0;
  for (const auto& s : seeds) LLVMFuzzerTestOneInput(s.data(), s.size()), ++runs;
  while ((max_runs < 0 || runs < max_runs) &&
         std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < max_seconds) {
    Bytes b = seeds[rng() % seeds.size()];
    for (int k = 1 + static_cast<int>(rng() % 4); k--;) mutate(b, seeds, rng);
    LLVMFuzzerTestOneInput(b.data(), b.size());
    ++runs;
  }
  std::cout << "fuzz: " << runs << " inputs in "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
            << " s, no finding\n";
  return 0;
}
