// The seed's stage-1 model example:
//
//   from mindformers import Blip2Qformer
//   model = Blip2Qformer.from_pretrained("blip2_stage1_vit_g")
//   loss = model(image, text_input_ids)
//
// Usage: example_stage1_loss MODEL IMAGE CAPTION [IMAGE CAPTION]...
// Prints the stage-1 losses of the pairs (ITC, ITM with hard negatives, LM) and their features.
#include <iostream>

#include "blip2/api/api.h"

int main(int argc, char** argv) try {
  if (argc < 4 || (argc - 2) % 2 != 0) {
    std::cerr << "usage: " << argv[0] << " MODEL IMAGE CAPTION [IMAGE CAPTION]...\n";
    return 2;
  }
  auto model = blip2::Blip2Model::from_pretrained(argv[1]);
  std::vector<std::string> images, captions;
  for (int i = 2; i + 1 < argc; i += 2) {
    images.push_back(argv[i]);
    captions.push_back(argv[i + 1]);
  }
  auto pixels = model.preprocess(images);
  torch::NoGradGuard no_grad;
  auto out = model.losses(pixels, captions);
  std::cout << "loss " << out.loss.item<double>() << " (itc " << out.loss_itc.item<double>() << ", itm "
            << out.loss_itm.item<double>() << ", lm " << out.loss_lm.item<double>() << ")\n";
  auto features = model.extract_features(pixels, captions, "multimodal");
  std::cout << "features " << blip2::feature_shapes(features).dump() << "\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
