// cmd_tokenize.c: `mosft tokenize`.
#include "cli/cli.h"

int cmd_tokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("tokenize", "issue 3");
}
