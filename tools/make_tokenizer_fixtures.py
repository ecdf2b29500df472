"""Writes tests/fixtures/llm_tokenizers/: the two LLM tokenizer formats blip2cpp reads, each
trained here on the text fixtures' corpus, and the ids Hugging Face's tokenizers give for every
line of that corpus (plus the seed's Chinese prompt):

  spm/tokenizer.model   a SentencePiece BPE model laid out as Llama's and Baichuan's are
                        (byte fallback, digits split, identity normalisation, dummy prefix);
                        reference: transformers' LlamaTokenizer, and sentencepiece itself
  bpe/vocab.json, bpe/merges.txt
                        a byte-level BPE as OPT's (GPT-2's pre-tokenizer, </s> prepended as BOS);
                        reference: transformers' GPT2Tokenizer configured as OPT's
  expected.jsonl        line 0: the special ids; then per text {"spm": ids, "bpe": ids,
                        "spm_decoded": text, "bpe_decoded": text} (ids without BOS; decoded with
                        skip_special_tokens)

    .venv/bin/pip install transformers tokenizers sentencepiece protobuf
    .venv/bin/python tools/make_tokenizer_fixtures.py
"""
import json
import os

import sentencepiece as spm
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Tokenizer, LlamaTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "tests", "fixtures", "llm_tokenizers")
SEED_PROMPT = "###问题:\n详细描述图片内容。\n\n###答案:"


def main():
    with open(os.path.join(HERE, "..", "tests", "fixtures", "text", "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    texts = corpus[:400] + [SEED_PROMPT, "a photo of", "Question: what is this? Short answer:",
                            "  two  spaces", "tab\there", "end with newline\n", "1234567 89"]
    train = [t for t in corpus[400:] if t.strip()]
    os.makedirs(os.path.join(ROOT, "spm"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "bpe"), exist_ok=True)

    # Llama's trainer spec, scaled down: BPE, byte fallback, digits split, no normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=os.path.join(ROOT, "spm", "tokenizer"),
        model_type="bpe", vocab_size=800, byte_fallback=True, split_digits=True,
        character_coverage=0.995, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.remove(os.path.join(ROOT, "spm", "tokenizer.vocab"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(ROOT, "spm", "tokenizer.model"))
    llama = LlamaTokenizer.from_pretrained(os.path.join(ROOT, "spm"), legacy=True)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train, vocab_size=700, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(os.path.join(ROOT, "bpe"))
    opt = GPT2Tokenizer(vocab=os.path.join(ROOT, "bpe", "vocab.json"),
                        merges=os.path.join(ROOT, "bpe", "merges.txt"),
                        bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>")

    mismatches = 0
    with open(os.path.join(ROOT, "expected.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"spm": {"bos": llama.bos_token_id, "eos": llama.eos_token_id,
                                    "unk": llama.unk_token_id, "vocab_size": sp.get_piece_size()},
                            "bpe": {"bos": opt.convert_tokens_to_ids("</s>"), "pad": opt.pad_token_id,
                                    "vocab_size": len(opt)}}) + "\n")
        for t in texts:
            s_ids = llama(t, add_special_tokens=False)["input_ids"]
            if s_ids != sp.encode(t):
                mismatches += 1
            b_ids = opt(t, add_special_tokens=False)["input_ids"]
            f.write(json.dumps({"text": t, "spm": s_ids, "bpe": b_ids,
                                "spm_decoded": llama.decode(s_ids, skip_special_tokens=True),
                                "bpe_decoded": opt.decode(b_ids, skip_special_tokens=True)},
                               ensure_ascii=False) + "\n")
    print("llm tokenizer fixtures written to", os.path.normpath(ROOT),
          "(%d texts; transformers and sentencepiece differ on %d)" % (len(texts), mismatches))


if __name__ == "__main__":
    main()
