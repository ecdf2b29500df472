"""Writes tests/fixtures/legacy_configs/: config.json files as transformers 4.31 (the release the
Salesforce BLIP-2 hub configs were written with) serialises them, nested sections in full with
every generic PretrainedConfig key. The C++ tests check that blip2cpp's config.json reader takes
them as they are.

    python3 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.31.0 && \\
        /tmp/tf4/bin/python tools/make_legacy_configs.py
"""
import os

from transformers import Blip2Config, LlamaConfig, OPTConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "legacy_configs")


def main():
    os.makedirs(ROOT, exist_ok=True)
    opt = Blip2Config(text_config=dict(model_type="opt", eos_token_id=50118), num_query_tokens=32)
    opt.architectures = ["Blip2ForConditionalGeneration"]
    opt.text_config.architectures = ["OPTForCausalLM"]
    configs = {
        "blip2_opt.json": opt,
        "llama.json": LlamaConfig(architectures=["LlamaForCausalLM"], rope_scaling={"type": "linear", "factor": 2.0}),
        "opt.json": OPTConfig(architectures=["OPTForCausalLM"], prefix="</s>"),
    }
    for name, config in configs.items():
        with open(os.path.join(ROOT, name), "w") as f:
            f.write(config.to_json_string(use_diff=False))
        print("wrote", name)


if __name__ == "__main__":
    main()
