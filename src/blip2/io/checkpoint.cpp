#include "blip2/io/checkpoint.h"

#include <cstdlib>

#include "blip2/io/hf.h"
#include "blip2/io/pth.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

std::string blip2_home() {
  if (const char* h = std::getenv("BLIP2_HOME"); h && *h) return h;
  const char* home = std::getenv("HOME");
  return (fs::path(home ? home : ".") / ".cache" / "blip2cpp").string();
}

std::string resolve_weights(const std::string& name_or_path) {
  std::error_code ec;
  if (fs::exists(name_or_path, ec)) return name_or_path;
  const bool looks_like_name = name_or_path.find('/') == std::string::npos &&
                               fs::path(name_or_path).extension().empty();
  if (!looks_like_name) throw Error(name_or_path + ": checkpoint not found");
  const fs::path dir = fs::path(blip2_home()) / name_or_path;
  if (fs::is_directory(dir, ec)) return dir.string();
  std::string files;
  if (name_or_path == "vit_g_p16" || name_or_path == "eva_vit_g")
    files = "LAVIS' eva_vit_g.pth";
  else if (name_or_path.rfind("blip2_stage1", 0) == 0)
    files = "LAVIS' blip2_pretrained.pth and eva_vit_g.pth (run `blip2 convert blip2_pretrained.pth "
            "eva_vit_g.pth --out " + dir.string() + "`), or a Hugging Face Salesforce/blip2-itm-vit-g "
            "directory";
  else if (name_or_path == "llama_7b" || name_or_path == "baichuan_7b")
    files = "the LLM as a Hugging Face directory (config.json, safetensors or pytorch_model*.bin "
            "shards, tokenizer.model)";
  else if (name_or_path.rfind("blip2_opt_", 0) == 0)
    files = "a Hugging Face Salesforce/blip2-opt-* directory, or run `blip2 convert "
            "blip2_pretrained_opt*.pth eva_vit_g.pth OPT_DIR --model " + name_or_path + " --out " +
            dir.string() + "` on LAVIS' files and the facebook/opt-* directory";
  else if (name_or_path.find("stage2") != std::string::npos)
    files = "the stage-2 weights (a stage-2 training output, or `blip2 convert` of LAVIS' stage-2 "
            ".pth); the LLM goes under its own name (llama_7b, baichuan_7b) and the ViT under eva_vit_g";
  else
    files = "the model's weights (a Hugging Face directory, a .pth, or `blip2 convert` output)";
  throw Error(name_or_path + ": no local weights at " + dir.string() + "; place " + files +
              " there (set BLIP2_HOME to use another root; nothing is downloaded)");
}

TensorMap load_checkpoint_tensors(const std::string& name_or_path) {
  std::error_code ec;
  const std::string path = resolve_weights(name_or_path);
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (is_hf_llm_directory(path)) return load_hf_llm(path).tensors;  // an LLM alone
    if (is_hf_directory(path) && !fs::exists(p / "trainer_state.pt"))
      return canonical_from_hf(load_safetensors_dir(path), path);
    if (fs::exists(p / "model.safetensors")) return load_safetensors((p / "model.safetensors").string());
    for (const char* bin : {"pytorch_model.bin", "model.pth"})
      if (fs::exists(p / bin)) return load_checkpoint_tensors((p / bin).string());
    throw Error(path + ": no weights here (expected model.safetensors, an index of shards, or a .pth)");
  }
  check(fs::is_regular_file(p, ec), path + ": checkpoint not found");
  const std::string ext = p.extension().string();
  if (ext == ".safetensors") return canonical_from_hf(load_safetensors(path), path);
  if (ext == ".pth" || ext == ".bin" || ext == ".pt")
    return canonical_from_hf(canonical_from_lavis(load_pth(path)), path);
  throw Error(path + ": unknown checkpoint format (expected .safetensors, .pth, .bin or a directory)");
}

LoadReport load_weights_into(torch::nn::Module& model, TensorMap tensors, const std::string& source) {
  const std::string pos = "vision_model.embeddings.position_embedding";
  auto params = model.named_parameters();
  if (tensors.count(pos) && params.contains(pos) &&
      tensors.at(pos).size(1) != params[pos].size(1)) {
    log_info(source + ": interpolating the position embedding from " +
             std::to_string(tensors.at(pos).size(1)) + " to " + std::to_string(params[pos].size(1)) +
             " tokens (bicubic)");
    tensors[pos] = interpolate_pos_embed(tensors.at(pos), params[pos].size(1));
  }
  return load_into(model, tensors, source);
}

std::string explain_missing(const std::vector<std::string>& missing) {
  int vit = 0, lm = 0, temp = 0, llm = 0, other = 0;
  for (const auto& k : missing) {
    if (k.rfind("vision_model.", 0) == 0 && k.rfind("vision_model.post_layernorm", 0) != 0) ++vit;
    else if (k.rfind("language_model.", 0) == 0) ++llm;
    else if (k.rfind("cls.", 0) == 0) ++lm;
    else if (k == "temp") ++temp;
    else ++other;
  }
  std::string s;
  if (vit) s += "no ViT weights (LAVIS stage-1/stage-2 files hold only trained weights: give the ViT as vision_config.checkpoint_name_or_path); ";
  if (lm) s += "no stage-1 LM head (retrieval checkpoints have none); ";
  if (llm) s += "no LLM weights (stage-2 files hold none: give the LLM's Hugging Face directory as text_config.checkpoint_name_or_path); ";
  if (temp) s += "no temperature (Hugging Face drops it; 0.07 is used); ";
  if (other) s += std::to_string(other) + " other tensors missing; ";
  return s;
}

}  // namespace blip2
