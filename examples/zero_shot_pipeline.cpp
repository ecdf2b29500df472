// The seed's zero-shot classification example:
//
//   from mindformers import pipeline
//   classifier = pipeline("zero_shot_image_classification", model="blip2_stage1_classification",
//                         candidate_labels=["sunflower", "tree", "dog", "cat", "toy"],
//                         hypothesis_template="This is a photo of {}.")
//   classifier("sunflower.png")
//
// Usage: example_zero_shot_pipeline MODEL IMAGE... [--labels a,b,c] [--template "..{}.."]
//   MODEL: a name of the support list (weights under $BLIP2_HOME) or a model directory.
#include <iostream>

#include "blip2/api/api.h"

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL IMAGE... [--labels a,b,c] [--template T]\n";
    blip2::Blip2Model::show_support_list(std::cerr);
    return 2;
  }
  blip2::PipelineOptions options;
  options.candidate_labels = {"sunflower", "tree", "dog", "cat", "toy"};
  std::vector<blip2::PipelineInput> images;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--labels" && i + 1 < argc) {
      options.candidate_labels.clear();
      std::string list = argv[++i];
      for (size_t a = 0, b; a <= list.size(); a = b + 1) {
        b = std::min(list.find(',', a), list.size());
        if (b > a) options.candidate_labels.push_back(list.substr(a, b - a));
      }
    } else if (arg == "--template" && i + 1 < argc) {
      options.hypothesis_template = argv[++i];
    } else {
      images.push_back(arg);
    }
  }
  auto classifier = blip2::pipeline("zero_shot_image_classification", argv[1], options);
  auto results = classifier(images);
  for (size_t i = 0; i < images.size(); ++i)
    std::cout << std::get<std::string>(images[i]) << " " << results[i].dump() << "\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
