// The page `blip2 serve` answers at `/`: one self-contained HTML document (inline CSS and plain
// JavaScript, nothing fetched from elsewhere) that captions an image over the streaming chat
// endpoint, classifies it against typed labels and scores typed texts against it.
//
// Element ids the browser test relies on: #file, #preview, #prompt, #max-tokens, #caption-btn,
// #answer, #labels, #classify-btn, #bars (.bar[data-label][data-score]), #texts, #match-btn,
// #matches (tr.match[data-text][data-itm][data-itc]), #api-key, #status. Each output carries
// data-state: #answer idle|streaming|done|error, #bars and #matches idle|loading|done|error,
// #status loading|ok|error.
#pragma once

#include <string>

namespace blip2::serve {

const std::string& index_html();

}  // namespace blip2::serve
