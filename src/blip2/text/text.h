// Text processing for the Q-Former: LAVIS' caption cleaning (the seed's CaptionTransform) and a
// BERT WordPiece tokenizer with the added [DEC] bos token.
//
// Both follow the Python reference exactly on Unicode text (Hugging Face's BertTokenizer:
// cleaning, CJK characters split, punctuation split, lower-casing with accent stripping when
// uncased, greedy longest-match WordPiece with [UNK] and the 100-character word limit). Unicode
// properties come from utf8proc; Python's full lower-casing (final sigma, dotted capital I) is
// reproduced where it differs from the simple mapping.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <torch/torch.h>

namespace blip2 {

// UTF-8 <-> code points; an invalid byte decodes to U+FFFD (Python's errors="replace").
std::u32string to_u32(const std::string& s);
std::string to_utf8(const std::u32string& s);

// LAVIS' BlipCaptionProcessor: lower-case; each of .!"()*#:;~ becomes a space; whitespace runs collapse; strip; keep the
// first `max_words` words; prepend `prompt`.
std::string clean_caption(const std::string& caption, int64_t max_words = 50,
                          const std::string& prompt = "");

// A hypothesis template with its "{}" replaced by `label` ("a picture of {}" -> "a picture of
// cat"). A template without "{}" is an error.
std::string fill_template(const std::string& tmpl, const std::string& label);

struct Encoded {
  torch::Tensor ids;   // [B, L] int64
  torch::Tensor keep;  // [B, L] int64 keep-mask: 1 = token, 0 = padding
};

class WordPieceTokenizer {
 public:
  // `vocab` in id order (one token per line of vocab.txt). `bos_token` is appended as a new id
  // unless the vocabulary already has it.
  WordPieceTokenizer(std::vector<std::string> vocab, bool do_lower_case = true,
                     const std::string& bos_token = "[DEC]");
  static WordPieceTokenizer from_file(const std::string& vocab_file, bool do_lower_case = true,
                                      const std::string& bos_token = "[DEC]");

  std::vector<std::string> tokenize(const std::string& text) const;
  // The basic tokenizer alone (before WordPiece).
  std::vector<std::string> basic_tokenize(const std::string& text) const;
  // [CLS] tokens [SEP], truncated to max_length (<= 0: no limit) keeping [SEP] last.
  std::vector<int64_t> encode(const std::string& text, int64_t max_length = 0) const;
  // padding: "max_length" pads to max_length, "longest" to the longest text, "none" (or
  // "do_not_pad") leaves each row its length (the tensor is then padded to the longest).
  Encoded encode_batch(const std::vector<std::string>& texts, int64_t max_length,
                       const std::string& padding = "max_length") const;

  int64_t token_to_id(const std::string& token) const;  // -1 if absent
  const std::string& id_to_token(int64_t id) const { return vocab_.at(static_cast<size_t>(id)); }
  int64_t size() const { return static_cast<int64_t>(vocab_.size()); }
  int64_t pad_id() const { return pad_id_; }
  int64_t cls_id() const { return cls_id_; }
  int64_t sep_id() const { return sep_id_; }
  int64_t unk_id() const { return unk_id_; }
  int64_t bos_id() const { return bos_id_; }

 private:
  void wordpiece(const std::string& word, std::vector<std::string>& out) const;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int64_t> index_;
  bool lower_;
  int64_t pad_id_, cls_id_, sep_id_, unk_id_, bos_id_;
};

}  // namespace blip2
