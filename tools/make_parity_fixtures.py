"""Writes tests/fixtures/parity/: a tiny random Hugging Face Blip2ForImageTextRetrieval saved as
Hugging Face saves it (config.json + model.safetensors), inputs, and what transformers computes
from them: the ViT's last hidden state (after post_layernorm = ln_vision), the Q-Former's query
output, the normalised image and text features, the ITC similarity (max over queries) and the
ITM logits.

    .venv/bin/pip install transformers safetensors && .venv/bin/python tools/make_parity_fixtures.py
"""
import os

import torch
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForImageTextRetrieval

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity")


def main():
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=7,
                           layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
        qformer_config=dict(vocab_size=101, hidden_size=48, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=80,
                            max_position_embeddings=40, cross_attention_frequency=2,
                            encoder_hidden_size=32, layer_norm_eps=1e-12,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            use_qformer_text_input=True),
        num_query_tokens=6, image_text_hidden_size=16)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # move every tensor off its init value so each one is checked
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("self_attn.qkv.bias"):  # keys carry no bias (EVA convention)
                d = p.shape[0] // 3
                p[d:2 * d] = 0
    out_dir = os.path.join(ROOT, "hf_itm")
    model.save_pretrained(out_dir, safe_serialization=True)

    pixel_values = torch.randn(3, 3, 28, 28)
    input_ids = torch.tensor([[2, 15, 16, 17, 18, 3, 0], [2, 40, 41, 3, 0, 0, 0], [2, 99, 5, 6, 7, 8, 3]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        query = model.qformer(query_embeds=model.query_tokens.expand(3, -1, -1),
                              encoder_hidden_states=vision).last_hidden_state
        itc = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=False)
        itm = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=True)
    save_file({
        "pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
        "vision_last_hidden_state": vision.contiguous(), "query_output": query.contiguous(),
        "image_feat": itc.image_embeds.contiguous(), "text_feat": itc.text_embeds.contiguous(),
        "itc_logits_per_image": itc.logits_per_image.contiguous(),
        "itm_logits": itm.logits_per_image.contiguous(),
    }, os.path.join(ROOT, "hf_itm_io.safetensors"))
    print("parity fixtures written to", os.path.normpath(ROOT))


if __name__ == "__main__":
    main()
