// cmd_bench.c: `mosft bench`.
#include "cli/cli.h"

int cmd_bench(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("bench", "issue 7");
}
