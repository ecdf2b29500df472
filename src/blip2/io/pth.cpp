#include "blip2/io/pth.h"

#include <caffe2/serialize/inline_container.h>

#include <cstring>
#include <regex>
#include <variant>

#include "blip2/util/common.h"

namespace blip2 {
namespace {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Storage {
  std::string key;
  torch::ScalarType dtype;
};
struct Global {
  std::string name;  // module.qualname
};
struct Opaque {
  std::string what;  // an object the reader does not build
};

struct Value {
  enum Kind { None, Bool, Int, Float, Str, List, Tuple, Dict, Tensor, StorageV, GlobalV, OpaqueV, Mark };
  Kind kind = None;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<ValuePtr> items;                           // list / tuple
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;    // dict, in insertion order
  torch::Tensor tensor;
  Storage storage;
  Global global;
  Opaque opaque;
};

ValuePtr make(Value::Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

const std::map<std::string, torch::ScalarType>& storage_types() {
  static const std::map<std::string, torch::ScalarType> m = {
      {"torch.FloatStorage", torch::kFloat32},   {"torch.DoubleStorage", torch::kFloat64},
      {"torch.HalfStorage", torch::kFloat16},    {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kInt64},      {"torch.IntStorage", torch::kInt32},
      {"torch.ShortStorage", torch::kInt16},     {"torch.CharStorage", torch::kInt8},
      {"torch.ByteStorage", torch::kUInt8},      {"torch.BoolStorage", torch::kBool},
  };
  return m;
}

class Unpickler {
 public:
  Unpickler(const std::string& data, std::string file,
            std::function<torch::Tensor(const Storage&)> load_storage)
      : d_(data), file_(std::move(file)), load_storage_(std::move(load_storage)) {}

  ValuePtr run() {
    while (true) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                                  // PROTO
        case 0x95: bytes(8); break;                                // FRAME
        case '.': return pop();                                    // STOP
        case '}': push(make(Value::Dict)); break;                  // EMPTY_DICT
        case ']': push(make(Value::List)); break;                  // EMPTY_LIST
        case ')': push(make(Value::Tuple)); break;                 // EMPTY_TUPLE
        case '(': push(make(Value::Mark)); break;                  // MARK
        case 'N': push(make(Value::None)); break;
        case 0x88: case 0x89: { auto v = make(Value::Bool); v->b = op == 0x88; push(v); break; }
        case 'J': push_int(static_cast<int32_t>(le(4))); break;    // BININT
        case 'K': push_int(static_cast<int64_t>(le(1))); break;    // BININT1
        case 'M': push_int(static_cast<int64_t>(le(2))); break;    // BININT2
        case 0x8a: {                                               // LONG1
          const int n = byte();
          if (n > 8) fail("LONG1 integer of " + std::to_string(n) + " bytes does not fit 64 bits");
          uint64_t u = le(n);
          int64_t v = n == 0 ? 0 : static_cast<int64_t>(u << (64 - 8 * n)) >> (64 - 8 * n);
          push_int(v);
          break;
        }
        case 'G': {                                                // BINFLOAT (big-endian)
          uint64_t u = 0;
          for (int k = 0; k < 8; ++k) u = (u << 8) | byte();
          auto v = make(Value::Float);
          std::memcpy(&v->f, &u, 8);
          push(v);
          break;
        }
        case 'X': push_str(bytes(le(4))); break;                   // BINUNICODE
        case 0x8c: push_str(bytes(byte())); break;                 // SHORT_BINUNICODE
        case 0x8d: push_str(bytes(le(8))); break;                  // BINUNICODE8
        case 'T': push_str(bytes(le(4))); break;                   // BINSTRING
        case 'U': push_str(bytes(byte())); break;                  // SHORT_BINSTRING
        case 'B': push_str(bytes(le(4))); break;                   // BINBYTES
        case 'C': push_str(bytes(byte())); break;                  // SHORT_BINBYTES
        case 'q': memo_[le(1)] = top(); break;                     // BINPUT
        case 'r': memo_[le(4)] = top(); break;                     // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;             // MEMOIZE
        case 'h': push(memo(le(1))); break;                        // BINGET
        case 'j': push(memo(le(4))); break;                        // LONG_BINGET
        case 't': { auto t = make(Value::Tuple); t->items = pop_mark(); push(t); break; }
        case 0x85: case 0x86: case 0x87: {                         // TUPLE1..3
          auto t = make(Value::Tuple);
          t->items.resize(op - 0x84);
          for (int k = op - 0x85; k >= 0; --k) t->items[k] = pop();
          push(t);
          break;
        }
        case 'a': { auto v = pop(); list_of(top())->items.push_back(v); break; }  // APPEND
        case 'e': { auto vs = pop_mark(); auto l = list_of(top());                // APPENDS
                    l->items.insert(l->items.end(), vs.begin(), vs.end()); break; }
        case 's': { auto v = pop(); auto k = pop(); dict_of(top())->entries.emplace_back(k, v); break; }
        case 'u': {                                                // SETITEMS
          auto vs = pop_mark();
          auto dct = dict_of(top());
          for (size_t k = 0; k + 1 < vs.size(); k += 2) dct->entries.emplace_back(vs[k], vs[k + 1]);
          break;
        }
        case 'c': {                                                // GLOBAL
          std::string mod = line(), name = line();
          push_global(mod + "." + name);
          break;
        }
        case 0x93: {                                               // STACK_GLOBAL
          auto name = pop(), mod = pop();
          push_global(mod->s + "." + name->s);
          break;
        }
        case 'Q': push(persistent(pop())); break;                  // BINPERSID
        case 'R': { auto args = pop(); auto fn = pop(); push(call(fn, args)); break; }  // REDUCE
        case 0x81: { auto args = pop(); auto cls = pop(); push(call(cls, args)); break; }  // NEWOBJ
        case 'b': pop(); break;  // BUILD: state of an object we do not build; tensors need none
        default:
          fail("unsupported pickle opcode 0x" + hex(op) + " at byte " + std::to_string(pos_ - 1));
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(file_ + ": data.pkl: " + what); }
  static std::string hex(int v) {
    char b[8];
    std::snprintf(b, sizeof b, "%02x", v);
    return b;
  }
  uint8_t byte() {
    if (pos_ >= d_.size()) fail("truncated pickle");
    return static_cast<uint8_t>(d_[pos_++]);
  }
  std::string bytes(uint64_t n) {
    if (n > d_.size() - pos_) fail("truncated pickle");
    std::string s = d_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t le(int n) {
    uint64_t v = 0;
    for (int k = 0; k < n; ++k) v |= static_cast<uint64_t>(byte()) << (8 * k);
    return v;
  }
  std::string line() {
    auto end = d_.find('\n', pos_);
    if (end == std::string::npos) fail("truncated pickle");
    std::string s = d_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t v) { auto x = make(Value::Int); x->i = v; push(x); }
  void push_str(std::string s) { auto x = make(Value::Str); x->s = std::move(s); push(x); }
  void push_global(const std::string& name) { auto g = make(Value::GlobalV); g->global.name = name; push(g); }
  ValuePtr top() {
    if (stack_.empty()) fail("stack underflow");
    return stack_.back();
  }
  ValuePtr pop() {
    auto v = top();
    stack_.pop_back();
    return v;
  }
  std::vector<ValuePtr> pop_mark() {
    std::vector<ValuePtr> out;
    while (true) {
      auto v = pop();
      if (v->kind == Value::Mark) break;
      out.push_back(v);
    }
    std::reverse(out.begin(), out.end());
    return out;
  }
  ValuePtr memo(uint64_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) fail("memo key " + std::to_string(k) + " undefined");
    return it->second;
  }
  ValuePtr list_of(const ValuePtr& v) {
    if (v->kind != Value::List) fail("APPEND to a non-list");
    return v;
  }
  ValuePtr dict_of(const ValuePtr& v) {
    if (v->kind != Value::Dict) fail("SETITEM on a non-dict");
    return v;
  }
  ValuePtr persistent(const ValuePtr& pid) {
    // ('storage', storage_type, key, location, numel)
    if (pid->kind != Value::Tuple || pid->items.size() < 3 || pid->items[0]->s != "storage")
      fail("unsupported persistent id");
    const auto& type = pid->items[1];
    auto it = storage_types().find(type->global.name);
    if (type->kind != Value::GlobalV || it == storage_types().end())
      fail("unsupported storage type " + type->global.name);
    auto v = make(Value::StorageV);
    v->storage = {pid->items[2]->s, it->second};
    return v;
  }
  ValuePtr call(const ValuePtr& fn, const ValuePtr& args) {
    const std::string name = fn->kind == Value::GlobalV ? fn->global.name : "<object>";
    auto arg = [&](size_t k) -> const ValuePtr& {
      if (args->kind != Value::Tuple || args->items.size() <= k) fail(name + ": missing argument");
      return args->items[k];
    };
    if (name == "collections.OrderedDict") return make(Value::Dict);
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      const auto& st = arg(0);
      if (st->kind != Value::StorageV) fail(name + ": first argument is not a storage");
      std::vector<int64_t> size, stride;
      for (const auto& x : arg(2)->items) size.push_back(x->i);
      for (const auto& x : arg(3)->items) stride.push_back(x->i);
      torch::Tensor flat = load_storage_(st->storage);
      int64_t numel = 1;
      for (int64_t d : size)
        if (d < 0 || __builtin_mul_overflow(numel, d, &numel)) fail(name + ": bad tensor size");
      if (numel > flat.numel())
        fail("tensor of " + std::to_string(numel) + " elements is larger than its storage '" +
             st->storage.key + "' (" + std::to_string(flat.numel()) + ")");
      auto t = make(Value::Tensor);
      try {
        t->tensor = flat.as_strided(size, stride, arg(1)->i).clone();
      } catch (const c10::Error&) {
        fail("tensor view outside its storage '" + st->storage.key + "'");
      }
      return t;
    }
    if (name == "torch._utils._rebuild_parameter" ||
        name == "torch._utils._rebuild_parameter_with_state")
      return arg(0);
    auto o = make(Value::OpaqueV);
    o->opaque.what = name;
    return o;
  }

  const std::string& d_;
  std::string file_;
  std::function<torch::Tensor(const Storage&)> load_storage_;
  size_t pos_ = 0;
  std::vector<ValuePtr> stack_;
  std::map<uint64_t, ValuePtr> memo_;
};

const Value* dict_get(const Value& d, const std::string& key) {
  for (const auto& [k, v] : d.entries)
    if (k->kind == Value::Str && k->s == key) return v.get();
  return nullptr;
}

}  // namespace

TensorMap load_pth(const std::string& path) {
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec), path + ": checkpoint not found");
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  std::string pickle;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    auto [ptr, n] = reader->getRecord("data.pkl");
    pickle.assign(static_cast<const char*>(ptr.get()), n);
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    throw Error(path + ": not a PyTorch zip checkpoint (" + msg.substr(0, msg.find('\n')) +
                "); files from torch < 1.6 must be re-saved with a newer torch");
  }
  std::map<std::string, torch::Tensor> storages;
  auto load_storage = [&](const std::string& key) {
    auto it = storages.find(key);
    if (it != storages.end()) return it->second;
    try {
      auto [ptr, n] = reader->getRecord("data/" + key);
      auto bytes = torch::empty({static_cast<int64_t>(n)}, torch::kUInt8);
      if (n) std::memcpy(bytes.data_ptr(), ptr.get(), n);
      storages[key] = bytes;
      return bytes;
    } catch (const c10::Error& e) {
      throw Error(path + ": storage '" + key + "' is missing or unreadable");
    }
  };
  return unpickle_state_dict(pickle, path, load_storage);
}

TensorMap unpickle_state_dict(const std::string& pickle, const std::string& path,
                              const std::function<torch::Tensor(const std::string& key)>& storage_bytes) {
  auto load_storage = [&](const Storage& s) {
    torch::Tensor bytes = storage_bytes(s.key);
    const int64_t elem = c10::elementSize(s.dtype);
    check(bytes.numel() % elem == 0, path + ": storage '" + s.key + "' size does not fit its dtype");
    return bytes.view(s.dtype);
  };
  Unpickler up(pickle, path, load_storage);
  ValuePtr root = up.run();
  const Value* sd = root.get();
  if (sd->kind == Value::Dict) {
    for (const char* wrapper : {"model", "state_dict"})
      if (const Value* inner = dict_get(*sd, wrapper); inner && inner->kind == Value::Dict) {
        sd = inner;
        break;
      }
  }
  check(sd->kind == Value::Dict, path + ": expected a state dict (a dict of tensors)");
  TensorMap out;
  for (const auto& [k, v] : sd->entries) {
    check(k->kind == Value::Str, path + ": state dict key is not a string");
    if (v->kind == Value::Tensor) out[k->s] = v->tensor;
    else if (v->kind == Value::OpaqueV)
      throw Error(path + ": '" + k->s + "' holds a " + v->opaque.what + " object, not a tensor");
    // other values (numbers, nested dicts of metadata) are not weights: skipped
  }
  check(!out.empty(), path + ": no tensors found");
  return out;
}

namespace {

// LAVIS stores some tensors twice: the LM decoder is tied to the word embeddings, and its bias is
// the head's own bias under a second name. Each copy must equal its twin, and is then dropped.
void check_twin(const TensorMap& lavis, const std::string& name, const std::string& twin) {
  auto a = lavis.find(name), b = lavis.find(twin);
  if (a == lavis.end() || b == lavis.end()) return;
  check(a->second.sizes() == b->second.sizes() && torch::equal(a->second, b->second),
        "'" + name + "' differs from '" + twin + "', which LAVIS ties it to: this file holds two different "
        "tensors where the model has one");
}

}  // namespace

TensorMap canonical_from_lavis(const TensorMap& lavis) {
  try {
    check_twin(lavis, "Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight");
    check_twin(lavis, "Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias");
  } catch (const Error& e) {
    throw Error(std::string("LAVIS checkpoint: ") + e.what());
  }
  if (auto it = lavis.find("Qformer.bert.embeddings.position_ids"); it != lavis.end())
    check(it->second.numel() > 0 &&
              torch::equal(it->second.flatten().to(torch::kLong), torch::arange(it->second.numel(), torch::kLong)),
          "LAVIS checkpoint: 'Qformer.bert.embeddings.position_ids' is not 0, 1, 2, ... (the positions are computed)");
  // Ordered rules: LAVIS name pattern -> canonical name ("" drops the tensor).
  static const std::vector<std::pair<std::regex, std::string>> rules = {
      {std::regex(R"(^Qformer\.bert\.embeddings\.position_ids$)"), ""},  // 0, 1, 2, ... (checked above)
      {std::regex(R"(^Qformer\.cls\.predictions\.decoder\.weight$)"), ""},  // twin of the word embeddings
      {std::regex(R"(^Qformer\.cls\.predictions\.decoder\.bias$)"), ""},    // twin of cls.predictions.bias
      {std::regex(R"(^visual_encoder\.cls_token$)"), "vision_model.embeddings.class_embedding"},
      {std::regex(R"(^visual_encoder\.pos_embed$)"), "vision_model.embeddings.position_embedding"},
      {std::regex(R"(^visual_encoder\.patch_embed\.proj\.)"), "vision_model.embeddings.patch_embedding."},
      {std::regex(R"(^visual_encoder\.blocks\.(\d+)\.norm1\.)"), "vision_model.encoder.layers.$1.layer_norm1."},
      {std::regex(R"(^visual_encoder\.blocks\.(\d+)\.norm2\.)"), "vision_model.encoder.layers.$1.layer_norm2."},
      {std::regex(R"(^visual_encoder\.blocks\.(\d+)\.attn\.proj\.)"), "vision_model.encoder.layers.$1.self_attn.projection."},
      {std::regex(R"(^visual_encoder\.blocks\.(\d+)\.attn\.)"), "vision_model.encoder.layers.$1.self_attn."},
      {std::regex(R"(^visual_encoder\.blocks\.(\d+)\.mlp\.)"), "vision_model.encoder.layers.$1.mlp."},
      {std::regex(R"(^ln_vision\.)"), "vision_model.post_layernorm."},
      {std::regex(R"(^Qformer\.bert\.embeddings\.LayerNorm\.)"), "qformer.layernorm."},
      {std::regex(R"(^Qformer\.bert\.embeddings\.)"), "embeddings."},
      {std::regex(R"(^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.)"),
       "qformer.encoder.layer.$1.$2.attention."},
      {std::regex(R"(^Qformer\.bert\.encoder\.)"), "qformer.encoder."},
      {std::regex(R"(^Qformer\.cls\.)"), "cls."},
      {std::regex(R"(^vision_proj\.)"), "vision_projection."},
      {std::regex(R"(^text_proj\.)"), "text_projection."},
      // Stage 2: the projection into the LLM (OPT, InstructBLIP's llm_proj, T5) and the LLM.
      {std::regex(R"(^(opt|llm|t5)_proj\.)"), "language_projection."},
      {std::regex(R"(^(opt|llm)_model\.)"), "language_model."},
  };
  // eva_vit_g.pth holds the bare ViT: give it the prefix of the finetuned files.
  const bool bare_vit = lavis.count("cls_token") && lavis.count("pos_embed");
  TensorMap out;
  for (const auto& [raw, t] : lavis) {
    std::string name = bare_vit ? "visual_encoder." + raw : raw;
    std::string mapped = name;
    for (const auto& [re, to] : rules) {
      if (std::regex_search(name, re)) {
        mapped = to.empty() ? "" : std::regex_replace(name, re, to, std::regex_constants::format_first_only);
        break;
      }
    }
    if (!mapped.empty()) out[mapped] = t;
  }
  return out;
}

torch::Tensor interpolate_pos_embed(const torch::Tensor& pos, int64_t new_tokens) {
  const int64_t old_grid = static_cast<int64_t>(std::llround(std::sqrt(double(pos.size(1) - 1))));
  const int64_t new_grid = static_cast<int64_t>(std::llround(std::sqrt(double(new_tokens - 1))));
  check(old_grid * old_grid == pos.size(1) - 1 && new_grid * new_grid == new_tokens - 1,
        "position embedding rows are not 1 + a square number");
  if (old_grid == new_grid) return pos;
  const int64_t d = pos.size(2);
  auto cls = pos.narrow(1, 0, 1);
  auto grid = pos.narrow(1, 1, old_grid * old_grid).reshape({1, old_grid, old_grid, d}).permute({0, 3, 1, 2});
  auto resized = torch::nn::functional::interpolate(
      grid.to(torch::kFloat32),
      torch::nn::functional::InterpolateFuncOptions()
          .size(std::vector<int64_t>{new_grid, new_grid})
          .mode(torch::kBicubic)
          .align_corners(false));
  return torch::cat({cls, resized.permute({0, 2, 3, 1}).reshape({1, new_grid * new_grid, d}).to(pos.dtype())}, 1);
}

}  // namespace blip2
