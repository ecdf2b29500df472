// The blip2 command line: a thin layer over the library.
//   blip2 run --config FILE --run_mode train|eval|predict [...]   (as run_mindformer.py)
//   blip2 list-models                                              (the support list)
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <iostream>

#include "blip2/api/api.h"
#include "blip2/api/runner.h"
#include "blip2/config/config.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/pth.h"
#include "blip2/models/blip2_llm.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/serve/server.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/stage1.h"
#include "blip2/text/llm_tokenizer.h"
#include "blip2/text/text.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace {

// One line on stderr and exit 1. In a multi-process run the line names the rank, and the process
// ends at once: its closed connections stop the other ranks' collectives instead of leaving them
// to wait for their timeout.
void fail(const std::string& message) {
  const bool ranked = blip2::dist::initialized();
  const std::string prefix = "rank " + std::to_string(blip2::dist::rank()) + ": ";
  std::cerr << "error: " << (ranked && message.rfind("rank ", 0) != 0 ? prefix : "") << message << std::endl;
  if (ranked) std::_Exit(1);
}

using blip2::first_line;

int list_models() {
  std::cout << "support list of Blip2Qformer is:\n";
  for (const auto& p : blip2::presets()) {
    const auto& c = p.config;
    std::cout << "  " << p.name << "  [" << p.task << "]\n    " << p.description << "\n    vision "
              << c.vision_config.image_size << "px patch " << c.vision_config.patch_size
              << " width " << c.vision_config.hidden_size << " depth "
              << c.vision_config.num_hidden_layers << "; qformer " << c.qformer_config.num_hidden_layers
              << " layers width " << c.qformer_config.hidden_size << ", "
              << c.qformer_config.query_length << " queries\n";
  }
  return 0;
}

int tokenize_texts(const std::string& vocab, const std::vector<std::string>& texts,
                   int64_t max_length, const std::string& padding, bool lower) {
  auto tok = blip2::WordPieceTokenizer::from_file(vocab, lower);
  auto enc = tok.encode_batch(texts, max_length, padding == "none" ? "longest" : padding);
  for (int64_t i = 0; i < enc.ids.size(0); ++i) {
    const int64_t n = padding == "none" ? enc.keep[i].sum().item<int64_t>() : enc.ids.size(1);
    std::vector<int64_t> ids(enc.ids[i].data_ptr<int64_t>(), enc.ids[i].data_ptr<int64_t>() + n);
    std::cout << nlohmann::json(ids).dump() << "\n";
  }
  return 0;
}

// An LLM tokenizer (tokenizer.model, or vocab.json + merges.txt): ids without special tokens
// (BOS first with add_bos), and the text they decode to.
int tokenize_llm(const std::string& path, const std::vector<std::string>& texts, bool add_bos) {
  auto tok = blip2::load_llm_tokenizer(path);
  for (const auto& t : texts) {
    auto ids = tok->encode(t, add_bos);
    std::cout << nlohmann::json(ids).dump() << "\n";
  }
  return 0;
}

int inspect_checkpoint(const std::string& path, bool raw) {
  namespace fs = std::filesystem;
  blip2::TensorMap t;
  const std::string ext = fs::path(path).extension().string();
  if (raw && (ext == ".pth" || ext == ".bin" || ext == ".pt")) t = blip2::load_pth(path);
  else if (raw && ext == ".safetensors") t = blip2::load_safetensors(path);
  else if (raw && fs::is_directory(path)) t = blip2::load_safetensors_dir(path);
  else t = blip2::load_checkpoint_tensors(path);
  int64_t total = 0;
  for (const auto& [name, x] : t) {
    std::cout << name << "  " << c10::toString(x.scalar_type()) << "  [";
    for (int64_t d = 0; d < x.dim(); ++d) std::cout << (d ? ", " : "") << x.size(d);
    std::cout << "]\n";
    total += x.numel();
  }
  std::cout << t.size() << " tensors, " << total << " elements\n";
  return 0;
}

using blip2::model_config_of;

// The model a config describes, on the meta device: names and shapes, no memory.
std::shared_ptr<torch::nn::Module> meta_model(const blip2::Blip2Config& cfg) {
  blip2::InitOptions meta{torch::TensorOptions().dtype(torch::kFloat32).device(torch::kMeta), 0.02};
  if (cfg.text_config) return blip2::Blip2Llm(cfg, meta).ptr();
  return blip2::Blip2Qformer(cfg, meta).ptr();
}

// blip2 export --to hf: every tensor transformers' model has must be in the checkpoint (it would
// initialise a missing one at random); the stage-1 LM head and temp, which it has no place for,
// are dropped.
int export_checkpoint(const std::string& in, const std::string& out) {
  const auto cfg = model_config_of(in);
  if (cfg.weights != "float")
    throw blip2::Error(in + ": its weights are " + cfg.weights + " (blip2 quantize wrote them); transformers' "
                       "BLIP-2 holds float weights: export the float directory it was quantised from");
  const auto tensors = blip2::load_checkpoint_tensors(blip2::locate_weights(in));
  std::vector<std::string> missing;
  for (const auto& p : meta_model(cfg)->named_parameters())
    if (!tensors.count(p.key()) && p.key().rfind("cls.", 0) != 0 && p.key() != "temp") missing.push_back(p.key());
  if (!missing.empty())
    throw blip2::Error(in + ": " + blip2::name_list(missing) + " are not in the checkpoint, and transformers would "
                       "initialise them at random (merge them in first: blip2 convert CHECKPOINT VIT LLM --out DIR)");
  blip2::export_hf_directory(cfg, tensors, out);
  std::cout << "wrote a Hugging Face " << (cfg.text_config ? "Blip2ForConditionalGeneration" : "Blip2ForImageTextRetrieval")
            << " directory to " << out << "\n";
  return 0;
}

int convert_checkpoint(const std::vector<std::string>& inputs, const std::string& out,
                       const std::string& model_name, bool model_given) {
  namespace fs = std::filesystem;
  // The architecture: --model's, and each input's own config (a Hugging Face or blip2cpp
  // directory) where it has one; with --model given, the two must agree.
  blip2::RunConfig run;
  run.model.model_config = model_config_of(model_name);
  if (model_given)
    for (const auto& [path, value] : blip2::flatten(run.model.model_config)) run.given[path] = "--model " + model_name;
  blip2::TensorMap merged;
  std::vector<blip2::CheckpointArchitecture> llms;  // LLM directories: after the whole model's
  for (const auto& in : inputs) {
    if (auto a = blip2::checkpoint_architecture(in)) {
      if (!a->parts.vision) {
        llms.push_back(*a);
      } else {
        // A whole stage-2 model (a Hugging Face Blip2ForConditionalGeneration) brings its LLM.
        if (!model_given && a->config.text_config && !run.model.model_config.text_config)
          run.model.model_config.text_config = a->config.text_config;
        blip2::adopt_architecture(run, a->config, a->source, a->parts);
      }
    }
    for (auto& [k, v] : blip2::load_checkpoint_tensors(in)) merged[k] = v;
  }
  for (const auto& a : llms) {
    if (!run.model.model_config.text_config)
      throw blip2::Error(a.source + ": an LLM on its own, but " +
                         (model_given ? "--model " + model_name : std::string("no input")) +
                         " describes a stage-2 model to put it in (give one, e.g. --model blip2_opt_2.7b)");
    blip2::adopt_architecture(run, a.config, a.source, a.parts);
  }
  const blip2::Blip2Config cfg = run.model.model_config;
  // Check names and shapes against the architecture without allocating it (meta device).
  auto model = meta_model(cfg);
  const auto extra = blip2::unexpected_tensors(*model, merged, blip2::join(inputs, ", "));
  if (!extra.empty())
    throw blip2::Error(out + ": " + blip2::name_list(extra) + " of the inputs have no place in the model (" +
                       (cfg.text_config ? "a stage-2" : "a stage-1") + " BLIP-2): another --model, or inputs of "
                       "another model?");
  auto params = model->named_parameters();
  std::vector<std::string> missing;
  for (const auto& p : params) {
    auto it = merged.find(p.key());
    if (it == merged.end()) missing.push_back(p.key());
    else if (it->second.sizes() != p.value().sizes())
      throw blip2::Error(out + ": '" + p.key() + "' has shape " + c10::str(it->second.sizes()) +
                         " but " + model_name + " expects " + c10::str(p.value().sizes()));
  }
  fs::create_directories(out);
  blip2::save_safetensors((fs::path(out) / "model.safetensors").string(), merged,
                          {{"format", "blip2cpp"}, {"arch", cfg.text_config ? "Blip2Llm" : "Blip2Qformer"}});
  blip2::atomic_write(fs::path(out) / "config.yaml", blip2::to_yaml(cfg));
  std::cout << "wrote " << merged.size() << " tensors to " << out << "; " << missing.size()
            << " of the model's tensors absent";
  if (!missing.empty()) std::cout << " (" << blip2::explain_missing(missing) << ")";
  std::cout << "\n";
  return 0;
}

// blip2 quantize IN --out DIR --weights int8: IN's weights with the ViT's and the LLM's linear
// layers quantised (weight-only int8, per output channel, fp32 scales), as a blip2cpp model
// directory whose config.yaml says weights: int8. Tensors are read memory-mapped and quantised one
// at a time.
int quantize_checkpoint(const std::string& in, const std::string& out, const std::string& weights) {
  namespace fs = std::filesystem;
  blip2::check(weights == "int8", "quantize: --weights must be int8, got '" + weights + "'");
  auto cfg = model_config_of(in);
  if (cfg.weights != "float")
    throw blip2::Error(in + ": its weights are " + cfg.weights + " already (blip2 quantize wrote them)");
  cfg.weights = weights;
  cfg.checkpoint_name_or_path.clear();
  auto model = meta_model(cfg);
  const int64_t layers = blip2::linears_to_int8(*model, {"vision_model.", "language_model."}, false);
  auto tensors = blip2::load_checkpoint_tensors(blip2::locate_weights(in));
  const auto extra = blip2::unexpected_tensors(*model, tensors, in);
  if (!extra.empty())
    throw blip2::Error(in + ": " + blip2::name_list(extra) + " have no place in the model its config describes");
  int64_t done = 0, bytes_in = 0, bytes_out = 0;
  blip2::TensorMap result;
  for (const auto& [name, t] : tensors) {
    bytes_in += t.numel() * t.element_size();
    auto params = model->named_parameters();
    if (params.contains(name) && params[name].scalar_type() == torch::kInt8 && t.is_floating_point()) {
      auto [q, scale] = blip2::quantize_int8(t);
      result[name] = q;
      result[name + "_scale"] = scale;
      ++done;
    } else {
      result[name] = t;
    }
  }
  for (const auto& [name, t] : result) bytes_out += t.numel() * t.element_size();
  fs::create_directories(out);
  blip2::save_safetensors((fs::path(out) / "model.safetensors").string(), result,
                          {{"format", "blip2cpp"}, {"arch", cfg.text_config ? "Blip2Llm" : "Blip2Qformer"},
                           {"weights", weights}});
  blip2::atomic_write(fs::path(out) / "config.yaml", blip2::to_yaml(cfg));
  const double gib = 1024.0 * 1024.0 * 1024.0;
  std::cout << "wrote " << out << ": " << done << " of the model's " << layers << " ViT/LLM linear layers quantised to "
            << weights << "; " << blip2::format_float(bytes_in / gib, 3) << " GiB -> "
            << blip2::format_float(bytes_out / gib, 3) << " GiB\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"blip2cpp: BLIP-2 (EVA ViT + Q-Former + LLM) on LibTorch"};
  app.require_subcommand(1);

  auto* run = app.add_subcommand("run", "train, evaluate or predict with a config (run_mindformer.py)");
  std::string config;
  blip2::RunOverrides o;
  std::string run_mode, device, train_dir, eval_dir, predict_data, ckpt, out_dir;
  int64_t seed = 0;
  bool resume = false;
  run->add_option("--config", config, "YAML config (default: the embedded tiny config)");
  run->add_option("--run_mode", run_mode, "train | eval | predict")
      ->check(CLI::IsMember({"train", "eval", "predict"}));
  run->add_option("--train_dataset_dir", train_dir, "root of the training data");
  run->add_option("--eval_dataset_dir", eval_dir, "root of the evaluation data");
  run->add_option("--predict_data", predict_data, "image, images (comma-separated) or directory to predict on");
  std::vector<std::string> predict_text;
  run->add_option("--predict_text", predict_text,
                  "feature extraction: a text to embed (repeat for several); image_to_text_generation: "
                  "the prompt (filled into hypothesis_template)");
  run->add_option("--device_target", device, "cpu | cuda | cuda:N")
      ->check(CLI::Validator(
          [](std::string& v) { return blip2::is_device_target(v) ? std::string() : "'" + v + "' is not cpu|cuda|cuda:N"; },
          "cpu|cuda|cuda:N"));
  run->add_option("--load_checkpoint", ckpt, "checkpoint directory or .safetensors file");
  run->add_flag("--resume_training", resume, "continue training from --load_checkpoint");
  bool allow_partial = false;
  run->add_flag("--allow_partial_load", allow_partial,
                "load weights that leave some of the model's tensors random (the load report names them)");
  std::string weights;
  run->add_option("--weights", weights, "int8: quantise the ViT's and the LLM's linear layers as they load "
                  "(model_config.weights; weight-only int8, evaluation and prediction)")
      ->check(CLI::IsMember({"float", "int8"}));
  run->add_option("--output_dir", out_dir, "where results, logs and checkpoints go");
  run->add_option("--seed", seed, "random seed");

  auto* list = app.add_subcommand("list-models", "print the support list of named models");

  auto* tokenize = app.add_subcommand("tokenize", "token ids of texts, one JSON line each (BERT WordPiece, "
                                      "or an LLM's SentencePiece / byte-level BPE)");
  std::string vocab, padding = "none", llm_tokenizer;
  int64_t max_length = 0;
  bool cased = false, add_bos = false;
  std::vector<std::string> texts;
  auto* vocab_opt = tokenize->add_option("--vocab", vocab, "BERT vocab.txt (one token per line)");
  auto* llm_opt = tokenize->add_option("--tokenizer", llm_tokenizer,
                                       "an LLM tokenizer: tokenizer.model (Llama, Baichuan) or a directory "
                                       "with it or with vocab.json + merges.txt (OPT)");
  vocab_opt->excludes(llm_opt);
  tokenize->add_flag("--add_bos", add_bos, "LLM tokenizers: BOS first");
  tokenize->add_option("--max_length", max_length, "truncate (and pad) to this many ids");
  tokenize->add_option("--padding", padding, "max_length | longest | none")
      ->check(CLI::IsMember({"max_length", "longest", "none"}));
  tokenize->add_flag("--cased", cased, "keep case and accents (do_lower_case false)");
  tokenize->add_option("texts", texts, "texts to tokenize")->required();

  auto* inspect = app.add_subcommand("inspect", "list the tensors of a checkpoint (any supported format)");
  std::string inspect_path;
  bool raw_names = false;
  inspect->add_option("path", inspect_path, ".safetensors, .pth/.bin, or a model directory")->required();
  inspect->add_flag("--raw", raw_names, "the file's own names (default: canonical names)");

  auto* convert = app.add_subcommand("convert", "write a LAVIS or Hugging Face checkpoint as a blip2cpp model directory");
  std::vector<std::string> convert_inputs;
  std::string convert_out, convert_model = "blip2_stage1_vit_g";
  convert->add_option("inputs", convert_inputs, "checkpoint files/directories, merged in order")->required();
  convert->add_option("--out", convert_out, "output directory")->required();
  convert->add_option("--model", convert_model,
                      "architecture the weights fill: a preset name, a Hugging Face model directory, "
                      "or a config YAML (for LAVIS input; a Hugging Face input brings its own)");

  auto* quantize = app.add_subcommand("quantize", "write a model directory with int8 ViT/LLM linear weights");
  std::string quantize_in, quantize_out, quantize_weights;
  quantize->add_option("input", quantize_in, "a blip2cpp model directory, a Hugging Face directory or a named model's weights")
      ->required();
  quantize->add_option("--out", quantize_out, "output directory")->required();
  quantize->add_option("--weights", quantize_weights, "int8 (weight-only, per output channel)")->required();
  auto* exporter = app.add_subcommand("export", "write a blip2cpp model directory in another format");
  std::string export_to = "hf", export_in, export_out;
  exporter->add_option("--to", export_to, "target format")->check(CLI::IsMember({"hf"}));
  exporter->add_option("input", export_in, "blip2cpp model or checkpoint directory")->required();
  exporter->add_option("--out", export_out, "output directory")->required();

  auto* server = app.add_subcommand("serve", "serve the models over HTTP: an OpenAI-compatible API "
                                     "(chat/completions, completions, embeddings), classify, match and a web page");
  blip2::serve::ServeOptions so;
  server->add_option("--model", so.model, "stage-2 model for the text endpoints: a preset name or a directory");
  server->add_option("--stage1", so.stage1, "stage-1 model for embeddings, classify and match: a preset name or a directory");
  server->add_option("--host", so.host, "address to listen on (default 127.0.0.1: this machine only)");
  server->add_option("--port", so.port, "port (0 = any free port; the 'listening on' line says which)");
  server->add_option("--api-key", so.api_key, "require 'Authorization: Bearer KEY' on /v1/* and /metrics");
  server->add_option("--max-batch", so.max_batch, "rows decoded together (1 = no batching across requests)")
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  server->add_option("--max-queue", so.max_queue, "requests that may wait before 503 + Retry-After")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  server->add_option("--max-body", so.max_body, "largest request body in bytes (413 beyond)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  server->add_option("--max-image-pixels", so.max_image_pixels,
                     "largest image (width x height) accepted, checked before decoding")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  server->add_option("--allow-files", so.allow_files, "directory that file:// image URLs may read from");
  server->add_option("--device_target", so.device, "cpu | cuda | cuda:N")
      ->check(CLI::Validator(
          [](std::string& v) { return blip2::is_device_target(v) ? std::string() : "'" + v + "' is not cpu|cuda|cuda:N"; },
          "cpu|cuda|cuda:N"));
  server->add_option("--weights", so.weights, "int8: quantise the ViT's and the LLM's linear layers as they load")
      ->check(CLI::IsMember({"float", "int8"}));
  server->add_option("--tokenizer", so.tokenizer, "the LLM tokenizer, when it is not beside the model");
  server->add_option("--threads", so.threads, "HTTP worker threads (default max-batch + max-queue + 8)")
      ->check(CLI::Range(0, 1 << 16));
  server->add_option("--drain-timeout", so.drain_timeout_s, "seconds in-flight requests may take to finish on SIGTERM")
      ->check(CLI::Range(0.0, 86400.0));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (*list) return list_models();
    if (*tokenize) {
      if (!llm_tokenizer.empty()) return tokenize_llm(llm_tokenizer, texts, add_bos);
      blip2::check(!vocab.empty(), "tokenize: give --vocab (BERT) or --tokenizer (an LLM's)");
      return tokenize_texts(vocab, texts, max_length, padding, !cased);
    }
    if (*inspect) return inspect_checkpoint(inspect_path, raw_names);
    if (*convert) return convert_checkpoint(convert_inputs, convert_out, convert_model, convert->count("--model") > 0);
    if (*exporter) return export_checkpoint(export_in, export_out);
    if (*quantize) return quantize_checkpoint(quantize_in, quantize_out, quantize_weights);
    if (*server) return blip2::serve::serve(so);
    if (!run_mode.empty()) o.run_mode = run_mode;
    if (!device.empty()) o.device_target = device;
    if (!train_dir.empty()) o.train_dataset_dir = train_dir;
    if (!eval_dir.empty()) o.eval_dataset_dir = eval_dir;
    if (!predict_data.empty()) o.predict_data = predict_data;
    o.predict_text = predict_text;
    if (!ckpt.empty()) o.load_checkpoint = ckpt;
    if (!out_dir.empty()) o.output_dir = out_dir;
    if (run->count("--seed")) o.seed = seed;
    if (resume) o.resume_training = true;
    if (allow_partial) o.allow_partial_load = true;
    if (!weights.empty()) o.weights = weights;
    const int rc = blip2::run(config, o);
    blip2::dist::shutdown();  // waits for every rank to finish
    return rc;
  } catch (const blip2::Error& e) {
    fail(first_line(e.what()));
  } catch (const c10::Error& e) {
    fail(first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    fail(first_line(e.what()));
  }
  return 1;
}
