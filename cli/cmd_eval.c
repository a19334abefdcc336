// cmd_eval.c: `mosft eval`.
#include "cli/cli.h"

int cmd_eval(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("eval", "issue 6");
}
