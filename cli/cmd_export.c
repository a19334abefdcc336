// cmd_export.c: `mosft export`.
#include "cli/cli.h"

int cmd_export(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return cli_not_implemented("export", "issue 5");
}
