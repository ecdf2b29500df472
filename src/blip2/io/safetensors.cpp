#include "blip2/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <nlohmann/json.hpp>

#include "blip2/util/common.h"

namespace blip2 {
namespace {

struct DType {
  const char* name;
  torch::ScalarType type;
  int64_t size;
};
const DType kDTypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2}, {"I8", torch::kInt8, 1}, {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1}, {"U16", torch::kUInt16, 2}, {"U32", torch::kUInt32, 4},
    {"U64", torch::kUInt64, 8}, {"F8_E4M3", torch::kFloat8_e4m3fn, 1},
    {"F8_E5M2", torch::kFloat8_e5m2, 1},
};

const DType* dtype_by_name(const std::string& n) {
  for (const auto& d : kDTypes)
    if (n == d.name) return &d;
  return nullptr;
}
const DType* dtype_by_type(torch::ScalarType t) {
  for (const auto& d : kDTypes)
    if (t == d.type) return &d;
  return nullptr;
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

namespace {

// A read-only file mapping shared by the tensors that view it (MAP_PRIVATE: an in-place write
// to a tensor copies the page and never reaches the file).
// Live mappings by start address, so that load_into can give back the pages of a tensor it has
// copied (keeping the peak at one copy of the weights, not two).
std::mutex g_mappings_mutex;
std::map<uintptr_t, size_t> g_mappings;

struct Mapping {
  void* addr = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (addr == MAP_FAILED || !size) return;
    {
      std::lock_guard<std::mutex> lock(g_mappings_mutex);
      g_mappings.erase(reinterpret_cast<uintptr_t>(addr));
    }
    munmap(addr, size);
  }
};

std::shared_ptr<Mapping> map_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(path + ": file not found");
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot open file");
  struct stat st{};
  ::fstat(fd, &st);
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<size_t>(st.st_size);
  if (m->size) m->addr = ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m->size && m->addr == MAP_FAILED) throw Error(path + ": cannot memory-map the file");
  if (m->size) {
    std::lock_guard<std::mutex> lock(g_mappings_mutex);
    g_mappings[reinterpret_cast<uintptr_t>(m->addr)] = m->size;
  }
  return m;
}

}  // namespace

void release_file_pages(const torch::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || t.nbytes() == 0) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  auto it = g_mappings.upper_bound(begin);
  if (it == g_mappings.begin()) return;
  --it;
  if (end > it->first + it->second) return;  // not (wholly) inside a mapping: heap memory
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  // Only the pages wholly inside the tensor: a page it shares with a neighbour may hold that
  // neighbour's data, written to already if the model took it without a copy (load_into).
  const uintptr_t lo = (begin + page - 1) & ~(page - 1);
  const uintptr_t hi = end & ~(page - 1);
  if (hi <= lo) return;
  // Clean file-backed pages: dropped from memory, read again from the file if touched.
  madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

TensorMap load_safetensors(const std::string& path) {
  auto mapping = map_file(path);
  const std::string_view bytes(static_cast<const char*>(mapping->addr == MAP_FAILED ? "" : mapping->addr),
                               mapping->size);
  auto fail = [&](const std::string& what) { throw Error(path + ": " + what); };
  if (bytes.size() < 8) fail("not a safetensors file (shorter than its 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > bytes.size() - 8) fail("header length " + std::to_string(n) + " exceeds the file size");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("malformed header JSON: ") + e.what());
  }
  if (!header.is_object()) fail("header is not a JSON object");
  const uint64_t data_size = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;
  TensorMap out;
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;  // (begin, end, name), non-empty only
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    auto bad = [&](const std::string& what) { fail("tensor '" + name + "': " + what); };
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets"))
      bad("entry needs dtype, shape and data_offsets");
    const DType* dt = info["dtype"].is_string() ? dtype_by_name(info["dtype"]) : nullptr;
    if (!dt) bad("unsupported dtype " + info["dtype"].dump());
    std::vector<int64_t> shape;
    int64_t numel = 1;
    if (!info["shape"].is_array()) bad("bad shape " + info["shape"].dump());
    for (const auto& d : info["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("bad shape " + info["shape"].dump());
      shape.push_back(d.get<int64_t>());
      if (__builtin_mul_overflow(numel, shape.back(), &numel))
        bad("shape " + info["shape"].dump() + " overflows");
    }
    int64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, dt->size, &nbytes)) bad("shape " + info["shape"].dump() + " overflows");
    const auto& off = info["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      bad("bad data_offsets " + off.dump());
    uint64_t begin = off[0], end = off[1];
    if (begin > end || end > data_size)
      bad("data_offsets " + off.dump() + " outside the data section of " +
          std::to_string(data_size) + " bytes");
    if (end - begin != static_cast<uint64_t>(nbytes))
      bad("shape " + shape_str(shape) + " x " + dt->name + " needs " +
          std::to_string(nbytes) + " bytes but data_offsets span " +
          std::to_string(end - begin));
    if (end > begin) spans.emplace_back(begin, end, name);
    torch::Tensor t;
    const char* at = data + begin;
    if (numel == 0) {
      t = torch::empty(shape, torch::TensorOptions().dtype(dt->type));
    } else if (reinterpret_cast<uintptr_t>(at) % dt->size == 0) {  // zero-copy view, paged in lazily
      t = torch::from_blob(const_cast<char*>(at), shape, [mapping](void*) {},
                           torch::TensorOptions().dtype(dt->type));
    } else {  // misaligned for its dtype: copy
      t = torch::empty(shape, torch::TensorOptions().dtype(dt->type));
      std::memcpy(t.data_ptr(), at, end - begin);
    }
    out.emplace(name, t);
  }
  // Two entries over the same bytes would become two tensors sharing memory (a write to one, the
  // other changed): refused, as the safetensors library refuses them.
  std::sort(spans.begin(), spans.end());
  uint64_t last_end = 0;
  std::string last;  // the entry reaching furthest so far
  for (size_t i = 0; i < spans.size(); ++i) {
    const auto& [begin, end, name] = spans[i];
    if (i > 0 && begin < last_end) fail("tensors '" + last + "' and '" + name + "' overlap in the data section");
    if (i == 0 || end > last_end) last_end = end, last = name;
  }
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> ordered;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const DType* dt = dtype_by_type(t.scalar_type());
    check(dt != nullptr, "cannot save tensor '" + name + "' of dtype " +
                             std::string(c10::toString(t.scalar_type())));
    auto c = t.detach().to(torch::kCPU).contiguous();
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * dt->size;
    header[name] = {{"dtype", dt->name}, {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    ordered.push_back(c);
  }
  std::string head = header.dump();
  head.append((8 - head.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::string prefix(8, '\0');
  uint64_t n = head.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  // Streamed tensor by tensor: saving never holds a second copy of the weights.
  atomic_write_with(path, [&](const std::filesystem::path& tmp) {
    std::ofstream out(tmp, std::ios::binary);
    check(bool(out), "cannot write " + tmp.string());
    out.write(prefix.data(), 8);
    out.write(head.data(), static_cast<std::streamsize>(head.size()));
    for (const auto& c : ordered)
      out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.nbytes()));
    out.flush();
    check(bool(out), "write failed: " + tmp.string() + " (disk full?)");
  });
}

std::string LoadReport::summary() const {
  std::string s = std::to_string(loaded.size()) + " tensors loaded, " +
                  std::to_string(missing.size()) + " missing, " +
                  std::to_string(unexpected.size()) + " unexpected";
  auto list = [](const std::vector<std::string>& v) {
    std::string out;
    for (size_t i = 0; i < v.size() && i < 5; ++i) out += (i ? ", " : "") + v[i];
    if (v.size() > 5) out += ", ...";
    return out;
  };
  if (!missing.empty()) s += "; missing: " + list(missing);
  if (!unexpected.empty()) s += "; unexpected: " + list(unexpected);
  return s;
}

}  // namespace blip2
