"""Stage 0: check every section of params.yaml, before any other stage runs and so before DVC deletes its outputs.

DVC deletes a stage's outputs just before it runs the stage's command, so a stage that rejected a bad value itself
would find its last good outputs already gone. Every other stage depends on this stage's output (--output)
instead, which it writes only when the whole file is valid: a bad value stops `dvc repro` / `dvc exp run` here, with
every earlier output untouched. The file's content never changes, so a valid change reruns this check and, after it,
only the stages that read the changed keys.
"""

from nanogpt import cli, files
from nanogpt.errors import exit_on_user_error, run_and_exit

CONTENT = "params.yaml passed `python -m stages.validate`; the other stages depend on this file to run after it\n"


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    cli.path(p, "--output", "out/params.ok", "written when params.yaml is valid")
    args = p.parse_args()
    cli.config(args)
    files.write_text(args.output, CONTENT)


if __name__ == "__main__":
    run_and_exit(main)
