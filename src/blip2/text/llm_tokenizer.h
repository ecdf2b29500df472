// Tokenizers of the stage-2 LLMs, giving the ids Hugging Face's tokenizers give:
//   - SentencePieceTokenizer: a SentencePiece BPE `tokenizer.model` (Llama, Baichuan): the
//     protobuf is read here; whitespace becomes "▁", a "▁" is prepended unless the text starts
//     with a space (transformers' Metaspace, prepend_scheme "first"), pieces merge by score,
//     characters outside the vocabulary fall back to <0xXX> byte pieces (or <unk>).
//   - ByteLevelBpeTokenizer: GPT-2's byte-level BPE (`vocab.json` + `merges.txt`, OPT): GPT-2's
//     pre-tokenisation pattern, bytes mapped to printable characters, merges by rank.
// Text is taken literally: "<s>" in a prompt is three characters, not the BOS token.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <torch/torch.h>

#include "blip2/text/text.h"

namespace blip2 {

class LlmTokenizer {
 public:
  virtual ~LlmTokenizer() = default;
  // Ids of `text`, BOS first when add_bos.
  virtual std::vector<int64_t> encode(const std::string& text, bool add_bos = false) const = 0;
  // Text of `ids`; special tokens (BOS, EOS, PAD, UNK, control pieces) left out when skip_special.
  // Ids past the vocabulary (rows an LLM's embedding table was padded with) give no text.
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::string id_to_token(int64_t id) const = 0;
  virtual int64_t token_to_id(const std::string& token) const = 0;  // -1 if absent
  int64_t bos_id = -1, eos_id = -1, pad_id = -1, unk_id = -1;
  std::string source;  // the file(s) it came from, for errors
};

class SentencePieceTokenizer : public LlmTokenizer {
 public:
  enum class PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    PieceType type = PieceType::kNormal;
  };
  // Reads a tokenizer.model (SentencePiece ModelProto). Only BPE models with the identity
  // normaliser are accepted (Llama's and Baichuan's); others are an error naming the field.
  static std::shared_ptr<SentencePieceTokenizer> from_file(const std::string& path);
  SentencePieceTokenizer(std::vector<Piece> pieces, bool byte_fallback, bool add_dummy_prefix,
                         bool remove_extra_whitespaces, int64_t unk, int64_t bos, int64_t eos, int64_t pad);

  std::vector<int64_t> encode(const std::string& text, bool add_bos = false) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  std::string id_to_token(int64_t id) const override;
  int64_t token_to_id(const std::string& token) const override;

 private:
  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int64_t> index_;
  int64_t byte_ids_[256];
  bool byte_fallback_, add_dummy_prefix_, remove_extra_whitespaces_;
};

class ByteLevelBpeTokenizer : public LlmTokenizer {
 public:
  // vocab.json + merges.txt. The special tokens are OPT's: BOS "</s>" (prepended), EOS "</s>",
  // PAD "<pad>", UNK "<unk>" when the vocabulary has them.
  static std::shared_ptr<ByteLevelBpeTokenizer> from_files(const std::string& vocab_json,
                                                           const std::string& merges_txt);
  std::vector<int64_t> encode(const std::string& text, bool add_bos = false) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(vocab_.size()); }
  std::string id_to_token(int64_t id) const override;
  int64_t token_to_id(const std::string& token) const override;

  // GPT-2's pre-tokenisation ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
  // \s+(?!\S)|\s+), exposed for tests.
  static std::vector<std::u32string> pretokenize(const std::u32string& text);

 private:
  std::vector<std::string> vocab_;                  // id -> token (byte-mapped characters)
  std::unordered_map<std::string, int64_t> index_;
  std::unordered_map<std::string, int64_t> ranks_;  // "left right" -> merge rank
  std::vector<int64_t> special_;                    // ids left out by decode(skip_special)
  void bpe(const std::u32string& word, std::vector<int64_t>& out) const;
};

// A WordPiece vocabulary used as an LLM's (the tiny stage-2 model on the synthetic shapes):
// ids are the vocabulary's, BOS = [CLS], EOS = [SEP], PAD = [PAD], UNK = [UNK]; decoding joins
// the words with spaces ("##" pieces to the word before).
class WordPieceLlmTokenizer : public LlmTokenizer {
 public:
  explicit WordPieceLlmTokenizer(std::shared_ptr<const WordPieceTokenizer> wordpiece);
  std::vector<int64_t> encode(const std::string& text, bool add_bos = false) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const override;
  int64_t vocab_size() const override { return wp_->size(); }
  std::string id_to_token(int64_t id) const override;
  int64_t token_to_id(const std::string& token) const override { return wp_->token_to_id(token); }

 private:
  std::shared_ptr<const WordPieceTokenizer> wp_;
};

// The tokenizer in `path`: a directory with tokenizer.model, or vocab.json + merges.txt, or
// one of those files. Errors name the path.
std::shared_ptr<LlmTokenizer> load_llm_tokenizer(const std::string& path);

// Prompts tokenised and left-padded for generation (transformers' padding_side="left"):
// ids, keep [B, L].
struct PromptBatch {
  torch::Tensor ids, keep;
};
PromptBatch encode_prompts(const LlmTokenizer& tok, const std::vector<std::string>& prompts, bool add_bos);

}  // namespace blip2
