#include "blip2/serve/openai.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>

#include "blip2/util/common.h"

namespace blip2::serve {
namespace fs = std::filesystem;

std::string error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "invalid_request_error";
    case 429:
    case 503: return "server_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

json error_body(int status, const std::string& message, const std::string& param, const std::string& code) {
  return {{"error",
           {{"message", message},
            {"type", error_type(status)},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

ApiError::ApiError(int s, const std::string& message, std::string p, std::string c)
    : std::runtime_error(message), status(s), type(error_type(s)), code(std::move(c)), param(std::move(p)) {}

json ApiError::body() const { return error_body(status, what(), param, code); }

namespace {

constexpr double kMinTemperature = 0.01;

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

ApiError bad(const std::string& param, const std::string& message) { return ApiError(400, message, param); }

double number_field(const json& body, const std::string& key, double lo, double hi, bool lo_open = false) {
  const auto& v = body.at(key);
  if (!v.is_number()) throw bad(key, "'" + key + "' must be a number");
  const double x = v.get<double>();
  if (x < lo || x > hi || (lo_open && x == lo))
    throw bad(key, "'" + key + "' must be in " + (lo_open ? "(" : "[") + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + v.dump());
  return x;
}

int64_t int_field(const json& body, const std::string& key, int64_t lo, int64_t hi) {
  const auto& v = body.at(key);
  if (!v.is_number_integer()) throw bad(key, "'" + key + "' must be an integer");
  const auto x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw bad(key, "'" + key + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + v.dump());
  return x;
}

std::string string_field(const json& body, const std::string& key) {
  const auto& v = body.at(key);
  if (!v.is_string()) throw bad(key, "'" + key + "' must be a string");
  return v.get<std::string>();
}

// The fields both text endpoints share, applied over the model's defaults.
void apply_generation_fields(const json& body, TextRequest& r, const char* max_key) {
  auto& o = r.options;
  if (body.contains("model")) r.model = string_field(body, "model");
  std::optional<int64_t> max_new;
  for (const char* k : {max_key, "max_tokens"})
    if (body.contains(k) && !body.at(k).is_null()) {
      const int64_t v = int_field(body, k, 1, 1 << 20);
      if (max_new && *max_new != v) throw bad(k, std::string("'") + k + "' differs from " + max_key);
      max_new = v;
      o.max_new_tokens = v;
      o.min_new_tokens = std::min(o.min_new_tokens, o.max_new_tokens);
    }
  if (body.contains("min_tokens")) {
    o.min_new_tokens = int_field(body, "min_tokens", 0, 1 << 20);
    if (o.min_new_tokens > o.max_new_tokens) throw bad("min_tokens", "'min_tokens' exceeds max_tokens");
  }
  const bool beams_given = body.contains("num_beams");
  if (beams_given) o.num_beams = int_field(body, "num_beams", 1, 16);
  if (body.contains("temperature")) {
    const double t = number_field(body, "temperature", 0, 100);
    if (t > 0 && t < kMinTemperature)  // the softmax of logits / t overflows
      throw bad("temperature", "'temperature' must be 0 (greedy) or at least " + std::to_string(kMinTemperature));
    o.do_sample = t > 0;
    if (t > 0) o.temperature = t;
    if (o.do_sample && !beams_given) o.num_beams = 1;  // the model's default beams yield to sampling
  }
  if (o.do_sample && o.num_beams > 1)
    throw bad("num_beams", "sampling (temperature > 0) with num_beams > 1 is not supported");
  for (const char* k : {"top_p", "top_k"})
    if (body.contains(k) && !o.do_sample)
      throw bad(k, std::string("'") + k + "' applies to sampling: give temperature > 0 with it");
  if (body.contains("top_p")) o.top_p = number_field(body, "top_p", 0, 1, true);
  if (body.contains("top_k")) o.top_k = int_field(body, "top_k", 0, 1 << 30);
  if (body.contains("repetition_penalty")) o.repetition_penalty = number_field(body, "repetition_penalty", 0, 100, true);
  if (body.contains("n")) r.n = int_field(body, "n", 1, 8);
  if (r.n > 1 && o.num_beams > 1) throw bad("n", "'n' > 1 with beam search is not supported (one beam is returned)");
  if (body.contains("seed")) {
    o.seed = static_cast<uint64_t>(int_field(body, "seed", 0, std::numeric_limits<int64_t>::max()));
    r.seeded = true;
  }
  if (body.contains("stream")) {
    if (!body.at("stream").is_boolean()) throw bad("stream", "'stream' must be true or false");
    r.stream = body.at("stream").get<bool>();
  }
  if (body.contains("stop") && !body.at("stop").is_null()) {
    const auto& s = body.at("stop");
    if (s.is_string()) {
      r.stop = {s.get<std::string>()};
    } else if (s.is_array() && s.size() <= 4) {
      for (const auto& x : s) {
        if (!x.is_string()) throw bad("stop", "'stop' must be a string or an array of up to 4 strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of up to 4 strings");
    }
    for (const auto& x : r.stop)
      if (x.empty()) throw bad("stop", "'stop' strings must not be empty");
  }
}

const std::vector<std::string> kGenerationFields = {"model", "max_tokens", "min_tokens", "temperature", "top_p",
                                                    "top_k", "n", "num_beams", "repetition_penalty", "stop",
                                                    "seed", "stream"};

// %XX escapes of a URL path decoded; nullopt for a malformed one.
std::optional<std::string> percent_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    if (i + 2 >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(s[i + 2])))
      return std::nullopt;
    out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
    i += 2;
  }
  return out;
}

}  // namespace

std::string base64_encode(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::string out;
  out.reserve((n + 2) / 3 * 4);
  for (size_t i = 0; i < n; i += 3) {
    const uint32_t v = (p[i] << 16) | (i + 1 < n ? p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += i + 1 < n ? kAlphabet[(v >> 6) & 63] : '=';
    out += i + 2 < n ? kAlphabet[v & 63] : '=';
  }
  return out;
}

std::optional<std::string> base64_decode(const std::string& s) {
  int8_t table[256];
  std::fill(std::begin(table), std::end(table), -1);
  for (int i = 0; i < 64; ++i) table[static_cast<unsigned char>(kAlphabet[i])] = static_cast<int8_t>(i);
  size_t n = s.size();
  while (n > 0 && s[n - 1] == '=' && s.size() - n < 2) --n;
  if (n % 4 == 1 || n == 0) return std::nullopt;
  std::string out;
  out.reserve(n / 4 * 3 + 2);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; ++i) {
    const int8_t v = table[static_cast<unsigned char>(s[i])];
    if (v < 0) return std::nullopt;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return out;
}

std::string image_bytes(const std::string& ref, const std::string& field, const ImagePolicy& policy) {
  if (ref.rfind("data:", 0) == 0) {
    const auto comma = ref.find(',');
    const std::string head = ref.substr(0, comma == std::string::npos ? 0 : comma);
    if (comma == std::string::npos || head.size() < 7 || head.substr(head.size() - 7) != ";base64")
      throw bad(field, field + ": a data: URL must be data:image/...;base64,<data>");
    if (head.rfind("data:image/", 0) != 0) throw bad(field, field + ": the data: URL is not an image (" + head + ")");
    auto bytes = base64_decode(ref.substr(comma + 1));
    if (!bytes) throw bad(field, field + ": the data: URL's payload is not valid base64");
    return *bytes;
  }
  if (ref.rfind("file://", 0) == 0) {
    if (policy.allow_files.empty())
      throw ApiError(403, field + ": file:// images are refused (the server was not started with --allow-files)", field);
    const auto decoded = percent_decode(ref.substr(7));
    if (!decoded) throw bad(field, field + ": the file:// URL has a bad %-escape");
    const fs::path path = *decoded;
    std::error_code ec;
    // Symlinks and .. resolved first: what is read must lie under the allowed directory.
    const auto real = fs::weakly_canonical(path, ec);
    const auto root = fs::weakly_canonical(policy.allow_files, ec);
    const auto rel = real.lexically_relative(root);
    if (!path.is_absolute() || rel.empty() || rel.native().rfind("..", 0) == 0)
      throw ApiError(403, field + ": " + path.string() + " is outside the allowed directory", field);
    if (!fs::is_regular_file(real, ec)) throw bad(field, field + ": " + path.string() + " is not a readable file");
    if (fs::file_size(real, ec) > (64u << 20)) throw bad(field, field + ": " + path.string() + " is over 64 MiB");
    std::ifstream in(real, std::ios::binary);
    if (!in) throw bad(field, field + ": cannot read " + path.string());
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  if (ref.rfind("http://", 0) == 0 || ref.rfind("https://", 0) == 0)
    throw bad(field, field + ": remote image URLs are not fetched; send the image as a data: URL or base64");
  auto bytes = base64_decode(ref);
  if (!bytes) throw bad(field, field + ": not a data: URL, base64 or a file:// URL");
  return *bytes;
}

Image decode_image_field(const std::string& ref, const std::string& field, const ImagePolicy& policy) {
  const auto bytes = image_bytes(ref, field, policy);
  try {
    return decode_image_bytes(bytes, field);
  } catch (const std::exception& e) {
    throw bad(field, first_line(e.what()));
  }
}

json parse_body(const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw ApiError(400, std::string("the body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw ApiError(400, "the body must be a JSON object");
  return j;
}

void only_fields(const json& body, const std::vector<std::string>& allowed, const std::string& where) {
  for (const auto& [k, v] : body.items())
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
      throw bad(k, where + ": the field '" + k + "' is not supported");
}

namespace {

// The fields both endpoints share checked and applied over the model's defaults; `extra` are the
// endpoint's own (checked by the caller).
TextRequest text_request(const json& body, const GenerationOptions& defaults, std::vector<std::string> extra,
                         const std::string& where, const char* max_key) {
  auto fields = kGenerationFields;
  fields.insert(fields.end(), extra.begin(), extra.end());
  only_fields(body, fields, where);
  TextRequest r;
  r.options = defaults;
  apply_generation_fields(body, r, max_key);
  return r;
}

}  // namespace

TextRequest parse_chat(const json& body, const GenerationOptions& defaults) {
  TextRequest r = text_request(body, defaults, {"messages", "max_completion_tokens"}, "chat/completions",
                               "max_completion_tokens");
  if (!body.contains("messages") || !body.at("messages").is_array() || body.at("messages").empty())
    throw bad("messages", "'messages' must be a non-empty array");
  std::vector<std::string> texts;
  const auto& msgs = body.at("messages");
  for (size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw bad(where, where + " must be an object");
    only_fields(m, {"role", "content"}, where);
    if (!m.contains("role") || !m.at("role").is_string()) throw bad(where + ".role", where + ".role must be a string");
    const auto role = m.at("role").get<std::string>();
    if (role != "user" && role != "system" && role != "assistant")
      throw bad(where + ".role", where + ".role '" + role + "' is not user, system or assistant");
    if (!m.contains("content")) throw bad(where + ".content", where + " has no content");
    const auto& c = m.at("content");
    if (c.is_string()) {
      texts.push_back(c.get<std::string>());
      continue;
    }
    if (!c.is_array()) throw bad(where + ".content", where + ".content must be a string or an array of parts");
    for (size_t j = 0; j < c.size(); ++j) {
      const auto& part = c[j];
      const std::string pw = where + ".content[" + std::to_string(j) + "]";
      if (!part.is_object() || !part.contains("type") || !part.at("type").is_string())
        throw bad(pw, pw + " must be an object with a type");
      const auto type = part.at("type").get<std::string>();
      if (type == "text") {
        only_fields(part, {"type", "text"}, pw);
        if (!part.contains("text") || !part.at("text").is_string()) throw bad(pw + ".text", pw + ".text must be a string");
        texts.push_back(part.at("text").get<std::string>());
      } else if (type == "image_url") {
        only_fields(part, {"type", "image_url"}, pw);
        const auto iu = part.value("image_url", json());
        const std::string uw = pw + ".image_url";
        if (!iu.is_object() || !iu.contains("url") || !iu.at("url").is_string())
          throw bad(uw, uw + " must be an object with a url");
        only_fields(iu, {"url", "detail"}, uw);
        if (iu.contains("detail") && iu.at("detail") != "auto")
          throw bad(uw + ".detail", uw + ".detail: only \"auto\" (one fixed resolution)");
        if (r.image) throw bad(uw, "only one image per request is supported");
        r.image = iu.at("url").get<std::string>();
        r.image_field = uw + ".url";
      } else {
        throw bad(pw + ".type", pw + ".type '" + type + "' is not text or image_url");
      }
    }
  }
  std::string prompt;
  for (const auto& t : texts) {
    if (t.empty()) continue;
    if (!prompt.empty()) prompt += ' ';
    prompt += t;
  }
  r.prompt = prompt;
  return r;
}

TextRequest parse_completion(const json& body, const GenerationOptions& defaults) {
  TextRequest r = text_request(body, defaults, {"prompt", "image"}, "completions", "max_tokens");
  if (body.contains("prompt")) {
    const auto& p = body.at("prompt");
    if (p.is_string()) r.prompt = p.get<std::string>();
    else if (p.is_array() && p.size() == 1 && p[0].is_string()) r.prompt = p[0].get<std::string>();
    else throw bad("prompt", "'prompt' must be a string (one prompt per request)");
  }
  if (body.contains("image")) {
    r.image = string_field(body, "image");
    r.image_field = "image";
  }
  return r;
}

std::string trim_text(const std::string& text) {
  const auto a = text.find_first_not_of(" \n\t"), b = text.find_last_not_of(" \n\t");
  return a == std::string::npos ? "" : text.substr(a, b - a + 1);
}

bool cut_at_stop(std::string& text, const std::vector<std::string>& stop) {
  size_t at = std::string::npos;
  for (const auto& s : stop) at = std::min(at, text.find(s));
  if (at == std::string::npos) return false;
  text.resize(at);
  return true;
}

std::string stable_prefix(const std::string& text, const std::vector<std::string>& stop) {
  size_t n = text.size();
  // An incomplete UTF-8 character at the end, or the replacement character a partial byte
  // sequence decodes to.
  for (;;) {
    if (n >= 3 && text.compare(n - 3, 3, "\xEF\xBF\xBD") == 0) {
      n -= 3;
      continue;
    }
    size_t lead = n;
    while (lead > 0 && n - lead < 4 && (static_cast<unsigned char>(text[lead - 1]) & 0xC0) == 0x80) --lead;
    if (lead > 0 && lead <= n) {
      const auto c = static_cast<unsigned char>(text[lead - 1]);
      const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      if (need > 1 && n - (lead - 1) < need) {
        n = lead - 1;
        continue;
      }
    }
    break;
  }
  // The start of a stop string.
  for (const auto& s : stop)
    for (size_t k = std::min(s.size() - 1, n); k > 0; --k)
      if (text.compare(n - k, k, s, 0, k) == 0) {
        n -= k;
        break;
      }
  while (n > 0 && (text[n - 1] == ' ' || text[n - 1] == '\n' || text[n - 1] == '\t')) --n;
  return text.substr(0, n);
}

}  // namespace blip2::serve
