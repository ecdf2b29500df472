// The seed's Trainer evaluation example:
//
//   from mindformers import Trainer
//   trainer = Trainer(task="image_to_text_retrieval", model="blip2_stage1_vit_g",
//                     eval_dataset="./checkpoint_download/Flickr30k")
//   trainer.evaluate()
//
// Usage: example_trainer_eval TASK MODEL [CONFIG.yaml]
//   TASK: image_to_text_retrieval | zero_shot_image_classification |
//         contrastive_language_image_pretrain (losses + ITC retrieval)
//   MODEL: a name of the support list or a model directory; CONFIG: a run config whose
//   eval_dataset is used ("" or absent = the built-in synthetic held-out split).
#include <iostream>

#include "blip2/api/api.h"

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " TASK MODEL [CONFIG.yaml]\n";
    return 2;
  }
  blip2::TrainerOptions options;
  if (argc > 3) options.config = argv[3];
  options.output_dir = "./output/example_trainer_eval";
  blip2::Trainer trainer(argv[1], argv[2], options);
  std::cout << trainer.evaluate().dump(2) << "\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
