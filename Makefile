# mosft build. `make` builds build/mosft (with CUDA when nvcc is found), `make test` runs the CPU test
# suite, `make test-gpu` the GPU tests (on a machine with a GPU), `make demo` the bundled demo run.
#
#   make MOSFT_CUDA=0        force a CPU-only build
#   make NVCC=/path/to/nvcc  pick a CUDA toolkit
#   make DEBUG=1             -O0, address and undefined-behavior sanitizers (CPU code)

SHELL := /bin/bash
.DEFAULT_GOAL := all
BUILD ?= build

CC ?= gcc
CFLAGS_BASE := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -I. -pthread -fPIC -fopenmp
ifeq ($(DEBUG),1)
  OPT := -O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer
else
  OPT := -O2 -g -march=x86-64-v2
endif
DEP_CFLAGS := $(shell pkg-config --cflags libcjson libcurl zlib 2>/dev/null)
DEP_LIBS := -lcjson -lcurl -lz -lm -lgomp -pthread
CFLAGS := $(CFLAGS_BASE) $(OPT) $(DEP_CFLAGS) $(EXTRA_CFLAGS)
LDFLAGS := $(OPT) -Wl,-rpath,'$$ORIGIN/lib' -Wl,-rpath,'$$ORIGIN/../lib'

# ---- CUDA detection ---------------------------------------------------------------------------
MOSFT_CUDA ?= auto
ifeq ($(MOSFT_CUDA),0)
  NVCC :=
else
  NVCC ?= $(shell command -v nvcc 2>/dev/null || ( [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc ))
endif
ifneq ($(NVCC),)
  CUDA_HOME := $(patsubst %/bin/nvcc,%,$(NVCC))
  CUDA_SRCS := $(wildcard cuda/*.cu)
  CUDA_CPP_SRCS := $(wildcard cuda/*.cpp)
  GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
  NVCCFLAGS := -std=c++17 -O3 -g -lineinfo -I. -Xcompiler -fPIC,-Wall $(GENCODE) --expt-relaxed-constexpr \
               $(DEP_CFLAGS) -DMOSFT_WITH_CUDA $(EXTRA_NVCCFLAGS)
  CUDA_LIBS := -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/targets/x86_64-linux/lib -lcublasLt -lcublas \
               -lcudart_static -ldl -lrt -lstdc++
  CFLAGS += -DMOSFT_WITH_CUDA -I$(CUDA_HOME)/include
  BUILD_KIND := CUDA ($(NVCC))
else
  CUDA_SRCS :=
  CUDA_CPP_SRCS :=
  CUDA_LIBS :=
  BUILD_KIND := CPU-only
endif

# ---- sources ----------------------------------------------------------------------------------
LIB_SRCS := $(wildcard core/*.c) $(wildcard data/*.c)
CLI_SRCS := $(wildcard cli/*.c)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
CLI_OBJS := $(CLI_SRCS:%.c=$(BUILD)/obj/%.o)
CUDA_OBJS := $(CUDA_SRCS:%.cu=$(BUILD)/obj/%.o) $(CUDA_CPP_SRCS:%.cpp=$(BUILD)/obj/%.o)
TEST_SRCS := $(wildcard tests/test_*.c)
TEST_BINS := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)
GPU_TEST_SRCS := $(wildcard tests/gpu/test_*.c) $(wildcard tests/gpu/test_*.cu)
GPU_TEST_BINS := $(patsubst tests/gpu/%.cu,$(BUILD)/tests/gpu/%,$(patsubst tests/gpu/%.c,$(BUILD)/tests/gpu/%,$(GPU_TEST_SRCS)))
# check and subunit are linked statically so test binaries also run on machines without them (the GPU box).
CHECK_LIBS := -Wl,-Bstatic -lcheck_pic -lsubunit -Wl,-Bdynamic -lrt -lm

LIB := $(BUILD)/libmosft.a
BIN := $(BUILD)/mosft
DEPS_STAMP := $(BUILD)/.deps-ok

.PHONY: all deps test test-emu test-gpu demo clean bench info-build
all: $(BIN)

# Debian packages: installed by our script when missing (as root), else it prints the command.
$(DEPS_STAMP): scripts/install-deps.sh
	@mkdir -p $(BUILD)
	@bash scripts/install-deps.sh
	@touch $@
deps: $(DEPS_STAMP)

$(BUILD)/obj/%.o: %.c | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/cuda/%.o: cuda/%.cu | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/cuda/%.o: cuda/%.cpp | $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -x cu -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJS) $(CUDA_OBJS)
	@rm -f $@
	ar rcs $@ $^

# libcjson (and libgomp) are not on every GPU machine: ship them beside the binary (rpath $ORIGIN/lib).
$(BUILD)/lib/.stamp: | $(DEPS_STAMP)
	@mkdir -p $(BUILD)/lib
	@for l in libcjson.so.1 libgomp.so.1; do f=$$(ldconfig -p | awk -v n="$$l" '$$1==n{print $$NF; exit}'); \
	  if [ -n "$$f" ]; then cp -L "$$f" $(BUILD)/lib/; fi; done
	@touch $@

$(BIN): $(CLI_OBJS) $(LIB) $(BUILD)/lib/.stamp
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJS) $(LIB) $(CUDA_LIBS) $(DEP_LIBS)
	@echo "built $@ [$(BUILD_KIND)]"
ifeq ($(NVCC),)
	@echo "note: no CUDA toolkit found (nvcc); built a CPU-only mosft"
endif

$(BUILD)/tests/%: tests/%.c tests/test_util.h $(LIB) $(BUILD)/lib/.stamp
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(CUDA_LIBS) $(DEP_LIBS) $(CHECK_LIBS)

$(BUILD)/tests/gpu/%: tests/gpu/%.c tests/test_util.h $(LIB) $(BUILD)/lib/.stamp
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(CUDA_LIBS) $(DEP_LIBS) $(CHECK_LIBS)

# The NF4 GEMM probe: Hopper only (wgmma, TMA), and cuBLASLt as its reference.
$(BUILD)/tests/gpu/bench_nf4_gemm: tests/gpu/bench_nf4_gemm.cu
	@mkdir -p $(dir $@)
	$(NVCC) -std=c++17 -O3 -lineinfo -I. -gencode arch=compute_90a,code=sm_90a -o $@ $< -lcublasLt

# A standalone CUDA probe (tests/gpu/bench_*.cu: no mosft library, no check).
$(BUILD)/tests/gpu/bench_%: tests/gpu/bench_%.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -o $@ $<

$(BUILD)/tests/gpu/%: tests/gpu/%.cu tests/test_util.h $(LIB) $(BUILD)/lib/.stamp
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Xlinker -rpath,'$$ORIGIN/../lib' -o $@ $< $(LIB) $(CUDA_LIBS) $(DEP_LIBS) $(CHECK_LIBS)

# ---- the CUDA code on the CPU kernel emulator (tests/emu/cuda_emu.h) -------------------------------
# cuda/*.cu rewritten by tests/emu/emu_cu.py and compiled as C++ (g++, the toolkit's headers), linked
# with the GPU tests: kernel logic, fragment layouts and barriers are checked where there is no GPU.
EMU_TEST_BINS :=
ifneq ($(NVCC),)
EMU_CXXFLAGS := -std=c++17 -O1 -g -fopenmp -ffp-contract=off -Wall -Wno-unused-parameter -Wno-unknown-pragmas \
                -Wno-unused-function -Wno-unused-variable -DMOSFT_CUDA_EMU -DMOSFT_WITH_CUDA -I. -I$(CUDA_HOME)/include \
                $(DEP_CFLAGS)
EMU_LDFLAGS :=
ifeq ($(EMU_ASAN),1)  # the kernels' accesses under AddressSanitizer (see EMU_ASAN_BINS below)
EMU_CXXFLAGS += -fsanitize=address -fno-omit-frame-pointer
EMU_LDFLAGS += -fsanitize=address
endif
EMU_OBJS := $(CUDA_SRCS:cuda/%.cu=$(BUILD)/emu/cuda/%.o) $(BUILD)/emu/cuda_emu.o
EMU_TEST_BINS := $(BUILD)/emu/test_kernels $(BUILD)/emu/test_step
$(BUILD)/emu/cuda/%.cpp: cuda/%.cu tests/emu/emu_cu.py
	@mkdir -p $(dir $@)
	python3 tests/emu/emu_cu.py $< $@
$(BUILD)/emu/cuda/%.o: $(BUILD)/emu/cuda/%.cpp
	$(CXX) $(EMU_CXXFLAGS) -include tests/emu/cuda_emu.h -MMD -MP -c $< -o $@
$(BUILD)/emu/cuda_emu.o: tests/emu/cuda_emu.cpp tests/emu/cuda_emu.h
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -MMD -MP -c $< -o $@
# the same library objects, the emulated cuda/ in place of the nvcc-built one
$(BUILD)/emu/libmosft_emu.a: $(LIB_OBJS) $(EMU_OBJS)
	@rm -f $@
	ar rcs $@ $^
$(BUILD)/emu/test_%: tests/gpu/test_%.c tests/test_util.h $(BUILD)/emu/libmosft_emu.a
	$(CC) $(CFLAGS) -o $@.o -c $<
	$(CXX) $(LDFLAGS) $(EMU_LDFLAGS) -fopenmp -o $@ $@.o $(BUILD)/emu/libmosft_emu.a $(DEP_LIBS) $(CHECK_LIBS)
.SECONDARY: $(CUDA_SRCS:cuda/%.cu=$(BUILD)/emu/cuda/%.cpp)
-include $(EMU_OBJS:.o=.d)
endif

# The kernel tests once more with the emulated kernels under AddressSanitizer (their own build in
# $(BUILD)/asan): an access past a device buffer stops with the kernel's file and line.
EMU_ASAN_BINS :=
ifneq ($(NVCC),)
ifneq ($(EMU_ASAN),1)
EMU_ASAN_BINS := $(BUILD)/asan/emu/test_kernels
.PHONY: $(EMU_ASAN_BINS)
$(EMU_ASAN_BINS):
	@$(MAKE) --no-print-directory BUILD=$(BUILD)/asan EMU_ASAN=1 $@
endif
endif

# The whole CPU suite. Every tests/test_*.c is one check program; all run, failures are summed. With a
# CUDA toolkit, the GPU tests also run on the kernel emulator.
test: $(BIN) $(TEST_BINS) $(EMU_TEST_BINS) $(EMU_ASAN_BINS)
	@bash tests/run_tests.sh $(TEST_BINS) $(EMU_TEST_BINS) $(EMU_ASAN_BINS)

# Only the GPU tests on the kernel emulator.
test-emu: $(EMU_TEST_BINS) $(EMU_ASAN_BINS)
	@if [ -z "$(NVCC)" ]; then echo "test-emu: needs the CUDA toolkit's headers (nvcc not found)"; exit 1; fi
	@bash tests/run_tests.sh $(EMU_TEST_BINS) $(EMU_ASAN_BINS)

# GPU tests (need a CUDA build and a GPU).
test-gpu: $(BIN) $(GPU_TEST_BINS)
	@if [ -z "$(NVCC)" ]; then echo "test-gpu: this is a CPU-only build (no nvcc)"; exit 1; fi
	@bash tests/run_tests.sh $(GPU_TEST_BINS)

# Build every test binary without running (what the GPU machine gets carried).
tests-build: $(BIN) $(TEST_BINS) $(GPU_TEST_BINS)

demo: $(BIN)
	@bash scripts/demo.sh

# The CUPTI timeline tracer (scripts/cupti_trace.c, docs/CUDA.md), built on demand.
$(BUILD)/lib/libmosft_trace.so: scripts/cupti_trace.c
	@if [ -z "$(NVCC)" ]; then echo "libmosft_trace.so: needs the CUDA toolkit (CUPTI)"; exit 1; fi
	@mkdir -p $(@D)
	$(CC) -O2 -shared -fPIC -I$(CUDA_HOME)/include $< -o $@ -L$(CUDA_HOME)/targets/x86_64-linux/lib -lcupti \
	    -Wl,-rpath,$(CUDA_HOME)/targets/x86_64-linux/lib

info-build:
	@echo "build: $(BUILD_KIND)"

clean:
	rm -rf $(BUILD)

-include $(LIB_OBJS:.o=.d) $(CLI_OBJS:.o=.d) $(CUDA_OBJS:.o=.d)
