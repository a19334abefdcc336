// cli.h: the subcommands of `mosft` (one file each in cli/) and the helpers they share.
// cli/ parses arguments and dispatches; the work is done in core/ and data/.
#ifndef MOSFT_CLI_H
#define MOSFT_CLI_H

#include "core/config.h"

// Each returns the process exit code: 0 ok, 1 runtime failure, 2 bad input.
int cmd_train(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_data(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_bench(int argc, char **argv);

// Print the error recorded by mosft_fail (and its hint) and return its code (1 if none was recorded).
int cli_fail(int rc);
// Defaults, then `path` (may be NULL), then each "--set a.b=v", then validation. Returns MOSFT_OK or
// the error code with the message recorded.
int cli_load_config(mosft_config *c, const char *path, char **sets, int n_sets);
// "mosft <cmd>: not implemented yet" (exit 1).
int cli_not_implemented(const char *cmd, const char *issue);
// Does argv hold -h / --help?
int cli_wants_help(int argc, char **argv);

#endif
