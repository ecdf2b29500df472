# The two commands a newcomer runs (see README.md):
#   make demo   set up, build, and train + evaluate the tiny preset on the built-in synthetic data:
#               stage 1 (Q-Former), then stage 2 (tiny LLM pretrained, frozen; captions held-out images)
#   make test   set up, build, and run the whole test suite
BUILD_DIR ?= build
JOBS ?= $(shell nproc)

.PHONY: all setup build demo test clean

all: build

# scripts/setup.sh prints the Python whose torch the build uses on its last line.
build:
	@PY=$$(bash scripts/setup.sh | tail -n 1) && \
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DBLIP2_PYTHON="$$PY" && \
	cmake --build $(BUILD_DIR) -j $(JOBS)

setup: build

demo: build
	./$(BUILD_DIR)/blip2 run --run_mode train --output_dir output/demo
	./$(BUILD_DIR)/blip2 run --config configs/blip2/tiny_pretrain_stage_2.yaml --output_dir output/demo_stage2

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure

clean:
	rm -rf $(BUILD_DIR) output
