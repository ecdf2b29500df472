// Small helpers the benchmarks share: resident memory as the kernel counts it.
#pragma once

#include <fstream>
#include <string>

namespace blip2::bench {

// A "Vm...:" line of /proc/self/status in GiB: "VmHWM:" the peak resident set, "VmRSS:" the
// current one (file pages of a memory-mapped checkpoint count while they are resident).
inline double status_gib(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(field.size())) / (1024.0 * 1024.0);
  return 0;
}
inline double peak_rss_gib() { return status_gib("VmHWM:"); }
inline double current_rss_gib() { return status_gib("VmRSS:"); }

}  // namespace blip2::bench
