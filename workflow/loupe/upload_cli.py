"""`loupe upload`: config section hub. Writes the receipt to --out, or with hub.dry_run the
plan (what would be sent, with sizes), which is also printed to the terminal."""

import sys

from .clitools import add_paths, add_settings


def add_arguments(p):
    add_settings(p)
    add_paths(p, "staged", "out")


def run(a):
    from .io import write_json
    from .upload import dry_run_plan, hub_settings, local_files, token_source, upload

    s = hub_settings(a.settings)
    if not s.dry_run:
        upload(a.settings, a.staged, a.out)
        return
    plan, text = dry_run_plan(s, local_files(a.staged), token_source())
    write_json(a.out, plan)
    print(text)
    if sys.stdout is not sys.__stdout__:  # --log took stdout: the user asked to see this
        print(text, file=sys.__stdout__, flush=True)
