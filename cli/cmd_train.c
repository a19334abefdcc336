// cmd_train.c: `mosft train`.
#include "cli/cli.h"

int cmd_train(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("train", "issue 6");
}
