// info.h: `mosft info`: human-readable summaries of a model folder, an adapter file, a config.
#ifndef MOSFT_INFO_H
#define MOSFT_INFO_H

#include <stdio.h>

#include "core/config.h"

int info_model(const char *model_dir, FILE *out);
int info_adapter(const char *adapter_path, FILE *out);
int info_config(const mosft_config *cfg, FILE *out);

#endif
