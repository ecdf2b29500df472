#include "blip2/text/llm_tokenizer.h"

#include <utf8proc.h>

#include <cstring>
#include <queue>

#include <nlohmann/json.hpp>

#include "blip2/text/text.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace

// ---- a minimal protobuf wire-format reader (tokenizer.model is a ModelProto) ----

class Proto {
 public:
  Proto(const uint8_t* p, const uint8_t* end, std::string where) : p_(p), end_(end), where_(std::move(where)) {}
  bool done() const { return p_ >= end_; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      check(p_ < end_, where_ + ": truncated varint");
      const uint8_t b = *p_++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    throw Error(where_ + ": varint longer than 10 bytes");
  }
  // The next field: number and wire type.
  std::pair<uint32_t, uint32_t> tag() {
    const uint64_t t = varint();
    return {static_cast<uint32_t>(t >> 3), static_cast<uint32_t>(t & 7)};
  }
  Proto message() {
    const uint64_t n = varint();
    check(n <= static_cast<uint64_t>(end_ - p_), where_ + ": a field runs past the end of the file");
    Proto sub(p_, p_ + n, where_);
    p_ += n;
    return sub;
  }
  std::string bytes() {
    auto m = message();
    return std::string(reinterpret_cast<const char*>(m.p_), static_cast<size_t>(m.end_ - m.p_));
  }
  float fixed32_float() {
    check(end_ - p_ >= 4, where_ + ": truncated float");
    float f;
    std::memcpy(&f, p_, 4);
    p_ += 4;
    return f;
  }
  void skip(uint32_t wire) {
    switch (wire) {
      case 0: varint(); break;
      case 1: check(end_ - p_ >= 8, where_ + ": truncated field"); p_ += 8; break;
      case 2: message(); break;
      case 5: check(end_ - p_ >= 4, where_ + ": truncated field"); p_ += 4; break;
      default: throw Error(where_ + ": unknown protobuf wire type " + std::to_string(wire) + " (not a tokenizer.model?)");
    }
  }
  const std::string& where() const { return where_; }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
  std::string where_;
};

// Greedy pair merging shared by both tokenizers: `symbols` are merged while `score(left, right)`
// finds the merged symbol; the best score wins, then the leftmost pair (SentencePiece's and
// the tokenizers library's order).
template <class Score>
std::vector<std::string> merge_pairs(std::vector<std::string> symbols, Score score) {
  struct Cand {
    double score;
    int left, right;
    size_t size;
    bool operator<(const Cand& o) const {
      return score != o.score ? score < o.score : left > o.left;  // max-heap: best score, leftmost
    }
  };
  const int n = static_cast<int>(symbols.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
  std::priority_queue<Cand> heap;
  auto push = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    double s;
    if (score(symbols[l], symbols[r], s)) heap.push({s, l, r, symbols[l].size() + symbols[r].size()});
  };
  for (int i = 0; i + 1 < n; ++i) push(i, i + 1);
  while (!heap.empty()) {
    auto c = heap.top();
    heap.pop();
    // Stale: one side was merged away or grew since this pair was scored.
    if (symbols[c.left].empty() || symbols[c.right].empty() || next[c.left] != c.right ||
        symbols[c.left].size() + symbols[c.right].size() != c.size)
      continue;
    symbols[c.left] += symbols[c.right];
    symbols[c.right].clear();
    next[c.left] = next[c.right];
    if (next[c.left] >= 0) prev[next[c.left]] = c.left;
    push(prev[c.left], c.left);
    push(c.left, next[c.left]);
  }
  std::vector<std::string> out;
  for (int i = 0; i >= 0 && n > 0; i = next[i]) out.push_back(symbols[i]);
  return out;
}

std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (char32_t cp : to_u32(s)) out.push_back(to_utf8(std::u32string(1, cp)));
  return out;
}

// GPT-2's reversible byte -> printable character table.
const std::array<char32_t, 256>& byte_encoder() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
    }
    return t;
  }();
  return table;
}

bool is_letter(char32_t c) {
  auto k = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
         k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_LO;
}
bool is_number(char32_t c) {
  auto k = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}
bool is_space(char32_t c) {  // Unicode White_Space
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

}  // namespace

// ---- SentencePiece ----

std::shared_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_file(const std::string& path) {
  std::error_code ec;
  check(fs::is_regular_file(path, ec), path + ": tokenizer.model not found");
  const std::string data = read_file(path);
  const auto* begin = reinterpret_cast<const uint8_t*>(data.data());
  Proto model(begin, begin + data.size(), path);
  std::vector<Piece> pieces;
  int64_t model_type = 1, unk = 0, bos = 1, eos = 2, pad = -1;
  bool byte_fallback = false, dummy = true, remove_ws = true;
  std::string normalizer = "nmt_nfkc", charsmap;
  auto as_id = [](uint64_t v) { return static_cast<int64_t>(static_cast<int32_t>(v)); };
  while (!model.done()) {
    auto [field, wire] = model.tag();
    if (field == 1 && wire == 2) {
      Proto m = model.message();
      Piece piece;
      while (!m.done()) {
        auto [f, w] = m.tag();
        if (f == 1 && w == 2) piece.text = m.bytes();
        else if (f == 2 && w == 5) piece.score = m.fixed32_float();
        else if (f == 3 && w == 0) piece.type = static_cast<PieceType>(m.varint());
        else m.skip(w);
      }
      pieces.push_back(std::move(piece));
    } else if (field == 2 && wire == 2) {  // TrainerSpec
      Proto m = model.message();
      while (!m.done()) {
        auto [f, w] = m.tag();
        if (w != 0) { m.skip(w); continue; }
        const uint64_t v = m.varint();
        if (f == 3) model_type = static_cast<int64_t>(v);
        else if (f == 35) byte_fallback = v != 0;
        else if (f == 40) unk = as_id(v);
        else if (f == 41) bos = as_id(v);
        else if (f == 42) eos = as_id(v);
        else if (f == 43) pad = as_id(v);
      }
    } else if (field == 3 && wire == 2) {  // NormalizerSpec
      Proto m = model.message();
      while (!m.done()) {
        auto [f, w] = m.tag();
        if (f == 1 && w == 2) normalizer = m.bytes();
        else if (f == 2 && w == 2) charsmap = m.bytes();
        else if (f == 3 && w == 0) dummy = m.varint() != 0;
        else if (f == 4 && w == 0) remove_ws = m.varint() != 0;
        else m.skip(w);
      }
    } else {
      model.skip(wire);
    }
  }
  check(!pieces.empty(), path + ": no pieces (not a SentencePiece tokenizer.model?)");
  check(model_type == 2, path + ": trainer_spec.model_type " + std::to_string(model_type) +
                             " is not BPE (2); Llama and Baichuan use BPE models");
  check(normalizer == "identity" || charsmap.empty(),
        path + ": normalizer_spec.name '" + normalizer + "' is not supported (only identity, as Llama's)");
  auto tok = std::make_shared<SentencePieceTokenizer>(std::move(pieces), byte_fallback, dummy, remove_ws,
                                                      unk, bos, eos, pad);
  tok->source = path;
  return tok;
}

SentencePieceTokenizer::SentencePieceTokenizer(std::vector<Piece> pieces, bool byte_fallback,
                                               bool add_dummy_prefix, bool remove_extra_whitespaces,
                                               int64_t unk, int64_t bos, int64_t eos, int64_t pad)
    : pieces_(std::move(pieces)), byte_fallback_(byte_fallback), add_dummy_prefix_(add_dummy_prefix),
      remove_extra_whitespaces_(remove_extra_whitespaces) {
  unk_id = unk;
  bos_id = bos;
  eos_id = eos;
  pad_id = pad;
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const auto& p = pieces_[i];
    index_.emplace(p.text, static_cast<int64_t>(i));
    if (p.type == PieceType::kByte && p.text.size() == 6 && p.text.rfind("<0x", 0) == 0)
      byte_ids_[std::stoi(p.text.substr(3, 2), nullptr, 16)] = static_cast<int64_t>(i);
  }
  const int64_t n = vocab_size();
  for (int64_t id : {unk, bos, eos})
    check(id < n, source + ": special id " + std::to_string(id) + " is outside the " + std::to_string(n) + " pieces");
}

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string& raw, bool add_bos) const {
  std::vector<int64_t> ids;
  if (add_bos && bos_id >= 0) ids.push_back(bos_id);
  std::string text = raw;
  if (remove_extra_whitespaces_) {  // strip, and collapse runs of spaces
    std::string t;
    for (char c : text)
      if (c != ' ' || (!t.empty() && t.back() != ' ')) t.push_back(c);
    while (!t.empty() && t.back() == ' ') t.pop_back();
    text = t;
  }
  if (text.empty()) return ids;
  std::string norm;
  if (add_dummy_prefix_ && text[0] != ' ') norm = kSpace;
  for (char c : text) {
    if (c == ' ') norm += kSpace;
    else norm.push_back(c);
  }
  auto mergeable = [&](const std::string& s, double& score) {
    auto it = index_.find(s);
    if (it == index_.end()) return false;
    const auto& p = pieces_[static_cast<size_t>(it->second)];
    if (p.type != PieceType::kNormal && p.type != PieceType::kUserDefined) return false;
    score = p.score;
    return true;
  };
  for (const auto& sym : merge_pairs(code_points(norm), [&](const std::string& a, const std::string& b, double& s) {
         return mergeable(a + b, s);
       })) {
    double unused;
    if (mergeable(sym, unused)) {
      ids.push_back(index_.at(sym));
    } else if (byte_fallback_) {
      for (unsigned char b : sym) {
        check(byte_ids_[b] >= 0, source + ": byte piece <0x" + std::to_string(b) + "> missing for byte fallback");
        ids.push_back(byte_ids_[b]);
      }
    } else {
      ids.push_back(unk_id);
    }
  }
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::string out;
  for (int64_t id : ids) {
    check(id >= 0, source + ": negative token id " + std::to_string(id));
    if (id >= vocab_size()) continue;  // a row the LLM's table was padded with: no text
    const auto& p = pieces_[static_cast<size_t>(id)];
    if (p.type == PieceType::kByte) {
      out.push_back(static_cast<char>(std::stoi(p.text.substr(3, 2), nullptr, 16)));
      continue;
    }
    const bool special = p.type == PieceType::kControl || p.type == PieceType::kUnknown || id == pad_id;
    if (special && skip_special) continue;
    out += p.text;
  }
  // Byte pieces may form invalid UTF-8: each invalid byte becomes U+FFFD, as sentencepiece's own
  // decoder does (transformers 5's LlamaTokenizer returns "" for such ids instead).
  std::string text = to_utf8(to_u32(out));
  std::string result;
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, kSpace.size(), kSpace) == 0) {
      result.push_back(' ');
      i += kSpace.size();
    } else {
      result.push_back(text[i++]);
    }
  }
  if (add_dummy_prefix_ && !result.empty() && result[0] == ' ') result.erase(0, 1);
  return result;
}

std::string SentencePieceTokenizer::id_to_token(int64_t id) const {
  check(id >= 0 && id < vocab_size(), source + ": id " + std::to_string(id) + " out of range");
  return pieces_[static_cast<size_t>(id)].text;
}

int64_t SentencePieceTokenizer::token_to_id(const std::string& token) const {
  auto it = index_.find(token);
  return it == index_.end() ? -1 : it->second;
}

// ---- byte-level BPE ----

std::shared_ptr<ByteLevelBpeTokenizer> ByteLevelBpeTokenizer::from_files(const std::string& vocab_json,
                                                                         const std::string& merges_txt) {
  auto tok = std::make_shared<ByteLevelBpeTokenizer>();
  tok->source = vocab_json;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(vocab_json));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(vocab_json + ": malformed JSON at byte " + std::to_string(e.byte));
  }
  check(j.is_object() && !j.empty(), vocab_json + ": expected an object of token -> id");
  int64_t max_id = -1;
  for (const auto& [token, id] : j.items()) {
    check(id.is_number_integer() && id.get<int64_t>() >= 0,
          vocab_json + ": the id of '" + token + "' is not a non-negative integer");
    max_id = std::max(max_id, id.get<int64_t>());
  }
  tok->vocab_.assign(static_cast<size_t>(max_id + 1), "");
  for (const auto& [token, id] : j.items()) {
    tok->vocab_[static_cast<size_t>(id.get<int64_t>())] = token;
    tok->index_[token] = id.get<int64_t>();
  }
  std::istringstream merges(read_file(merges_txt));
  std::string line;
  int64_t rank = 0, line_no = 0;
  while (std::getline(merges, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const auto sp = line.find(' ');
    check(sp != std::string::npos && sp > 0 && sp + 1 < line.size() && line.find(' ', sp + 1) == std::string::npos,
          merges_txt + ":" + std::to_string(line_no) + ": expected two tokens separated by one space");
    tok->ranks_.emplace(line, rank++);
  }
  auto id_of = [&](const char* t) { return tok->token_to_id(t); };
  tok->bos_id = id_of("</s>");
  tok->eos_id = id_of("</s>");
  tok->pad_id = id_of("<pad>");
  tok->unk_id = id_of("<unk>");
  for (int64_t id : {tok->bos_id, tok->pad_id})
    if (id >= 0) tok->special_.push_back(id);
  return tok;
}

std::vector<std::u32string> ByteLevelBpeTokenizer::pretokenize(const std::u32string& s) {
  std::vector<std::u32string> out;
  const size_t n = s.size();
  size_t i = 0;
  auto run = [&](size_t from, auto pred) {
    while (from < n && pred(s[from])) ++from;
    return from;
  };
  auto other = [](char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  while (i < n) {
    size_t end = i;
    if (s[i] == U'\'') {  // contractions, lower-case only as in GPT-2's pattern
      for (const char32_t* c : {U"s", U"t", U"re", U"ve", U"m", U"ll", U"d"}) {
        const std::u32string suffix(c);
        if (s.compare(i + 1, suffix.size(), suffix) == 0) {
          end = i + 1 + suffix.size();
          break;
        }
      }
    }
    if (end == i) {
      const size_t start = s[i] == U' ' && i + 1 < n ? i + 1 : i;
      if (is_letter(s[start])) end = run(start, is_letter);
      else if (is_number(s[start])) end = run(start, is_number);
      else if (other(s[start])) end = run(start, other);
    }
    if (end == i) {  // whitespace: a run, leaving its last character to the next word if one follows
      end = run(i, is_space);
      if (end < n && end - i > 1) --end;
    }
    out.push_back(s.substr(i, end - i));
    i = end;
  }
  return out;
}

void ByteLevelBpeTokenizer::bpe(const std::u32string& word, std::vector<int64_t>& out) const {
  std::vector<std::string> symbols;
  for (char32_t c : word) symbols.push_back(to_utf8(std::u32string(1, c)));
  auto merged = merge_pairs(std::move(symbols), [&](const std::string& a, const std::string& b, double& score) {
    auto it = ranks_.find(a + " " + b);
    if (it == ranks_.end()) return false;
    score = -static_cast<double>(it->second);  // a lower rank merges first
    return true;
  });
  for (const auto& t : merged) {
    auto it = index_.find(t);
    if (it != index_.end()) out.push_back(it->second);
    else if (unk_id >= 0) out.push_back(unk_id);
    else throw Error(source + ": '" + t + "' is not in the vocabulary and there is no <unk>");
  }
}

std::vector<int64_t> ByteLevelBpeTokenizer::encode(const std::string& text, bool add_bos) const {
  std::vector<int64_t> ids;
  if (add_bos && bos_id >= 0) ids.push_back(bos_id);
  const auto& enc = byte_encoder();
  for (const auto& piece : pretokenize(to_u32(text))) {
    std::u32string mapped;
    for (unsigned char b : to_utf8(piece)) mapped.push_back(enc[b]);
    bpe(mapped, ids);
  }
  return ids;
}

std::string ByteLevelBpeTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  static const std::unordered_map<char32_t, unsigned char> decoder = [] {
    std::unordered_map<char32_t, unsigned char> d;
    const auto& e = byte_encoder();
    for (int b = 0; b < 256; ++b) d[e[b]] = static_cast<unsigned char>(b);
    return d;
  }();
  std::string bytes;
  for (int64_t id : ids) {
    check(id >= 0, source + ": negative token id " + std::to_string(id));
    if (id >= vocab_size()) continue;  // a row the LLM's table was padded with: no text
    if (skip_special && std::find(special_.begin(), special_.end(), id) != special_.end()) continue;
    for (char32_t c : to_u32(vocab_[static_cast<size_t>(id)])) {
      auto it = decoder.find(c);
      if (it != decoder.end()) bytes.push_back(static_cast<char>(it->second));
      else bytes += to_utf8(std::u32string(1, c));
    }
  }
  return to_utf8(to_u32(bytes));
}

std::string ByteLevelBpeTokenizer::id_to_token(int64_t id) const {
  check(id >= 0 && id < vocab_size(), source + ": id " + std::to_string(id) + " out of range");
  return vocab_[static_cast<size_t>(id)];
}

int64_t ByteLevelBpeTokenizer::token_to_id(const std::string& token) const {
  auto it = index_.find(token);
  return it == index_.end() ? -1 : it->second;
}

// ---- WordPiece as an LLM vocabulary ----

WordPieceLlmTokenizer::WordPieceLlmTokenizer(std::shared_ptr<const WordPieceTokenizer> wordpiece)
    : wp_(std::move(wordpiece)) {
  bos_id = wp_->cls_id();
  eos_id = wp_->sep_id();
  pad_id = wp_->pad_id();
  unk_id = wp_->unk_id();
  source = "the WordPiece vocabulary";
}

std::vector<int64_t> WordPieceLlmTokenizer::encode(const std::string& text, bool add_bos) const {
  std::vector<int64_t> ids;
  if (add_bos) ids.push_back(bos_id);
  for (const auto& t : wp_->tokenize(text)) ids.push_back(wp_->token_to_id(t));
  return ids;
}

std::string WordPieceLlmTokenizer::id_to_token(int64_t id) const {
  check(id >= 0 && id < vocab_size(), source + ": id " + std::to_string(id) + " out of range");
  return wp_->id_to_token(id);
}

std::string WordPieceLlmTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::string out;
  for (int64_t id : ids) {
    check(id >= 0, source + ": negative token id " + std::to_string(id));
    if (id >= vocab_size()) continue;  // a row the LLM's table was padded with: no text
    const std::string t = id_to_token(id);
    const bool special = t.size() > 2 && t.front() == '[' && t.back() == ']';
    if (special && skip_special) continue;
    if (t.rfind("##", 0) == 0) {
      out += t.substr(2);
    } else {
      if (!out.empty()) out += ' ';
      out += t;
    }
  }
  return out;
}

// ---- loading and batching ----

std::shared_ptr<LlmTokenizer> load_llm_tokenizer(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "tokenizer.model", ec)) return SentencePieceTokenizer::from_file((p / "tokenizer.model").string());
    if (fs::exists(p / "vocab.json", ec) && fs::exists(p / "merges.txt", ec))
      return ByteLevelBpeTokenizer::from_files((p / "vocab.json").string(), (p / "merges.txt").string());
    throw Error(path + ": no tokenizer here (expected tokenizer.model, or vocab.json and merges.txt)");
  }
  check(fs::is_regular_file(p, ec), path + ": tokenizer not found");
  if (p.filename() == "vocab.json") {
    const auto merges = p.parent_path() / "merges.txt";
    check(fs::is_regular_file(merges, ec), path + ": merges.txt is missing beside it");
    return ByteLevelBpeTokenizer::from_files(path, merges.string());
  }
  return SentencePieceTokenizer::from_file(path);
}

PromptBatch encode_prompts(const LlmTokenizer& tok, const std::vector<std::string>& prompts, bool add_bos) {
  std::vector<std::vector<int64_t>> rows;
  size_t longest = 0;
  for (const auto& p : prompts) {
    rows.push_back(tok.encode(p, add_bos));
    longest = std::max(longest, rows.back().size());
  }
  const int64_t b = static_cast<int64_t>(rows.size()), l = static_cast<int64_t>(longest);
  const int64_t pad = tok.pad_id >= 0 ? tok.pad_id : std::max<int64_t>(tok.eos_id, 0);
  PromptBatch out{torch::full({b, l}, pad, torch::kLong), torch::zeros({b, l}, torch::kLong)};
  for (int64_t i = 0; i < b; ++i) {
    const auto& r = rows[static_cast<size_t>(i)];
    const int64_t off = l - static_cast<int64_t>(r.size());
    for (size_t j = 0; j < r.size(); ++j) {
      out.ids[i][off + static_cast<int64_t>(j)] = r[j];
      out.keep[i][off + static_cast<int64_t>(j)] = 1;
    }
  }
  return out;
}

}  // namespace blip2
