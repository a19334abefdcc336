// common.c: helpers shared by the subcommands.
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/common.h"

int cli_fail(int rc) {
    if (rc == MOSFT_OK) return 0;
    mosft_error_print();
    return rc;
}

int cli_load_config(mosft_config *c, const char *path, char **sets, int n_sets) {
    config_defaults(c);
    int rc = MOSFT_OK;
    if (path) rc = config_load(c, path);
    for (int i = 0; i < n_sets && rc == MOSFT_OK; i++) rc = config_set(c, sets[i]);
    if (rc == MOSFT_OK) rc = config_validate(c);
    return rc;
}

int cli_not_implemented(const char *cmd, const char *issue) {
    fprintf(stderr, "error: mosft %s: not implemented yet (%s)\n", cmd, issue);
    return 1;
}

int cli_wants_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;
    return 0;
}
