"""Writes a WordPiece vocab.txt shaped like bert-base-uncased's (30,522 tokens, [PAD] 0, [UNK] 100,
[CLS] 101, [SEP] 102, [MASK] 103), for the full-size configurations when BERT's own file is not at
hand (benchmarks with random weights: `vocab_file` must give the Q-Former's 30,522 + [DEC] ids).

    python3 tools/make_bert_vocab.py OUT.txt

The words of the synthetic shapes captions (and their prompts) are in it, so those captions
tokenise to words rather than [UNK]; the rest are placeholder tokens. Not BERT's vocabulary: text
tokenised with it means nothing to a trained model.
"""
import sys

WORDS = [",", ".", "a", "an", "the", "of", "photo", "picture", "image", "there", "is", "in", "on", "at",
         "this", "shows", "with", "side", "part", "small", "large", "big", "tiny", "red", "green", "blue",
         "yellow", "purple", "orange", "circle", "square", "triangle", "cross", "ring", "left", "right",
         "top", "bottom", "center", "middle", "shape", "##s", "and", "background", "dark", "question",
         "answer", ":", "what", "?"]


def main(out):
    vocab = ["[PAD]"] + ["[unused%d]" % i for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += WORDS
    i = 99
    while len(vocab) < 30522:
        vocab.append("[unused%d]" % i)
        i += 1
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    print("wrote", out, len(vocab), "tokens")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_bert_vocab.py OUT.txt")
    main(sys.argv[1])
