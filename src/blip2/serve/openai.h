// The OpenAI-compatible wire format of `blip2 serve`, free of HTTP: request parsing (each field
// honoured or refused with a 400 naming it), images from data: URLs, bare base64 or allowed
// file:// paths, and the response and error bodies.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/models/generation.h"
#include "blip2/vision/image.h"

namespace blip2::serve {

using nlohmann::json;

// An error the client caused or must hear about: status 4xx/5xx and OpenAI's error object.
struct ApiError : std::runtime_error {
  int status;
  std::string type, code, param;
  ApiError(int status, const std::string& message, std::string param = "", std::string code = "");
  json body() const;  // {"error": {"message", "type", "param", "code"}}
};
// The OpenAI error type of a status: invalid_request_error, authentication_error, ...
std::string error_type(int status);
json error_body(int status, const std::string& message, const std::string& param = "", const std::string& code = "");

std::string base64_encode(const void* data, size_t n);
// Strict standard base64 (padding optional, whitespace refused); nullopt when it is not base64.
std::optional<std::string> base64_decode(const std::string& s);

struct ImagePolicy {
  std::string allow_files;  // "" = file:// refused (403); else a directory file:// paths must lie under
};
// The bytes of an image given as a data: URL, bare base64 or file:// URL; `field` names it in errors.
std::string image_bytes(const std::string& ref, const std::string& field, const ImagePolicy& policy);
// Decoded (the pixel limit applies before any pixel is read); a 400 naming `field` otherwise.
Image decode_image_field(const std::string& ref, const std::string& field, const ImagePolicy& policy);

// What a text request asks for, before tokenisation.
struct TextRequest {
  std::string model;               // "" = the default
  std::string prompt;              // the text the LLM continues
  std::optional<std::string> image;  // the image reference (data URL / base64 / file URL)
  std::string image_field;         // where it came from, for errors
  GenerationOptions options;       // the model's defaults with the request's fields applied
  int64_t n = 1;                   // choices
  std::vector<std::string> stop;
  bool stream = false;
  bool seeded = false;             // the request gave a seed
};
// /v1/chat/completions and /v1/completions bodies; `defaults` are the model's settings.
TextRequest parse_chat(const json& body, const GenerationOptions& defaults);
TextRequest parse_completion(const json& body, const GenerationOptions& defaults);

// The text a stream may show so far: `text` less any tail that could still change (trailing
// whitespace, an incomplete UTF-8 character, the start of a stop string).
std::string stable_prefix(const std::string& text, const std::vector<std::string>& stop);
// Cuts `text` at the first stop string; true when one was found.
bool cut_at_stop(std::string& text, const std::vector<std::string>& stop);
// Leading and trailing spaces, newlines and tabs removed (as the pipelines return captions).
std::string trim_text(const std::string& text);

// Reads a JSON body; a 400 when it is not a JSON object.
json parse_body(const std::string& body);
// Refuses fields outside `allowed` (400 naming the first).
void only_fields(const json& body, const std::vector<std::string>& allowed, const std::string& where);

}  // namespace blip2::serve
