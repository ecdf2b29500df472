#include "blip2/text/text.h"

#include <fstream>
#include <sstream>

#include <utf8proc.h>

#include "blip2/util/common.h"

namespace blip2 {

std::u32string to_u32(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
  while (left > 0) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
    if (n <= 0) {  // invalid byte: U+FFFD, as Python's errors="replace"
      out.push_back(0xFFFD);
      n = 1;
    } else {
      out.push_back(static_cast<char32_t>(cp));
    }
    p += n;
    left -= n;
  }
  return out;
}

std::string to_utf8(const std::u32string& s) {
  std::string out;
  utf8proc_uint8_t buf[4];
  for (char32_t cp : s) {
    auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
    out.append(reinterpret_cast<char*>(buf), static_cast<size_t>(n));
  }
  return out;
}

namespace {

utf8proc_category_t category(char32_t cp) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(cp));
}

bool is_cased(char32_t cp) {
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}

// Python's str.lower(): the simple mapping plus the two special cases that matter for text
// (U+0130 -> "i" + U+0307; final sigma).
std::u32string python_lower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t cp = s[i];
    if (cp == 0x130) {
      out += U"i\u0307";
    } else if (cp == 0x3A3) {
      // Final_Sigma: preceded by a cased letter and not followed by one (skipping ignorables
      // is not modelled).
      bool before = i > 0 && is_cased(s[i - 1]);
      bool after = i + 1 < s.size() && is_cased(s[i + 1]);
      out.push_back(before && !after ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
    }
  }
  return out;
}

// str.isspace()
bool is_python_space(char32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85) return true;
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

// BERT's _is_whitespace / _is_control / _is_punctuation / _is_chinese_char.
bool bert_whitespace(char32_t cp) {
  return cp == U' ' || cp == U'\t' || cp == U'\n' || cp == U'\r' ||
         category(cp) == UTF8PROC_CATEGORY_ZS;
}
bool bert_control(char32_t cp) {
  if (cp == U'\t' || cp == U'\n' || cp == U'\r') return false;
  auto c = category(cp);
  return c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CS ||
         c == UTF8PROC_CATEGORY_CO || c == UTF8PROC_CATEGORY_CN;
}
bool bert_punct(char32_t cp) {
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
      (cp >= 123 && cp <= 126))
    return true;
  auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}
bool cjk(char32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
         (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

// NFD, then drop nonspacing marks (BERT's _run_strip_accents).
std::u32string strip_accents(const std::u32string& s) {
  std::u32string out;
  utf8proc_int32_t buf[32];
  for (char32_t cp : s) {
    int last_boundclass = 0;
    utf8proc_ssize_t n = utf8proc_decompose_char(static_cast<utf8proc_int32_t>(cp), buf, 32,
                                                 UTF8PROC_DECOMPOSE, &last_boundclass);
    if (n < 0) {
      out.push_back(cp);
      continue;
    }
    for (utf8proc_ssize_t i = 0; i < n; ++i)
      if (category(static_cast<char32_t>(buf[i])) != UTF8PROC_CATEGORY_MN)
        out.push_back(static_cast<char32_t>(buf[i]));
  }
  return out;
}

// str.split(): runs of Python whitespace separate words.
std::vector<std::u32string> python_split(const std::u32string& s) {
  std::vector<std::u32string> words;
  std::u32string cur;
  for (char32_t cp : s) {
    if (is_python_space(cp)) {
      if (!cur.empty()) words.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(cp);
    }
  }
  if (!cur.empty()) words.push_back(cur);
  return words;
}

}  // namespace

std::string fill_template(const std::string& tmpl, const std::string& label) {
  auto at = tmpl.find("{}");
  check(at != std::string::npos, "hypothesis_template '" + tmpl +
                                     "' has no '{}' to put the label in (e.g. \"This is a photo of {}.\")");
  std::string out = tmpl;
  return out.replace(at, 2, label);
}

std::string clean_caption(const std::string& caption, int64_t max_words,
                          const std::string& prompt) {
  std::u32string s = python_lower(to_u32(caption));
  for (char32_t& cp : s)
    if (std::u32string_view(U".!\"()*#:;~").find(cp) != std::u32string_view::npos) cp = U' ';
  std::u32string collapsed;  // re.sub(r"\s{2,}", " ", ...)
  for (size_t i = 0; i < s.size();) {
    size_t j = i;
    while (j < s.size() && is_python_space(s[j])) ++j;
    if (j - i >= 2) {
      collapsed.push_back(U' ');
      i = j;
    } else {
      collapsed.push_back(s[i]);
      ++i;
    }
  }
  while (!collapsed.empty() && collapsed.back() == U'\n') collapsed.pop_back();  // rstrip("\n")
  size_t b = collapsed.find_first_not_of(U' ');                                  // strip(" ")
  size_t e = collapsed.find_last_not_of(U' ');
  collapsed = b == std::u32string::npos ? U"" : collapsed.substr(b, e - b + 1);
  if (max_words > 0) {  // caption.split(" ")[:max_words]
    size_t pos = 0;
    int64_t words = 1;
    while ((pos = collapsed.find(U' ', pos)) != std::u32string::npos) {
      if (words == max_words) {
        collapsed.resize(pos);
        break;
      }
      ++words;
      ++pos;
    }
  }
  return prompt + to_utf8(collapsed);
}

WordPieceTokenizer::WordPieceTokenizer(std::vector<std::string> vocab, bool do_lower_case,
                                       const std::string& bos_token)
    : vocab_(std::move(vocab)), lower_(do_lower_case) {
  // A token listed twice maps to its last line, as Hugging Face's load_vocab.
  for (size_t i = 0; i < vocab_.size(); ++i) index_[vocab_[i]] = static_cast<int64_t>(i);
  if (!bos_token.empty() && !index_.count(bos_token)) {
    index_.emplace(bos_token, static_cast<int64_t>(vocab_.size()));
    vocab_.push_back(bos_token);
  }
  auto need = [&](const char* tok) {
    int64_t id = token_to_id(tok);
    check(id >= 0, std::string("vocabulary has no ") + tok + " token");
    return id;
  };
  pad_id_ = need("[PAD]");
  cls_id_ = need("[CLS]");
  sep_id_ = need("[SEP]");
  unk_id_ = need("[UNK]");
  bos_id_ = bos_token.empty() ? -1 : token_to_id(bos_token);
}

WordPieceTokenizer WordPieceTokenizer::from_file(const std::string& path, bool lower,
                                                 const std::string& bos) {
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec), path + ": vocabulary file not found");
  std::ifstream in(path);
  check(bool(in), path + ": cannot open vocabulary file");
  std::vector<std::string> vocab;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    // HF strips each line (load_vocab: token.rstrip("\n")); keep the token as written.
    vocab.push_back(line);
  }
  check(!vocab.empty(), path + ": empty vocabulary file");
  try {
    return WordPieceTokenizer(std::move(vocab), lower, bos);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

int64_t WordPieceTokenizer::token_to_id(const std::string& token) const {
  auto it = index_.find(token);
  return it == index_.end() ? -1 : it->second;
}

std::vector<std::string> WordPieceTokenizer::basic_tokenize(const std::string& text) const {
  // _clean_text + _tokenize_chinese_chars
  std::u32string cleaned;
  for (char32_t cp : to_u32(text)) {
    if (cp == 0 || cp == 0xFFFD || bert_control(cp)) continue;
    if (bert_whitespace(cp)) {
      cleaned.push_back(U' ');
    } else if (cjk(cp)) {
      cleaned += U' ';
      cleaned.push_back(cp);
      cleaned += U' ';
    } else {
      cleaned.push_back(cp);
    }
  }
  std::vector<std::string> out;
  for (std::u32string word : python_split(cleaned)) {
    if (lower_) word = strip_accents(python_lower(word));
    std::u32string cur;  // _run_split_on_punc
    for (char32_t cp : word) {
      if (bert_punct(cp)) {
        if (!cur.empty()) out.push_back(to_utf8(cur));
        cur.clear();
        out.push_back(to_utf8(std::u32string(1, cp)));
      } else {
        cur.push_back(cp);
      }
    }
    if (!cur.empty()) out.push_back(to_utf8(cur));
  }
  // whitespace_tokenize(" ".join(split_tokens)): lower-casing may have produced spaces
  std::vector<std::string> words;
  for (const auto& t : out)
    for (const auto& w : python_split(to_u32(t))) words.push_back(to_utf8(w));
  return words;
}

std::vector<std::string> WordPieceTokenizer::tokenize(const std::string& text) const {
  std::vector<std::string> pieces;
  for (const auto& w : basic_tokenize(text)) wordpiece(w, pieces);
  return pieces;
}

void WordPieceTokenizer::wordpiece(const std::string& word, std::vector<std::string>& out) const {
  const std::u32string chars = to_u32(word);
  if (chars.size() > 100) {
    out.push_back("[UNK]");
    return;
  }
  std::vector<std::string> pieces;
  size_t start = 0;
  while (start < chars.size()) {
    size_t end = chars.size();
    std::string found;
    while (start < end) {
      std::string sub = to_utf8(chars.substr(start, end - start));
      if (start > 0) sub = "##" + sub;
      if (index_.count(sub)) {
        found = sub;
        break;
      }
      --end;
    }
    if (found.empty()) {
      out.push_back("[UNK]");
      return;
    }
    pieces.push_back(found);
    start = end;
  }
  out.insert(out.end(), pieces.begin(), pieces.end());
}

std::vector<int64_t> WordPieceTokenizer::encode(const std::string& text, int64_t max_length) const {
  auto tokens = tokenize(text);
  if (max_length > 0 && static_cast<int64_t>(tokens.size()) > max_length - 2)
    tokens.resize(static_cast<size_t>(std::max<int64_t>(0, max_length - 2)));
  std::vector<int64_t> ids{cls_id_};
  for (const auto& t : tokens) {
    int64_t id = token_to_id(t);
    ids.push_back(id >= 0 ? id : unk_id_);
  }
  ids.push_back(sep_id_);
  return ids;
}

Encoded WordPieceTokenizer::encode_batch(const std::vector<std::string>& texts,
                                         int64_t max_length, const std::string& padding) const {
  std::vector<std::vector<int64_t>> all;
  int64_t longest = 0;
  for (const auto& t : texts) {
    all.push_back(encode(t, max_length));
    longest = std::max<int64_t>(longest, static_cast<int64_t>(all.back().size()));
  }
  int64_t len = padding == "max_length" && max_length > 0 ? max_length : longest;
  const auto n = static_cast<int64_t>(texts.size());
  auto ids = torch::full({n, len}, pad_id_, torch::kLong);
  auto mask = torch::zeros({n, len}, torch::kLong);
  auto ia = ids.accessor<int64_t, 2>();
  auto ma = mask.accessor<int64_t, 2>();
  for (size_t b = 0; b < all.size(); ++b)
    for (size_t i = 0; i < all[b].size(); ++i) {
      ia[b][i] = all[b][i];
      ma[b][i] = 1;
    }
  return {ids, mask};
}

}  // namespace blip2
