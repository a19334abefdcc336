// version.h: the mosft version and file-format versions.
#ifndef MOSFT_VERSION_H
#define MOSFT_VERSION_H
#define MOSFT_VERSION "0.1.0"
#define MOSFT_ADAPTER_FORMAT_VERSION 1  // adapter.mos
#define MOSFT_STATE_FORMAT_VERSION 1    // trainer_state.safetensors
#endif
