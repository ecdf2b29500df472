#include "blip2/text/text.h"

#include <fstream>
#include <sstream>

#include "blip2/util/common.h"

namespace blip2 {

std::string clean_caption(const std::string& caption, int64_t max_words,
                          const std::string& prompt) {
  std::string s;
  s.reserve(caption.size());
  for (unsigned char ch : caption) {
    char c = static_cast<char>(std::tolower(ch));
    if (std::string_view(".!\"()*#:;~").find(c) != std::string_view::npos) c = ' ';
    s.push_back(c);
  }
  std::vector<std::string> words;
  std::istringstream in(s);
  for (std::string w; in >> w;) words.push_back(w);
  if (max_words > 0 && static_cast<int64_t>(words.size()) > max_words) words.resize(max_words);
  std::string out = prompt;
  for (size_t i = 0; i < words.size(); ++i) out += (i ? " " : "") + words[i];
  return out;
}

WordPieceTokenizer::WordPieceTokenizer(std::vector<std::string> vocab, bool do_lower_case,
                                       const std::string& bos_token)
    : vocab_(std::move(vocab)), lower_(do_lower_case) {
  for (size_t i = 0; i < vocab_.size(); ++i) index_.emplace(vocab_[i], static_cast<int64_t>(i));
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
  std::ifstream in(path);
  check(bool(in), path + ": cannot open vocabulary file");
  std::vector<std::string> vocab;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
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

static bool is_ascii_punct(unsigned char c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
         (c >= 123 && c <= 126);
}

std::vector<std::string> WordPieceTokenizer::tokenize(const std::string& text) const {
  std::vector<std::string> words;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) words.push_back(cur);
    cur.clear();
  };
  for (unsigned char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      flush();
    } else if (c < 32 || c == 127) {
      // control characters are dropped, as BERT's cleaning does
    } else if (is_ascii_punct(c)) {
      flush();
      words.emplace_back(1, static_cast<char>(c));
    } else {
      cur.push_back(lower_ ? static_cast<char>(std::tolower(c)) : static_cast<char>(c));
    }
  }
  flush();
  std::vector<std::string> pieces;
  for (const auto& w : words) wordpiece(w, pieces);
  return pieces;
}

void WordPieceTokenizer::wordpiece(const std::string& word, std::vector<std::string>& out) const {
  if (word.size() > 100) {
    out.push_back("[UNK]");
    return;
  }
  std::vector<std::string> pieces;
  size_t start = 0;
  while (start < word.size()) {
    size_t end = word.size();
    std::string found;
    while (start < end) {
      std::string sub = word.substr(start, end - start);
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
    tokens.resize(std::max<int64_t>(0, max_length - 2));
  std::vector<int64_t> ids{cls_id_};
  for (const auto& t : tokens) ids.push_back(token_to_id(t) >= 0 ? token_to_id(t) : unk_id_);
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
  auto ids = torch::full({static_cast<int64_t>(texts.size()), len}, pad_id_, torch::kLong);
  auto mask = torch::zeros({static_cast<int64_t>(texts.size()), len}, torch::kLong);
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
