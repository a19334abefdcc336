// cmd_data.c: `mosft data`.
#include "cli/cli.h"

int cmd_data(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("data", "issue 4");
}
